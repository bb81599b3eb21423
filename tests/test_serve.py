"""`memento serve` driven by the real `openai` client over loopback: completions, chat, streaming,
logprobs (equal to the engine's), errors, limits, disconnects, a bounded load test, shutdown."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from helpers import tiny_model
from memento.engine import EngineConfig, LLMEngine, SamplingParams
from memento.serve.server import build_app, start_in_thread
from memento.serve.text import final_text, reasoning_token_count, think_token_ids
from memento.tiny_tokenizer import build_tiny_tokenizer

PROMPT = "STREAM a3 c9 x4 n22"
CONFIG = {"kv_budget_tokens": 2048, "max_num_seqs": 16, "keep_last_n": 0}


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok, seed=3)


@pytest.fixture(scope="module")
def server(model, tok):
    app = build_app(model, EngineConfig.from_options(**CONFIG), tokenizer=tok, model_name="tiny")
    running = start_in_thread(app)
    yield running, app.state.memento.async_engine
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    running, _ = server
    return openai.OpenAI(base_url=f"{running.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def engine_run(model, tok, prompt_ids: list[int], params: SamplingParams):
    """The same request through the engine directly (the reference for text and logprobs)."""
    engine = LLMEngine(model, tok, EngineConfig.from_options(**CONFIG))
    rid = engine.add_request(prompt_ids, params)
    return next(r for r in engine.run_to_completion() if r.request_id == rid)


def chat_ids(tok, text: str) -> list[int]:
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tok(rendered, add_special_tokens=False)["input_ids"]


def wait_for_empty_pool(engine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.engine.pool.num_used == 0 and engine.pending == 0 and not engine.engine.has_unfinished():
            return
        time.sleep(0.02)
    raise AssertionError(
        f"KV pool not empty: {engine.engine.pool.num_used} slots used, {engine.pending} requests pending"
    )


# -- happy paths -------------------------------------------------------------------------------


def test_models_and_health(client, server) -> None:
    running, _ = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{running.base_url}/health").json() == {"status": "ok"}


def test_completion_equals_the_engine_and_reports_kv_usage(client, model, tok) -> None:
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    params = SamplingParams(temperature=0, max_tokens=12)
    ref = engine_run(model, tok, ids, params).outputs[0]
    assert out.choices[0].text == final_text(tok, ref.token_ids, ref.finish_reason, ref.stop_reason, params)
    usage = out.usage
    assert usage.prompt_tokens == len(ids) and usage.completion_tokens == len(ref.token_ids)
    assert usage.total_tokens == len(ids) + len(ref.token_ids)
    assert usage.model_extra["peak_kv_tokens"] == ref.kv.peak
    assert usage.model_extra["evicted_tokens"] == ref.kv.evicted_tokens
    assert usage.prompt_tokens_details is None and usage.completion_tokens_details is None  # as vLLM's
    assert out.choices[0].finish_reason in ("stop", "length")


def test_completion_logprobs_equal_the_engines(client, model, tok) -> None:
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0.8, seed=11, logprobs=3)
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    ref = engine_run(model, tok, ids, SamplingParams(temperature=0.8, max_tokens=10, seed=11, logprobs=3))
    sample = ref.outputs[0]
    lp = out.choices[0].logprobs
    n = len(lp.token_logprobs)
    assert n == len(sample.token_ids)  # a final EOS too (it has no text): vLLM's completions do the same
    assert lp.token_logprobs == pytest.approx(sample.logprobs[:n], abs=1e-6)
    assert lp.tokens == [tok.decode([t]) for t in sample.token_ids[:n]]
    for top, ref_top in zip(lp.top_logprobs, sample.top_logprobs[:n], strict=True):
        assert len(top) == len({tok.decode([t]) for t in ref_top})
        assert sorted(top.values()) == pytest.approx(sorted(ref_top.values()), abs=1e-6)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs_equal_the_engines_and_reasoning_is_split(client, model, tok) -> None:
    out = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=10,
        temperature=1.0,
        seed=5,
        logprobs=True,
        top_logprobs=2,
    )
    ref = engine_run(
        model, tok, chat_ids(tok, PROMPT), SamplingParams(temperature=1.0, max_tokens=10, seed=5, logprobs=2)
    )
    sample = ref.outputs[0]
    content = out.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(sample.logprobs[: len(content)], abs=1e-6)
    assert all(len(c.top_logprobs) == 2 for c in content)
    assert content[0].bytes == list(content[0].token.encode())
    message = out.choices[0].message
    text = final_text(tok, sample.token_ids, sample.finish_reason, sample.stop_reason, SamplingParams())
    reasoning = message.model_extra["reasoning"] or ""
    assert message.model_extra["reasoning_content"] == message.model_extra["reasoning"]  # both names, one value
    assert reasoning + (message.content or "") == text.replace("<think>", "").replace("</think>", "").strip("\n")
    assert out.usage.completion_tokens_details.reasoning_tokens == reasoning_token_count(
        sample.token_ids, think_token_ids(tok)
    )


def test_an_answer_sent_back_whole_is_accepted(client) -> None:
    """Clients echo the assistant's answer with its reasoning, under either name; the model never sees it."""
    answer = {"role": "assistant", "content": "5", "reasoning": "2+3", "reasoning_content": "2+3"}
    messages = [{"role": "user", "content": PROMPT}, answer, {"role": "user", "content": PROMPT}]
    kwargs = {"model": "tiny", "max_tokens": 4, "temperature": 0}
    with_reasoning = client.chat.completions.create(messages=messages, **kwargs)
    without = client.chat.completions.create(
        messages=[*messages[:1], {"role": "assistant", "content": "5"}, *messages[2:]], **kwargs
    )
    assert with_reasoning.choices[0].message.content == without.choices[0].message.content


