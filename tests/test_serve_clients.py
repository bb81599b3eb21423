"""What evaluation clients send, served: batches of prompts, echo with prompt logprobs (lm-eval's
log-likelihood requests), ``response_format`` text (lighteval via litellm), and the fields vLLM-style
clients send at their neutral values (issue 23). The real harness runs in test_serve_lm_eval.py."""

from __future__ import annotations

import random
import time

import httpx
import openai
import pytest
import torch

from helpers import memento_case, running_tiny_server, tiny_model
from memento.chat import assistant_prefix_ids
from memento.engine import EngineConfig, LLMEngine, SamplingParams
from memento.format import SpecialTokenIds
from memento.reference import teacher_forced_logits
from memento.serve.server import build_app, start_in_thread
from memento.serve.text import final_text
from memento.tiny_tokenizer import build_tiny_tokenizer

CONFIG = {"kv_budget_tokens": 2048, "max_num_seqs": 16, "keep_last_n": 0}
PROMPTS = ["STREAM a3 c9 x4 n22", "STREAM b1 q7", "STREAM z5 z5 z5 k0 m2"]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok, seed=3)


@pytest.fixture(scope="module")
def server():
    """The tiny model of :func:`model` (the same seed, so the same weights), served on 127.0.0.1."""
    with running_tiny_server(**CONFIG) as (running, _):
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def engine_run(model, tok, prompt_ids: list[int], params: SamplingParams):
    engine = LLMEngine(model, tok, EngineConfig.from_options(**CONFIG))
    rid = engine.add_request(prompt_ids, params)
    return next(r for r in engine.run_to_completion() if r.request_id == rid)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# -- several prompts in one request ----------------------------------------------------------------


@pytest.mark.parametrize("as_ids", [False, True], ids=["text", "token-ids"])
def test_a_batch_of_prompts_answers_choice_i_times_n_plus_j(client, model, tok, as_ids) -> None:
    prompts = [ids_of(tok, p) for p in PROMPTS] if as_ids else PROMPTS
    out = client.completions.create(model="tiny", prompt=prompts, max_tokens=8, temperature=1.0, n=2, seed=9)
    assert [c.index for c in out.choices] == list(range(6))
    usage_prompt, usage_completion, peak = 0, 0, 0
    for p, text in enumerate(PROMPTS):
        params = SamplingParams(temperature=1.0, max_tokens=8, n=2, seed=9)
        ref = engine_run(model, tok, ids_of(tok, text), params)
        for j, sample in enumerate(ref.outputs):
            want = final_text(tok, sample.token_ids, sample.finish_reason, sample.stop_reason, params)
            assert out.choices[p * 2 + j].text == want
        usage_prompt += len(ref.prompt_token_ids)
        usage_completion += sum(len(s.token_ids) for s in ref.outputs)
        peak = max([peak] + [s.kv.peak for s in ref.outputs])
    assert out.usage.prompt_tokens == usage_prompt and out.usage.completion_tokens == usage_completion
    assert out.usage.model_extra["peak_kv_tokens"] == peak


def test_a_streamed_batch_gives_each_choice_its_own_text(client) -> None:
    kwargs = {"model": "tiny", "prompt": PROMPTS, "max_tokens": 10, "temperature": 0, "n": 2}
    whole = client.completions.create(**kwargs)
    texts = [""] * 6
    finished = []
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finished.append(choice.index)
    assert texts == [c.text for c in whole.choices]
    assert sorted(finished) == list(range(6))
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_batch_with_one_bad_prompt_is_refused_whole(client, server) -> None:
    with pytest.raises(openai.BadRequestError, match="KV budget"):
        client.completions.create(model="tiny", prompt=[PROMPTS[0], "x" * 3000], max_tokens=3)
    assert httpx.get(f"{server.base_url}/metrics").status_code == 200


