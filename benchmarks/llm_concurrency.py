"""LLM-call concurrency efficiency of `memento.data.llm`: achieved calls/s against the ideal.

A scripted OpenAI-compatible server (tests/scripted_llm.py) answers every call after a fixed latency
(200 ms by default), in its own process so it does not share the client's interpreter. With
``--concurrency`` C calls in flight the ideal rate is C / latency; efficiency = achieved / ideal.

    .venv/bin/python benchmarks/llm_concurrency.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from memento.data.llm import LLMClient, LLMConfig

TESTS = Path(__file__).resolve().parent.parent / "tests"
SERVER = (
    "import sys, time; sys.path.insert(0, {tests!r}); from scripted_llm import ScriptedLLM; "
    "s = ScriptedLLM(latency={latency}); s.__enter__(); print(s.port, flush=True); time.sleep(10**6)"
)


async def run(base_url: str, calls: int, concurrency: int) -> float:
    config = LLMConfig(base_url=base_url, model="m", api_key_env=None, max_concurrency=concurrency, timeout_s=30)
    async with LLMClient(config) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client.chat([{"role": "user", "content": f"call {i}"}], seed=i) for i in range(calls)))
        seconds = time.perf_counter() - start
        assert client.stats.failures == 0 and client.stats.requests == calls
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=640)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER.format(tests=str(TESTS), latency=args.latency)], stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(server.stdout.readline())
        base_url = f"http://127.0.0.1:{port}/v1"
        asyncio.run(run(base_url, args.concurrency, args.concurrency))  # warm-up: connections, imports
        seconds = asyncio.run(run(base_url, args.calls, args.concurrency))
    finally:
        server.terminate()
        server.wait(10)
    rate = args.calls / seconds
    ideal = args.concurrency / args.latency
    waves = math.ceil(args.calls / args.concurrency) * args.latency  # the least time for fixed-latency calls
    report = {
        "calls": args.calls,
        "concurrency": args.concurrency,
        "latency_s": args.latency,
        "seconds": seconds,
        "calls_per_second": rate,
        "ideal_calls_per_second": ideal,
        "efficiency": rate / ideal,
        "efficiency_vs_waves": waves / seconds,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