def test_streaming_gives_the_same_text_as_one_response(client) -> None:
    kwargs = {"model": "tiny", "prompt": PROMPT, "max_tokens": 16, "temperature": 0}
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == whole and len(chunks) > 2
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1


def test_chat_streaming_matches_the_chat_response(client) -> None:
    kwargs = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16, "temperature": 0}
    whole = client.chat.completions.create(**kwargs).choices[0].message
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        assert extra.get("reasoning_content") == extra.get("reasoning")  # both names, one value
        reasoning += extra.get("reasoning") or ""
        content += delta.content or ""
    assert reasoning == (whole.model_extra["reasoning"] or "") and reasoning == (
        whole.model_extra["reasoning_content"] or ""
    )
    assert content == (whole.content or "")


def test_n_samples_and_stop_strings(client) -> None:
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, n=3, seed=2)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    again = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, n=3, seed=2)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # seeded: reproducible
    greedy = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    stop = greedy[4:6]
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == greedy[: greedy.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


# -- errors ------------------------------------------------------------------------------------


def test_bad_json_is_a_400_error_object(server) -> None:
    running, _ = server
    response = httpx.post(
        f"{running.base_url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"prompt": "x" * 3000}, "KV budget"),
        ({"extra_body": {"top_k": -5}}, "top_k"),
    ],
)
def test_invalid_requests_are_400s_that_say_why(client, kwargs, needle) -> None:
    request = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**request)
    assert info.value.status_code == 400
    assert needle in info.value.body["message"]


def test_unknown_model_is_a_404(client) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-9", prompt=PROMPT, max_tokens=2)


def test_metrics_are_prometheus_text(server, client) -> None:
    running, _ = server
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3)
    text = httpx.get(f"{running.base_url}/metrics").text
    for name in (
        "memento_kv_pool_used_tokens",
        "memento_kv_pool_capacity_tokens 2048.0",
        "memento_queue_length",
        "memento_evictions_total",
        "memento_preemptions_total",
        "memento_generated_tokens_total",
        'memento_http_requests_total{route="/v1/completions",status="200"}',
    ):
        assert name in text, name