def test_a_batch_larger_than_the_queue_is_a_429_and_leaves_nothing_behind(model, tok) -> None:
    """A batch whose prompts do not all fit in the queue is refused whole: the prompts that got in are
    aborted (their KV freed), and the server goes on."""
    config = EngineConfig.from_options(**CONFIG)
    app = build_app(model, config, tokenizer=tok, model_name="tiny", max_pending_requests=2)
    running = start_in_thread(app)
    try:
        client = openai.OpenAI(base_url=f"{running.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=1500, extra_body={"ignore_eos": True})
        engine = app.state.memento.async_engine
        deadline = time.monotonic() + 1  # an unaborted prompt would decode for seconds more
        while (engine.pending or engine.engine.pool.num_used) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.pending == 0 and engine.engine.pool.num_used == 0
        two = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=3)
        assert len(two.choices) == 2
    finally:
        running.stop()


# -- echo and prompt logprobs ----------------------------------------------------------------------


def test_echo_scores_the_prompt_under_the_memento_mask(client, model, tok) -> None:
    """lm-eval's log-likelihood request: prompt token ids, echo, one generated token, logprobs 1. The
    prompt holds closed blocks, so its scores must be the dense memento mask's, not plain causal ones."""
    prompt, continuation = memento_case(tok, random.Random(4), units=(3, 3))
    ids = prompt + continuation
    body = {"model": "tiny", "prompt": [ids], "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
    out = client.completions.create(**body)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    (logits,) = teacher_forced_logits(
        model,
        [ids],
        SpecialTokenIds.from_tokenizer(tok),
        EngineConfig.from_options(**CONFIG).mask,
        assistant_prefix=assistant_prefix_ids(tok),
        pad_token_id=tok.pad_token_id,
    )
    want = torch.log_softmax(logits, dim=-1)
    got = torch.tensor(lp.token_logprobs[1 : len(ids)])
    assert (got - want[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]).abs().max().item() <= 1e-4
    assert lp.token_logprobs[-1] == pytest.approx(want[-1].max().item(), abs=1e-4)  # the greedy token's
    for t in range(1, len(ids)):  # the top-1 alternative and the prompt's own token
        top = lp.top_logprobs[t]
        assert max(top.values()) == pytest.approx(want[t - 1].max().item(), abs=1e-4)
        assert tok.decode([ids[t]]) in top
    assert out.choices[0].text.startswith(tok.decode(ids))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_echo_logprobs_keep_the_generated_token_when_it_ends_the_sample(client, tok) -> None:
    """lm-eval reads the prompt's scores as ``token_logprobs[ctxlen:-1]``: the last entry must be the one
    generated token even when it is an EOS or stop id (which adds no text), or the prompt's last token
    would be dropped from every score."""
    ids = ids_of(tok, PROMPTS[0])
    body = {"model": "tiny", "prompt": [ids], "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
    first = client.completions.create(**body).choices[0]
    greedy = first.logprobs.token_logprobs[-1]
    assert len(first.logprobs.token_logprobs) == len(ids) + 1
    next_id = ids_of(tok, first.text[len(PROMPTS[0]) :])[0]
    stopped = client.completions.create(**body, extra_body={"stop_token_ids": [next_id]}).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == PROMPTS[0]  # the stop id adds no text
    assert len(stopped.logprobs.token_logprobs) == len(ids) + 1
    assert stopped.logprobs.token_logprobs[-1] == pytest.approx(greedy)
    assert stopped.logprobs.token_logprobs[:-1] == pytest.approx(first.logprobs.token_logprobs[:-1])


def test_echo_without_logprobs_and_streamed(client, tok) -> None:
    body = {"model": "tiny", "prompt": PROMPTS[:2], "max_tokens": 4, "temperature": 0, "echo": True}
    whole = client.completions.create(**body)
    plain = client.completions.create(**{**body, "echo": False})
    for p, prompt in enumerate(PROMPTS[:2]):
        assert whole.choices[p].text == prompt + plain.choices[p].text
    texts = ["", ""]
    for chunk in client.completions.create(**body, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in whole.choices]
    with pytest.raises(openai.BadRequestError, match="echo with logprobs"):
        client.completions.create(**body, logprobs=1, stream=True)


# -- fields clients send ---------------------------------------------------------------------------


def test_response_format_text_is_plain_decoding_and_json_modes_are_refused(client) -> None:
    kwargs = {"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 6}
    plain = client.chat.completions.create(**kwargs, temperature=0)
    text = client.chat.completions.create(**kwargs, temperature=0, response_format={"type": "text"})
    assert text.choices[0].message.content == plain.choices[0].message.content
    for kind in ("json_object", "json_schema"):
        with pytest.raises(openai.BadRequestError, match=f"response_format type '{kind}' is not supported"):
            client.chat.completions.create(**kwargs, response_format={"type": kind})


VLLM_CLIENT_DEFAULTS = {
    "repetition_penalty": 1,
    "min_p": 0,
    "skip_special_tokens": False,
    "tools": [],
    "tool_choice": "none",
    "parallel_tool_calls": True,
    "store": False,
    "metadata": {"run": "eval"},
    "chat_template_kwargs": {},
    "add_generation_prompt": True,
    "reasoning_effort": None,
    "service_tier": "auto",
    "min_tokens": 0,
}


def test_the_neutral_values_vllm_clients_send_are_accepted(server) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 6, "temperature": 0}
    plain = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
    loaded = httpx.post(f"{server.base_url}/v1/chat/completions", json={**body, **VLLM_CLIENT_DEFAULTS}, timeout=60)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "required"),
        ("reasoning_effort", "high"),
        ("store", True),
        ("min_tokens", 3),
        ("chat_template_kwargs", {"tokenize": True}),
        ("repetition_penalty", 0),
        ("min_p", 2),
    ],
)
def test_anything_else_is_a_400_naming_the_field(server, field, value) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, field: value}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert field in response.json()["error"]["message"]


