"""memento.data.llm against a scripted OpenAI-compatible server: retries per fault kind, give-up and
no-retry paths, validation, the on-disk cache, the concurrency limit, Retry-After, cost accounting."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from memento.data.llm import LLMClient, LLMConfig, LLMError, cache_key
from scripted_llm import ScriptedLLM, count_tokens

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


def config(server: ScriptedLLM, **overrides) -> LLMConfig:
    """Test settings: tiny backoff, short timeout, no API key."""
    settings = {
        "base_url": server.base_url,
        "model": "m",
        "api_key_env": None,
        "max_retries": 3,
        "timeout_s": 2.0,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
    }
    settings.update(overrides)
    return LLMConfig(**settings)


def run_chats(cfg: LLMConfig, calls: list[dict]):
    """Run ``chat(**kw)`` for each kw concurrently on one client; return (results or exceptions, stats)."""

    async def main():
        async with LLMClient(cfg) as client:
            results = await asyncio.gather(*(client.chat(**kw) for kw in calls), return_exceptions=True)
        return results, client.stats

    return asyncio.run(main())


def chat_once(cfg: LLMConfig, **kw):
    results, stats = run_chats(cfg, [{"messages": MESSAGES, **kw}])
    return results[0], stats


def test_success_path(monkeypatch):
    monkeypatch.setenv("TEST_LLM_KEY", "sk-test")
    with ScriptedLLM() as server:
        result, stats = chat_once(config(server, api_key_env="TEST_LLM_KEY", max_tokens=64, extra_body={"top_p": 0.5}))
        assert result.text == "echo: hello there"
        assert result.parsed is None and not result.cached and result.attempts == 1
        assert result.finish_reason == "stop"
        assert result.usage["prompt_tokens"] == 4 and result.usage["completion_tokens"] == 3
        (call,) = server.calls
        assert call.headers["authorization"] == "Bearer sk-test"
        assert call.body["model"] == "m" and call.body["messages"] == MESSAGES
        assert call.body["temperature"] == 0.0 and call.body["max_tokens"] == 64 and call.body["top_p"] == 0.5
    assert stats.requests == 1 and stats.successes == 1 and stats.retries == 0 and stats.failures == 0
    assert stats.status_codes == {200: 1}


def test_no_key_means_no_authorization_header(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with ScriptedLLM() as server:
        chat_once(config(server, api_key_env="OPENAI_API_KEY"))
        assert "authorization" not in server.calls[0].headers


@pytest.mark.parametrize("fault", ["429", "500", "503", "timeout", "truncated", "garbage", "empty"])
def test_each_fault_is_retried_then_succeeds(fault):
    with ScriptedLLM(faults=[fault, fault], hang_s=3.0) as server:
        result, stats = chat_once(config(server, timeout_s=0.3))
        assert server.faults_served == [fault, fault, "ok"]
    assert result.text == "echo: hello there" and result.attempts == 3
    assert stats.requests == 3 and stats.retries == 2 and stats.failures == 0 and stats.successes == 1
    expected_kind = {"timeout": "timeout", "truncated": "malformed", "garbage": "malformed", "empty": "malformed"}
    assert stats.errors == {expected_kind.get(fault, f"http_{fault}"): 2}


def test_exhausted_retries_raise_naming_the_cause(tmp_path):
    with ScriptedLLM(faults=lambda i, body: "503") as server:
        error, stats = chat_once(config(server, max_retries=2, cache_dir=tmp_path))
        assert server.call_count == 3
    assert isinstance(error, LLMError)
    assert error.attempts == 3 and error.status == 503 and error.kind == "http_503"
    assert "HTTP 503" in str(error) and "HTTP 503" in error.cause and "3 attempts" in str(error)
    assert stats.retries == 2 and stats.failures == 1 and stats.successes == 0
    assert not list(tmp_path.rglob("*.json"))  # failures are never cached


@pytest.mark.parametrize("status", ["400", "401", "404"])
def test_client_errors_are_not_retried(status):
    with ScriptedLLM(faults=[status, "ok"]) as server:
        error, stats = chat_once(config(server))
        assert server.call_count == 1
    assert isinstance(error, LLMError) and error.status == int(status) and error.attempts == 1
    assert "not retryable" in str(error)
    assert stats.retries == 0 and stats.failures == 1 and stats.status_codes == {int(status): 1}


def test_validator_rejection_is_retried_then_accepted():
    answers = iter(["not json", "{also not", '{"ok": true}'])
    with ScriptedLLM(responder=lambda body: next(answers)) as server:
        result, stats = chat_once(config(server), validate=json.loads)
        assert server.call_count == 3
    assert result.parsed == {"ok": True} and result.attempts == 3
    assert stats.retries == 2 and stats.errors == {"invalid": 2}


def test_validator_rejection_exhausted_is_a_failure(tmp_path):
    with ScriptedLLM(responder=lambda body: "never json") as server:
        error, stats = chat_once(config(server, max_retries=2, cache_dir=tmp_path), validate=json.loads)
        assert server.call_count == 3
    assert isinstance(error, LLMError) and error.kind == "invalid" and "JSONDecodeError" in error.cause
    assert isinstance(error.__cause__, json.JSONDecodeError)
    assert stats.failures == 1 and stats.successes == 0
    assert not list(tmp_path.rglob("*.json"))


def test_cache_hit_makes_no_http_call_and_misses_on_any_change(tmp_path):
    other = [{"role": "user", "content": "something else"}]
    with ScriptedLLM() as server:
        cfg = config(server, cache_dir=tmp_path)
        results, stats = run_chats(cfg, [{"messages": MESSAGES}])
        assert server.call_count == 1 and not results[0].cached
        # Sequential, on one client: the repeat is a hit; a changed temperature, max_tokens, extra
        # field or message list is a different request.
        variants = [
            {"messages": MESSAGES},
            {"messages": MESSAGES, "temperature": 0},  # 0 and 0.0 are the same request
            {"messages": MESSAGES, "temperature": 0.7},
            {"messages": MESSAGES, "max_tokens": 5},
            {"messages": MESSAGES, "seed": 1},
            {"messages": other},
        ]

        async def main():
            async with LLMClient(cfg) as client:
                return [await client.chat(**kw) for kw in variants], client.stats

        results, stats = asyncio.run(main())
        assert [r.cached for r in results] == [True, True, False, False, False, False]
        assert server.call_count == 1 + 4
        assert results[0].attempts == 0 and results[0].text == "echo: hello there" and results[0].usage["prompt_tokens"]
        assert stats.cache_hits == 2 and stats.requests == 4
        assert server.calls[-2].body["seed"] == 1 and "seed" not in server.calls[-1].body

        # The cache survives the client: a new client (and a new server) answers all of it from disk.
        calls_before = server.call_count
    with ScriptedLLM() as fresh:
        cfg2 = config(fresh, cache_dir=tmp_path)
        cfg2.base_url = cfg.base_url  # same endpoint name -> same keys; the old server is gone
        results, stats = run_chats(cfg2, [{"messages": MESSAGES}, *variants[2:]])
        assert all(r.cached for r in results) and stats.requests == 0 and fresh.call_count == 0
    assert calls_before == 5


def test_cache_files_are_complete_json(tmp_path):
    with ScriptedLLM() as server:
        cfg = config(server, cache_dir=tmp_path, max_concurrency=8)
        prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(20)]
        results, _ = run_chats(cfg, [{"messages": m} for m in prompts])
        assert not any(isinstance(r, Exception) for r in results)
    files = sorted(tmp_path.rglob("*"))
    entries = [p for p in files if p.is_file()]
    assert len(entries) == 20 and all(p.suffix == ".json" and not p.name.startswith(".") for p in entries)
    for i, messages in enumerate(prompts):
        key = cache_key(cfg.base_url, "m", messages, 0.0, None, {})
        path = tmp_path / key[:2] / f"{key}.json"
        entry = json.loads(path.read_text())
        assert entry["text"] == f"echo: question {i}" and entry["key"] == key
        assert entry["usage"]["completion_tokens"] == 3 and entry["request"]["messages"] == messages


def test_corrupt_cache_entry_is_a_miss(tmp_path):
    with ScriptedLLM() as server:
        cfg = config(server, cache_dir=tmp_path)
        key = cache_key(cfg.base_url, "m", MESSAGES, 0.0, None, {})
        path = tmp_path / key[:2] / f"{key}.json"
        path.parent.mkdir(parents=True)
        path.write_text('{"text": "torn')
        result, _ = chat_once(cfg)
        assert not result.cached and server.call_count == 1
        assert json.loads(path.read_text())["text"] == "echo: hello there"  # rewritten whole


def test_concurrency_limit_is_respected():
    with ScriptedLLM(latency=0.05) as server:
        cfg = config(server, max_concurrency=4)
        results, stats = run_chats(cfg, [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(40)])
        assert [r.text for r in results] == [f"echo: q{i}" for i in range(40)]
        assert 3 <= server.peak_concurrency <= 4
    assert stats.requests == 40


def test_retry_after_is_a_floor():
    with ScriptedLLM(faults=["429:0.4"]) as server:
        start = time.monotonic()
        result, stats = chat_once(config(server))
        waited = time.monotonic() - start
        assert result.attempts == 2 and stats.status_codes == {429: 1, 200: 1}
        gap = server.calls[1].started - server.calls[0].finished
    assert waited >= 0.4 and gap >= 0.35  # backoff alone would be <= 0.05 s


def test_cost_accounting(tmp_path):
    with ScriptedLLM(faults=["500", "ok", "ok"]) as server:
        cfg = config(server, price_per_1k_prompt=1.5, price_per_1k_completion=4.0, cache_dir=tmp_path)
        prompts = [[{"role": "user", "content": "one two three"}], [{"role": "user", "content": "four five"}]]
        results, stats = run_chats(cfg, [{"messages": m} for m in prompts])
        prompt_tokens = sum(count_tokens(m[0]["content"]) for m in prompts)
        completion_tokens = sum(count_tokens(r.text) for r in results)
        assert stats.prompt_tokens == prompt_tokens and stats.completion_tokens == completion_tokens
        assert stats.cost == pytest.approx(prompt_tokens / 1000 * 1.5 + completion_tokens / 1000 * 4.0)
        # Cache hits are free.
        _, again = run_chats(cfg, [{"messages": m} for m in prompts])
    assert again.cache_hits == 2 and again.cost == 0 and again.prompt_tokens == 0


def test_rejected_answers_are_still_billed():
    answers = iter(["x y", '"ok"'])
    with ScriptedLLM(responder=lambda body: next(answers)) as server:
        result, stats = chat_once(config(server, price_per_1k_completion=1000.0), validate=json.loads)
        assert server.call_count == 2
    assert result.parsed == "ok" and stats.completion_tokens == 3 and stats.cost == pytest.approx(3.0)  # 1 per token


def test_use_outside_context_manager_fails():
    client = LLMClient(LLMConfig(base_url="http://127.0.0.1:9/v1", model="m"))
    with pytest.raises(RuntimeError, match="async with"):
        asyncio.run(client.chat(MESSAGES))


def test_connection_refused_is_retried_then_fails():
    with ScriptedLLM() as server:
        url = server.base_url
    # The server is gone: every attempt is refused.
    cfg = LLMConfig(base_url=url, model="m", api_key_env=None, max_retries=2, backoff_base_s=0.01, timeout_s=1)
    error, stats = chat_once(cfg)
    assert isinstance(error, LLMError) and error.kind == "connection" and error.attempts == 3
    assert stats.errors == {"connection": 3}


def test_the_client_uses_its_whole_concurrency_budget():
    """With more calls than the limit, the limit is reached (and never passed). The rate itself is
    measured by benchmarks/llm_concurrency.py, not here: timing belongs in benchmarks."""
    n, limit = 64, 32
    with ScriptedLLM(latency=0.2) as server:
        results, stats = run_chats(
            config(server, max_concurrency=limit),
            [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(n)],
        )
        assert server.peak_concurrency == limit
    assert not any(isinstance(r, Exception) for r in results) and stats.requests == n


def test_cache_key_is_canonical():
    a = cache_key("http://x/v1/", "m", [{"role": "user", "content": "hi"}], 0, None, {"b": 1, "a": 2})
    b = cache_key("http://x/v1", "m", [{"content": "hi", "role": "user"}], 0.0, None, {"a": 2, "b": 1})
    assert a == b and len(a) == 64
    assert a != cache_key("http://x/v1", "m2", [{"role": "user", "content": "hi"}], 0, None, {"b": 1, "a": 2})


def test_config_validation(tmp_path):
    with pytest.raises(ValueError):
        LLMConfig(base_url="http://x", model="m", max_concurrency=0)
    assert isinstance(LLMConfig(base_url="http://x", model="m", cache_dir=str(tmp_path)).cache_dir, Path)
