"""The vLLM backend's answer fields without vLLM (memento.vllm.fields): the KV figures it computes from
token ids are the embedded engine's measures, and its rewriting of vLLM's answers. The two servers
side by side: tests/vllm_backend/test_vllm_serve_parity.py."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from helpers import memento_case, tiny_model
from memento.engine import EngineConfig, LLMEngine, SamplingParams
from memento.masking import MaskConfig
from memento.tiny_tokenizer import build_tiny_tokenizer
from memento.vllm.config import MementoSettings
from memento.vllm.fields import KVRule, MementoFields


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.mark.parametrize(
    "mask",
    [MaskConfig.chat(), MaskConfig.chat(keep_last_n=1), MaskConfig.chat(restart=True)],
    ids=lambda mask: mask.mode,
)
def test_the_kv_figures_from_token_ids_are_the_engines_measures(tok, mask) -> None:
    engine = LLMEngine(tiny_model(tok, seed=3), tok, EngineConfig(mask=mask, kv_budget_tokens=4096))
    rng = random.Random(5)
    prompts = []
    for _ in range(6):  # prompts ending inside memento traces: evictions in the prompt and after it
        prompt, response = memento_case(tok, rng, block_len=(4, 30), units=(1, 3))
        prompts.append(prompt + response[: rng.randint(1, len(response))])
    ids = {
        engine.add_request(p, SamplingParams(temperature=1.0, max_tokens=16, seed=i)): p for i, p in enumerate(prompts)
    }
    rule = KVRule.from_settings(MementoSettings(mask=mask), tok)
    evicted = 0
    for request in engine.run_to_completion():
        sample = request.outputs[0]
        want = {"peak_kv_tokens": sample.kv.peak, "evicted_tokens": sample.kv.evicted_tokens}
        assert rule.usage(ids[request.request_id], [sample.token_ids]) == want
        evicted += sample.kv.evicted_tokens
    assert evicted > 0


def run(middleware: MementoFields, body: dict, answer: list[bytes], content_type: bytes) -> tuple[dict, bytes]:
    """One request through the middleware to an app that answers ``answer`` (body pieces):
    (the request the app read, the response body the client got)."""
    seen, sent = {}, []

    async def app(scope, receive, send):
        seen.update(json.loads((await receive())["body"]))
        length = dict(scope["headers"])[b"content-length"]
        assert int(length) == len(json.dumps(seen, separators=(",", ":")).encode())
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]})
        for i, piece in enumerate(answer):
            await send({"type": "http.response.body", "body": piece, "more_body": i < len(answer) - 1})

    async def receive():
        return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    async def send(message):
        sent.append(message)

    middleware.app = app
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    asyncio.run(middleware(scope, receive, send))
    return seen, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_the_middleware_adds_the_fields_and_hides_the_ids_it_asked_for(tok) -> None:
    middleware = MementoFields(None)
    middleware._rule, middleware._rule_loaded = KVRule.from_settings(MementoSettings(), tok), True
    prompt = tok(
        tok.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False, add_generation_prompt=True)
    )
    prompt = prompt["input_ids"]
    output = tok("<think><|block_start|>abc<|block_end|><|summary_start|>d<|summary_end|></think>e")["input_ids"]
    usage = {"prompt_tokens": len(prompt), "completion_tokens": len(output)}
    kv = middleware._rule.usage(prompt, [output])
    assert kv["evicted_tokens"] == 3

    whole = {"choices": [{"index": 0, "message": {"reasoning": "r", "content": "e"}, "token_ids": output}]}
    whole.update(prompt_token_ids=prompt, usage=usage)
    seen, body = run(middleware, {"messages": []}, [json.dumps(whole).encode()], b"application/json")
    assert seen == {"messages": [], "return_token_ids": True, "skip_special_tokens": False}
    got = json.loads(body)
    assert got["prompt_token_ids"] is None and got["choices"][0]["token_ids"] is None  # not asked: hidden
    assert got["choices"][0]["message"] == {"reasoning": "r", "content": "e", "reasoning_content": "r"}
    assert got["usage"] == {**usage, **kv}
    _, body = run(middleware, {"return_token_ids": True}, [json.dumps(whole).encode()], b"application/json")
    assert json.loads(body)["choices"][0]["token_ids"] == output  # asked: kept

    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant"}}], "prompt_token_ids": prompt},
        {"choices": [{"index": 0, "delta": {"reasoning": "r"}, "token_ids": output[:5]}]},
        {"choices": [{"index": 0, "delta": {"content": "e"}, "token_ids": output[5:]}]},
        {"choices": [], "usage": usage},
    ]
    stream = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    pieces = [stream[i : i + 7] for i in range(0, len(stream), 7)]  # events cut anywhere
    _, body = run(middleware, {"stream": True}, pieces, b"text/event-stream")
    got = [json.loads(e[len(b"data: ") :]) for e in body.split(b"\n\n")[:-2]]
    assert body.endswith(b"data: [DONE]\n\n") and len(got) == len(events)
    assert got[1]["choices"][0]["delta"] == {"reasoning": "r", "reasoning_content": "r"}
    assert got[0]["prompt_token_ids"] is None and got[1]["choices"][0]["token_ids"] is None
    assert got[-1]["usage"] == {**usage, **kv}
