"""``memento serve --backend vllm``: vLLM's own OpenAI server, multi-process, with memento eviction.

One server starts for the module (``vllm serve`` in its default multi-process mode: the scheduler's
plan crosses a process boundary to the worker). The real ``openai`` client drives it: completions
with token-id prompts must give our embedded engine's greedy tokens (which differ from vanilla's
here, so eviction really happened in the server), chat and streaming work, and vLLM's metrics and
health routes answer.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from helpers import memento_case
from memento.engine import EngineConfig, LLMEngine
from memento.engine import SamplingParams as OurParams
from memento.masking import MaskConfig

MEMENTO = Path(sys.executable).parent / "memento"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # As a user would run it (README): no VLLM_CPU_KVCACHE_SPACE; the backend sizes vLLM's reservation.
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    cmd = [
        str(MEMENTO),
        "serve",
        str(model_dir),
        "--backend",
        "vllm",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--kv-budget-tokens",
        "2048",
        "--block-size",
        "32",
        "--served-model-name",
        "tiny",
        "--vllm-arg=--max-model-len=512",
        "--vllm-arg=--enforce-eager",
        # as on a machine with little memory free: vLLM would want 99.9% of the node unless the
        # backend states its reservation (the README's command failed that way on a fresh machine)
        "--vllm-arg=--gpu-memory-utilization=0.999",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"vllm serve did not come up:\n{log.read_text()[-4000:]}")
    yield base, log
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key="none")


def engine_tokens(model, tok, prompts, keep: int, max_tokens: int) -> list[list[int]]:
    engine = LLMEngine(model, tok, EngineConfig(mask=MaskConfig.chat(keep_last_n=keep), kv_budget_tokens=4096))
    ids = [engine.add_request(p, OurParams(temperature=0, max_tokens=max_tokens)) for p in prompts]
    done = {r.request_id: r.outputs[0].token_ids for r in engine.run_to_completion()}
    return [done[i] for i in ids]


def test_completions_equal_the_embedded_engine(client, model, tok):
    rng = random.Random(3)
    prompts = []
    for _ in range(6):
        prompt, response = memento_case(tok, rng, block_len=(4, 40), units=(1, 3))
        prompts.append(prompt + response[: rng.randint(1, len(response))])
    want = engine_tokens(model, tok, prompts, keep=0, max_tokens=16)
    vanilla = engine_tokens(model, tok, prompts, keep=-1, max_tokens=16)
    assert want != vanilla  # the prompts make eviction matter
    got = []
    for prompt in prompts:
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, logprobs=1)
        choice = reply.choices[0]
        got.append(choice.logprobs.tokens)  # the text leaves out a stopping token, as vLLM does for stop ids
        assert reply.usage.prompt_tokens == len(prompt)
        assert reply.usage.completion_tokens == len(choice.logprobs.tokens)
    assert got == [tok.convert_ids_to_tokens(t) for t in want]


def test_chat_and_streaming(client):
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "STREAM a3 c9"}], max_tokens=12, temperature=0
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    stream = client.completions.create(model="tiny", prompt="abc", max_tokens=8, temperature=0, stream=True)
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    whole = client.completions.create(model="tiny", prompt="abc", max_tokens=8, temperature=0)
    assert "".join(pieces) == whole.choices[0].text


def test_vllm_routes_answer(server):
    base, log = server
    assert httpx.get(f"{base}/v1/models").json()["data"][0]["id"] == "tiny"
    metrics = httpx.get(f"{base}/metrics").text
    assert "vllm:num_requests_running" in metrics
    assert "memento vLLM backend on" in log.read_text()