def test_repetition_penalty_and_min_p_are_the_engines(client, model, tok) -> None:
    kwargs = {"repetition_penalty": 1.8, "min_p": 0.3}
    out = client.completions.create(
        model="tiny", prompt=PROMPTS[2], max_tokens=12, temperature=1.0, seed=3, extra_body=kwargs
    )
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=3, **kwargs)
    sample = engine_run(model, tok, ids_of(tok, PROMPTS[2]), params).outputs[0]
    assert out.choices[0].text == final_text(tok, sample.token_ids, sample.finish_reason, sample.stop_reason, params)
    greedy = SamplingParams(temperature=0, max_tokens=12, repetition_penalty=3.0)
    penalised = engine_run(model, tok, ids_of(tok, PROMPTS[2]), greedy).outputs[0].token_ids
    plain = engine_run(model, tok, ids_of(tok, PROMPTS[2]), SamplingParams(temperature=0, max_tokens=12))
    assert penalised != plain.outputs[0].token_ids  # the penalty changes what greedy picks here


def test_skip_special_tokens_drops_the_delimiters_but_keeps_the_reasoning_split(client, tok) -> None:
    prompt = "<|im_start|>user\nSTREAM a3<|im_end|>\n<|im_start|>assistant\n<think>\n<|block_start|>"
    kwargs = {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0, "echo": True}
    kept = client.completions.create(**kwargs).choices[0].text
    skipped = client.completions.create(**kwargs, extra_body={"skip_special_tokens": True}).choices[0].text
    assert "<|block_start|>" in kept and "<|im_start|>" in kept
    assert skipped == tok.decode(ids_of(tok, kept), skip_special_tokens=True)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(**kwargs, stream=True, extra_body={"skip_special_tokens": True})
        if c.choices
    )
    assert streamed == skipped
    # (the chat's split with skipped delimiters: test_serve_text.py, on text that has <think>)


def test_the_chat_template_switches_reach_the_template(client) -> None:
    kwargs = {"model": "tiny", "messages": [{"role": "user", "content": "STREAM a3"}], "max_tokens": 2}
    with_prompt = client.chat.completions.create(**kwargs)
    without = client.chat.completions.create(**kwargs, extra_body={"add_generation_prompt": False})
    assert with_prompt.usage.prompt_tokens > without.usage.prompt_tokens
    extra = client.chat.completions.create(**kwargs, extra_body={"chat_template_kwargs": {"unused_switch": 1}})
    assert extra.usage.prompt_tokens == with_prompt.usage.prompt_tokens  # an unknown switch changes nothing