# -- limits, disconnects, load, shutdown -------------------------------------------------------


def test_a_client_gone_mid_stream_frees_its_kv(server) -> None:
    running, engine = server
    body = {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": 400,
        "temperature": 1.0,
        "ignore_eos": True,
        "stream": True,
    }
    cancelled_before = engine.engine.stats.cancelled
    with httpx.stream("POST", f"{running.base_url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
        assert engine.engine.pool.num_used > 0
    wait_for_empty_pool(engine)
    assert engine.engine.stats.cancelled == cancelled_before + 1


def test_a_full_queue_answers_429(model, tok) -> None:
    app = build_app(
        model, EngineConfig.from_options(**CONFIG), tokenizer=tok, model_name="tiny", max_pending_requests=1
    )
    running = start_in_thread(app)
    try:
        client = openai.OpenAI(base_url=f"{running.base_url}/v1", api_key="x", max_retries=0)
        stream = client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=300, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(stream))
        with pytest.raises(openai.RateLimitError, match="in flight"):
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        stream.close()
    finally:
        running.stop()


# Abandoning a stream leaves async generators inside the openai/httpx client to the garbage
# collector, which may finalise them on another thread and print "async generator already
# executing": the client's noise, not the server's (its failures would show in ``errors``).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_bounded_load_with_cancellations_leaks_nothing(server) -> None:
    """300 requests, 48 at a time, every 5th cancelled mid-stream: no unexpected error, no leaked slot."""
    running, engine = server
    client = openai.AsyncOpenAI(base_url=f"{running.base_url}/v1", api_key="x", max_retries=0, timeout=120)
    errors: list[str] = []

    async def one(i: int, gate: asyncio.Semaphore) -> str:
        async with gate:
            try:
                if i % 5 == 0:
                    stream = await client.completions.create(
                        model="tiny",
                        prompt=f"{PROMPT} {i}",
                        max_tokens=64,
                        stream=True,
                        extra_body={"ignore_eos": True},
                    )
                    async with stream:  # leaving it closes the connection mid-stream
                        chunks = stream.__aiter__()
                        await chunks.__anext__()
                        await chunks.aclose()  # closed here, not by the garbage collector later
                    return "cancelled"
                if i % 3 == 0:
                    out = await client.chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": f"{PROMPT} {i}"}], max_tokens=8 + i % 17
                    )
                    return out.choices[0].finish_reason
                out = await client.completions.create(
                    model="tiny", prompt=f"{PROMPT} {i}", max_tokens=8 + i % 33, temperature=1.0, seed=i
                )
                return out.choices[0].finish_reason
            except Exception as exc:  # every failure is unexpected here
                errors.append(f"{i}: {type(exc).__name__}: {exc}")
                return "error"

    async def main() -> list[str]:
        gate = asyncio.Semaphore(48)
        try:
            return await asyncio.gather(*(one(i, gate) for i in range(300)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert errors == []
    assert results.count("cancelled") == 60
    assert set(results) <= {"cancelled", "stop", "length"}
    wait_for_empty_pool(engine)


def test_shutdown_finishes_requests_in_flight(model, tok) -> None:
    app = build_app(model, EngineConfig.from_options(**CONFIG), tokenizer=tok, model_name="tiny", shutdown_timeout=10)
    engine = app.state.memento.async_engine
    running = start_in_thread(app)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 60, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{running.base_url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        next(lines)
        running.server.should_exit = True  # like SIGTERM: stop accepting, let this one finish
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    final = json.loads(rest[-2].removeprefix("data: "))["choices"][0]
    assert final["finish_reason"] == "length"
    running.thread.join(30)
    assert not running.thread.is_alive()
    assert engine.engine.pool.num_used == 0 and not engine.accepting


def test_a_saved_checkpoint_serves_under_its_directory_name(model, tok, tmp_path) -> None:
    path = tmp_path / "memento-model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    running = start_in_thread(build_app(path, EngineConfig.from_options(**CONFIG)))
    try:
        client = openai.OpenAI(base_url=f"{running.base_url}/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["memento-model"]
        out = client.chat.completions.create(
            model="memento-model", messages=[{"role": "user", "content": PROMPT}], max_tokens=5, temperature=0
        )
        assert out.usage.completion_tokens >= 1
    finally:
        running.stop()


def test_serve_cli_refuses_a_missing_model(tmp_path) -> None:
    from typer.testing import CliRunner

    from memento.cli import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such file" in result.output


def test_a_non_streaming_client_that_gives_up_frees_its_kv(server) -> None:
    running, engine = server
    cancelled_before = engine.engine.stats.cancelled
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{running.base_url}/v1/completions", json=body, timeout=0.5)
    wait_for_empty_pool(engine)
    assert engine.engine.stats.cancelled == cancelled_before + 1


def test_draining_answers_503_and_health_says_so(model, tok) -> None:
    app = build_app(model, EngineConfig.from_options(**CONFIG), tokenizer=tok, model_name="tiny")
    engine = app.state.memento.async_engine
    running = start_in_thread(app)
    try:
        assert asyncio.run(engine.drain(timeout=1.0)) == 0  # nothing in flight: drains at once
        assert httpx.get(f"{running.base_url}/health").json() == {"status": "draining"}
        client = openai.OpenAI(base_url=f"{running.base_url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        assert info.value.status_code == 503 and "shutting down" in info.value.body["message"]
    finally:
        running.stop()


# ----------------------------------------------------------------------------------------------
# One request never takes the server down (issue 16)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extreme",
    [
        {"temperature": 1e-300},
        {"temperature": 1e-45},
        {"temperature": 5e-324},
        {"temperature": 2.0, "top_p": 1e-300},
    ],
    ids=["t1e-300", "t1e-45", "t5e-324", "t2-top_p1e-300"],
)
@pytest.mark.parametrize("stream", [False, True], ids=["full", "stream"])
def test_extreme_but_valid_sampling_gets_a_normal_answer(server, client, extreme, stream) -> None:
    running, engine = server
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "stream": stream, **extreme}
    response = httpx.post(f"{running.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    if stream:
        assert response.text.rstrip().endswith("data: [DONE]") and '"error"' not in response.text
    else:
        assert response.json()["choices"][0]["finish_reason"] == "length"
    # the next request, from anyone, is served normally
    after = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    assert after.choices[0].finish_reason == "length"
    assert httpx.get(f"{running.base_url}/health").json() == {"status": "ok"}
    wait_for_empty_pool(engine)


@pytest.mark.parametrize("stream", [False, True], ids=["full", "stream"])
def test_an_engine_failure_in_one_request_is_a_500_for_it_alone(model, tok, monkeypatch, stream) -> None:
    from memento.engine import engine as engine_module

    real = engine_module.sample_tokens

    def poisoned(logits, params, generators, histories=None):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("numerical failure in one row")
        return real(logits, params, generators, histories)

    monkeypatch.setattr(engine_module, "sample_tokens", poisoned)
    app = build_app(model, EngineConfig.from_options(**CONFIG), tokenizer=tok, model_name="tiny")
    running = start_in_thread(app)
    try:
        url = f"{running.base_url}/v1/completions"
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "seed": 666, "stream": stream}
        bad = httpx.post(url, json=body, timeout=60)
        if stream:
            assert bad.status_code == 200  # the stream had started: the error comes as its last event
            assert '"type": "server_error"' in bad.text and "numerical failure in one row" in bad.text
        else:
            assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
            assert "numerical failure in one row" in bad.json()["error"]["message"]
        good = httpx.post(url, json={**body, "seed": 1, "stream": False}, timeout=60)
        assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] == "length"
        assert httpx.get(f"{running.base_url}/health").json() == {"status": "ok"}
        wait_for_empty_pool(app.state.memento.async_engine)
    finally:
        running.stop()
