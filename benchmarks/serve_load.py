"""What HTTP costs: requests/s and time to first token through `memento serve` vs the engine called directly.

The same requests (held-out synthetic prompts, greedy, the same max_tokens) with the same number in
flight at once (``--concurrency``), side by side in one run:

- direct: one :class:`~memento.engine.LLMEngine` in this process; a new request is added as soon as
  one finishes, and the time to first token is taken in the engine's token callback;
- HTTP: ``memento serve`` in a subprocess (its own interpreter, as in production) driven by a light
  async client (httpx, raw server-sent events) with streaming chat requests; the time to first token
  is the first chunk with text.

    .venv/bin/python benchmarks/serve_load.py --model runs/demo/memento-model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from memento.chat import chat_prompt
from memento.demo import DEMO_KNOBS
from memento.engine import EngineConfig, LLMEngine, SamplingParams
from memento.masking import MaskConfig
from memento.synth import generate


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_direct(model_dir: Path, prompts: list[str], args) -> dict:
    engine = LLMEngine.from_pretrained(
        model_dir,
        EngineConfig(kv_budget_tokens=args.kv_budget, max_num_seqs=args.max_seqs, mask=MaskConfig.chat(keep_last_n=0)),
    )
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    submitted: dict[str, float] = {}
    first: dict[str, float] = {}

    def on_token(request_id: str, index: int, token: int, sampled) -> None:
        first.setdefault(request_id, time.perf_counter())

    queue = list(prompts)
    start = time.perf_counter()
    in_flight = 0
    tokens = 0
    while queue or in_flight:
        while queue and in_flight < args.concurrency:
            rid = engine.add_request(queue.pop(0), params)
            submitted[rid] = time.perf_counter()
            in_flight += 1
        for output in engine.step(on_token):
            in_flight -= 1
            tokens += sum(len(o.token_ids) for o in output.outputs)
    seconds = time.perf_counter() - start
    ttft = [first[r] - submitted[r] for r in submitted]
    return _summary(seconds, len(prompts), tokens, ttft)


def _summary(seconds: float, requests: int, tokens: int, ttft: list[float]) -> dict:
    return {
        "seconds": seconds,
        "requests_per_second": requests / seconds,
        "tokens_per_second": tokens / seconds,
        "generated_tokens": tokens,
        "ttft_p50_ms": 1000 * statistics.median(ttft),
        "ttft_p90_ms": 1000 * percentile(ttft, 0.9),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_http(model_dir: Path, problems: list[str], args) -> dict:
    port = free_port()
    cli = [sys.executable, "-m", "memento.cli", "serve", str(model_dir), "--port", str(port)]
    cli += ["--kv-budget-tokens", str(args.kv_budget), "--max-num-seqs", str(args.max_seqs), "--keep-last-n", "0"]
    server = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("memento serve did not come up")
            time.sleep(0.2)
        ttft: list[float] = []
        tokens = 0
        url = f"http://127.0.0.1:{port}/v1/chat/completions"

        async def one(client: httpx.AsyncClient, problem: str, gate: asyncio.Semaphore) -> None:
            """A streaming chat request, read as raw server-sent events (a light client, as vLLM's
            benchmark uses: the ``openai`` SDK's per-chunk parsing would compete for the same cores)."""
            nonlocal tokens
            body = {
                "model": model_dir.name,
                "messages": [{"role": "user", "content": problem}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            async with gate:
                t0 = time.perf_counter()
                got_first = False
                async with client.stream("POST", url, json=body) as response:
                    response.raise_for_status()
                    last = ""
                    async for line in response.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if not got_first and line != "data: [DONE]":
                            delta = (json.loads(line[6:]).get("choices") or [{}])[0].get("delta", {})
                            if delta.get("content") or delta.get("reasoning_content"):  # the first text
                                ttft.append(time.perf_counter() - t0)
                                got_first = True
                        if line != "data: [DONE]":
                            last = line
                    tokens += json.loads(last[6:])["usage"]["completion_tokens"]

        async def main() -> float:
            gate = asyncio.Semaphore(args.concurrency)
            limits = httpx.Limits(max_connections=args.concurrency)
            async with httpx.AsyncClient(timeout=600, limits=limits) as client:
                start = time.perf_counter()
                await asyncio.gather(*(one(client, p, gate) for p in problems))
                return time.perf_counter() - start

        cpu = time.process_time()
        seconds = asyncio.run(main())
        return {**_summary(seconds, len(problems), tokens, ttft), "client_cpu_seconds": time.process_time() - cpu}
    finally:
        server.terminate()
        server.wait(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, required=True, help="a memento model directory (e.g. runs/demo/memento-model)"
    )
    parser.add_argument("--task", default="stream_sum")
    parser.add_argument(
        "--knob", action="append", metavar="NAME=VALUE", help="task knobs (default: the demo's, as its model needs)"
    )
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=1200)
    parser.add_argument("--kv-budget", type=int, default=16384)
    parser.add_argument("--max-seqs", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    knobs = dict(DEMO_KNOBS) if args.knob is None else {k: int(v) for k, v in (i.split("=", 1) for i in args.knob)}
    problems = [p.prompt for p in generate(args.task, "test", args.requests, seed=1, **knobs)]
    prompts = [chat_prompt(tokenizer, p) for p in problems]
    run_direct(args.model, prompts[:4], args)  # warm-up
    direct = run_direct(args.model, prompts, args)
    http = run_http(args.model, problems, args)
    report = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": str(args.model),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "direct": direct,
        "http": http,
        "requests_per_second_ratio": http["requests_per_second"] / direct["requests_per_second"],
        "ttft_p50_ratio": http["ttft_p50_ms"] / direct["ttft_p50_ms"],
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\nHTTP / direct: requests/s x{report['requests_per_second_ratio']:.2f}, "
        f"TTFT p50 {http['ttft_p50_ms']:.0f} ms vs {direct['ttft_p50_ms']:.0f} ms (x{report['ttft_p50_ratio']:.2f}); "
        f"the HTTP client itself used {http['client_cpu_seconds']:.1f} s of CPU"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
