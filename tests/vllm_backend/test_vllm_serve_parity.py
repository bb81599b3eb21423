"""`memento serve` (the embedded engine) and `memento serve --backend vllm` answer with the same fields.

Both servers run one checkpoint: a tiny model taught, under the memento mask, to answer one question
with a thought (one block, evicted once its memento ends) and an answer, so the answers have a
reasoning part and a KV that shrank. The same requests go to both (chat and completions, whole and
streamed with usage), and their JSON must have the same fields with values of the same types,
recursively (a stream: over all of its chunks). A null field counts as absent, so vLLM's own extras
(``refusal``, ``token_ids``, ``kv_transfer_params``, ... all null) drop out; its one non-null extra,
``system_fingerprint``, is left out by name. Greedy decoding on both gives the same tokens, so the
reasoning, the answer and every usage figure (the KV ones included) must also be equal.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from memento.chat import assistant_prefix_ids
from memento.engine import EngineConfig
from memento.format import SpecialTokenIds
from memento.masking import CHAT_MEMENTO, build_batch
from memento.modeling import build_tiny_model
from memento.serve.server import build_app, start_in_thread

MEMENTO = Path(sys.executable).parent / "memento"
QUESTION = "What is 2+3?"
THOUGHT = "<|block_start|>2+3=5<|block_end|><|summary_start|>5<|summary_end|>"
ANSWER = f"<think>\n{THOUGHT}\n</think>\nThe answer is 5."
VLLM_ONLY = {"system_fingerprint"}
"""vLLM's one extra field with a value (its other extras are null)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prompt(tok) -> str:
    return tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def trained_dir(tok, prompt, tmp_path_factory) -> Path:
    """The vLLM tests' tiny model shape, taught ANSWER (under the mask both servers evict by)."""
    model = build_tiny_model(
        tok,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=128,
        seed=3,
        tie_word_embeddings=False,
    )
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + tok(ANSWER + tok.eos_token, add_special_tokens=False)["input_ids"]
    batch = build_batch(
        [ids], SpecialTokenIds.from_tokenizer(tok), CHAT_MEMENTO, assistant_prefix=assistant_prefix_ids(tok)
    )
    mask = batch.dense()
    targets = torch.tensor(ids[1:])
    weights = torch.zeros(len(ids) - 1)
    weights[len(prompt_ids) - 1 :] = 1  # the answer's tokens only
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 70-token batch: one thread is ~30x faster than two here
    try:
        for _ in range(300):
            logits = model(batch.input_ids, attention_mask=mask, position_ids=batch.position_ids).logits[0, :-1]
            losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            loss = (losses * weights).sum() / weights.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if loss.item() < 0.01:
                break
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.01
    path = tmp_path_factory.mktemp("parity-model")
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def embedded(trained_dir):
    app = build_app(trained_dir, EngineConfig.from_options(kv_budget_tokens=2048), model_name="tiny", dtype="float32")
    running = start_in_thread(app)
    yield running.base_url
    running.stop()


@pytest.fixture(scope="module")
def vllm_server(trained_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("parity-serve") / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    cmd = [str(MEMENTO), "serve", str(trained_dir), "--backend", "vllm", "--port", str(port), "--dtype", "float32"]
    cmd += ["--kv-budget-tokens", "2048", "--block-size", "32", "--served-model-name", "tiny"]
    cmd += ["--vllm-arg=--max-model-len=512", "--vllm-arg=--enforce-eager"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not come up:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def post(base: str, route: str, body: dict) -> dict | list:
    """The answer's JSON; a stream's as its chunks, ``[DONE]`` last."""
    if not body.get("stream"):
        reply = httpx.post(f"{base}{route}", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        return reply.json()
    chunks: list = []
    with httpx.stream("POST", f"{base}{route}", json=body, timeout=120) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                chunks.append(data if data == "[DONE]" else json.loads(data))
    return chunks


def shape(value, path: str = "") -> set[tuple[str, str]]:
    """(path, JSON type) of every non-null value inside ``value``, objects and arrays included."""
    if value is None:
        return set()
    if isinstance(value, dict):
        inner = [shape(v, f"{path}.{k}") for k, v in value.items() if k not in VLLM_ONLY]
        return {(path, "object")}.union(*inner)
    if isinstance(value, list):
        return {(path, "array")}.union(*(shape(v, f"{path}[]") for v in value))
    return {(path, {bool: "boolean", int: "integer", float: "number", str: "string"}[type(value)])}


def stream_shape(chunks: list) -> set[tuple[str, str]]:
    assert chunks[-1] == "[DONE]" and "[DONE]" not in chunks[:-1]
    return set().union(*(shape(chunk) for chunk in chunks[:-1]))


def streamed(chunks: list, field: str) -> str:
    """The text of one choice's deltas (``field``: content, reasoning, ...), or its text (completions)."""
    parts = []
    for chunk in chunks[:-1]:
        for choice in chunk["choices"]:
            parts.append((choice["delta"].get(field) if "delta" in choice else choice["text"]) or "")
    return "".join(parts)


def test_both_servers_answer_with_the_same_fields(embedded, vllm_server, prompt) -> None:
    chat = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 64, "temperature": 0}
    completion = {"model": "tiny", "prompt": prompt, "max_tokens": 64, "temperature": 0}
    usage = {"stream": True, "stream_options": {"include_usage": True}}
    requests = {
        "chat": ("/v1/chat/completions", chat),
        "chat stream": ("/v1/chat/completions", {**chat, **usage}),
        "completion": ("/v1/completions", completion),
        "completion stream": ("/v1/completions", {**completion, **usage}),
    }
    answers = {
        name: {k: post(base, *request) for k, request in requests.items()}
        for name, base in (("embedded", embedded), ("vllm", vllm_server))
    }
    ours, theirs = answers["embedded"], answers["vllm"]

    for name in requests:
        shapes = {side: (stream_shape if "stream" in name else shape)(answers[side][name]) for side in answers}
        assert shapes["embedded"] == shapes["vllm"], (
            f"{name}: only the embedded server's {sorted(shapes['embedded'] - shapes['vllm'])}, "
            f"only vLLM's {sorted(shapes['vllm'] - shapes['embedded'])}"
        )

    # The fields hold the same values: the reasoning split, both of its names, the usage and the KV.
    for side in (ours, theirs):
        message = side["chat"]["choices"][0]["message"]
        assert (message["reasoning"], message["content"]) == (THOUGHT, "The answer is 5.")
        assert message["reasoning_content"] == message["reasoning"]
        assert (streamed(side["chat stream"], "reasoning"), streamed(side["chat stream"], "content")) == (
            THOUGHT,
            "The answer is 5.",
        )
        assert streamed(side["chat stream"], "reasoning_content") == THOUGHT
        assert side["completion"]["choices"][0]["text"] == ANSWER  # the memento tokens stay in the text
        assert streamed(side["completion stream"], "text") == ANSWER
        assert side["chat"]["usage"]["evicted_tokens"] == len("2+3=5")  # the block, evicted at its memento's end
    for name in requests:
        usage_of = (lambda answer: answer[-2]["usage"]) if "stream" in name else (lambda answer: answer["usage"])
        mine, vllms = usage_of(ours[name]), usage_of(theirs[name])
        assert {k: v for k, v in mine.items() if v is not None} == {k: v for k, v in vllms.items() if v is not None}
