"""A soak test of `memento serve` (issue 16: one request must never take the server down).

A few thousand requests over loopback, 32 at a time, mixing valid requests, invalid ones (400/404),
cancelled ones (the client goes away mid-stream, or while waiting for a whole answer) and
extreme-but-valid ones (temperatures 1e-300 / 5e-324, temperature 2 with top_p 1e-300, max_tokens 1,
n up to 4, stop strings, logprobs). Afterwards /health is ok, the KV pool is empty, every valid request
that was not cancelled got a complete answer (a response the OpenAPI document describes, every
choice finished; or a stream of chunks ending in [DONE]) and no response was a 5xx.

Slow (about a minute on 2 cores): ``pytest -m slow tests/test_serve_soak.py -s`` prints the counts.
``MEMENTO_SOAK_REQUESTS`` changes the number of requests.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import jsonschema_rs
import pytest

from helpers import running_tiny_server
from test_serve import wait_for_empty_pool

pytestmark = pytest.mark.slow

REQUESTS = int(os.environ.get("MEMENTO_SOAK_REQUESTS", "4000"))
CONCURRENCY = 32
CONFIG = {"kv_budget_tokens": 2048, "max_num_seqs": 16, "keep_last_n": 0}
KINDS = {"valid": 35, "stream": 20, "extreme": 15, "invalid": 14, "cancel_stream": 8, "cancel_wait": 8}
"""The mix, in percent."""
EXTREMES = [
    {"temperature": 1e-300},
    {"temperature": 5e-324},
    {"temperature": 2.0, "top_p": 1e-300},
    {"temperature": 1e-300, "top_p": 1e-300, "top_k": 1},
    {"temperature": 2.0, "top_p": 1e-300, "max_tokens": 1},
]
INVALID: list[tuple[str, Any, int, str]] = [  # route, body (bytes: sent as is), status, words of the message
    ("/v1/completions", {"prompt": ""}, 400, "prompt is empty"),
    ("/v1/completions", {"prompt": "x", "temperature": 5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", b"{not json", 400, "JSON"),
    ("/v1/completions", b"\xff\xfe{", 400, "JSON"),
    ("/v1/completions", {"prompt": [5, 100000]}, 400, "vocabulary"),
    ("/v1/completions", {"prompt": "x" * 3000}, 400, "KV budget"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-9"}, 404, "does not exist"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
]


@dataclass
class Outcome:
    index: int
    kind: str
    status: int | None = None  # None: no answer (cancelled before the headers)
    complete: bool = False  # a complete answer (200 finished, or a stream ending in [DONE])
    problems: list[str] = field(default_factory=list)


def _prompt(rng: random.Random) -> str:
    return " ".join(
        rng.choice(["STREAM", "a3", "c9", "x4", "n22", "sum", "7+5", "=", "q"]) for _ in range(rng.randint(2, 9))
    )


def _sampling(rng: random.Random, chat: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "max_tokens": rng.choice([1, 2, 4, 8, 16]),
        "n": rng.choice([1, 1, 2, 3, 4]),
        "temperature": rng.choice([0, 0.7, 1.0, 2.0]),
        "seed": rng.randrange(2**31),
    }
    if rng.random() < 0.3:
        body["top_p"] = rng.choice([0.1, 0.9, 1e-300])
    if rng.random() < 0.3:
        body["stop"] = rng.sample(["a", "c", "\n", " x", "q="], rng.randint(1, 3))
    if rng.random() < 0.3:
        if chat:
            body.update(logprobs=True, top_logprobs=rng.randint(0, 5))
        else:
            body["logprobs"] = rng.randint(0, 5)
    return body


def _request(i: int, kind: str, rng: random.Random) -> tuple[str, Any]:
    """The route and body (a dict, or bytes sent as they are) of request ``i``."""
    if kind == "invalid":
        route, body, _, _ = INVALID[i % len(INVALID)]
        return route, body
    chat = rng.random() < 0.4
    route = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": "tiny", **_sampling(rng, chat)}
    if chat:
        body["messages"] = [{"role": "user", "content": _prompt(rng)}]
    else:
        body["prompt"] = _prompt(rng)
    if kind == "extreme":
        body.update(EXTREMES[i % len(EXTREMES)])
        body["stream"] = rng.random() < 0.5
    elif kind == "stream":
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    elif kind in ("cancel_stream", "cancel_wait"):
        body.update(max_tokens=2000, ignore_eos=True, n=rng.choice([1, 2]), stream=kind == "cancel_stream")
        if kind == "cancel_wait" and rng.random() < 0.3:
            body["stream"] = True  # gone before its first event
    return route, body


class Soak:
    def __init__(self, base_url: str, doc: dict) -> None:
        self.base_url = base_url
        components = doc["components"]
        self.schemas = {
            name: jsonschema_rs.validator_for({"$ref": f"#/components/schemas/{name}", "components": components})
            for name in ("CompletionResponse", "ChatCompletionResponse", "ErrorResponse")
        }

    async def one(self, client: httpx.AsyncClient, gate: asyncio.Semaphore, i: int, kind: str) -> Outcome:
        rng = random.Random(i)
        route, body = _request(i, kind, rng)
        outcome = Outcome(i, kind)
        async with gate:
            try:
                if kind == "cancel_wait":
                    await self.cancelled_wait(client, route, body, outcome, rng)
                elif isinstance(body, dict) and body.get("stream"):
                    await self.stream(client, route, body, outcome, rng)
                else:
                    await self.full(client, route, body, outcome)
            except Exception as exc:  # no exception is expected: every one is a problem
                outcome.problems.append(f"{type(exc).__name__}: {exc}")
        return outcome

    async def full(self, client: httpx.AsyncClient, route: str, body: Any, outcome: Outcome) -> None:
        if isinstance(body, bytes):
            response = await client.post(route, content=body, headers={"content-type": "application/json"})
        else:
            response = await client.post(route, json=body)
        outcome.status = response.status_code
        payload = response.json()
        if outcome.kind == "invalid":
            _, _, status, words = INVALID[outcome.index % len(INVALID)]
            if response.status_code != status or words not in payload.get("error", {}).get("message", ""):
                outcome.problems.append(f"expected {status} '{words}', got {response.status_code}: {response.text}")
            elif not self.schemas["ErrorResponse"].is_valid(payload):
                outcome.problems.append(f"not an error object: {response.text}")
            return
        if response.status_code != 200:
            outcome.problems.append(f"{response.status_code}: {response.text[:300]}")
            return
        schema = "ChatCompletionResponse" if "chat" in route else "CompletionResponse"
        if not self.schemas[schema].is_valid(payload):
            outcome.problems.append(f"not a {schema}: {response.text[:300]}")
        choices = payload["choices"]
        if sorted(c["index"] for c in choices) != list(range(body["n"])) or not all(
            c["finish_reason"] for c in choices
        ):
            outcome.problems.append(f"incomplete: {response.text[:300]}")
        outcome.complete = not outcome.problems

    async def stream(
        self, client: httpx.AsyncClient, route: str, body: dict, outcome: Outcome, rng: random.Random
    ) -> None:
        leave_after = rng.randint(1, 6) if outcome.kind == "cancel_stream" else None
        events: list[str] = []
        async with client.stream("POST", route, json=body) as response:
            outcome.status = response.status_code
            if response.status_code != 200:
                outcome.problems.append(f"{response.status_code}: {(await response.aread())[:300]!r}")
                return
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    if leave_after is not None and len(events) >= leave_after:
                        return  # the client goes away mid-stream: the connection is closed here
        if leave_after is not None:
            outcome.complete = True  # it finished before the client left: a complete answer all the same
        if not events or events[-1] != "[DONE]":
            outcome.problems.append(f"the stream did not end in [DONE]: {events[-2:]}")
            return
        chunks = [json.loads(e) for e in events[:-1]]
        if errors := [c for c in chunks if "error" in c]:
            outcome.problems.append(f"error event: {errors[0]}")
        finished = {c["index"] for chunk in chunks for c in chunk["choices"] if c.get("finish_reason")}
        if finished != set(range(body["n"])):
            outcome.problems.append(f"samples finished: {sorted(finished)} of {body['n']}")
        if body.get("stream_options") and not (chunks and chunks[-1].get("usage")):
            outcome.problems.append("no usage chunk")
        outcome.complete = not outcome.problems

    async def cancelled_wait(
        self, client: httpx.AsyncClient, route: str, body: dict, outcome: Outcome, rng: random.Random
    ) -> None:
        """The client gives up while waiting (for the whole answer, or a stream's first event)."""
        send = client.post(route, json=body)
        try:
            response = await asyncio.wait_for(send, timeout=rng.uniform(0.02, 0.5))
        except TimeoutError:
            return  # cancelled: httpx closes the connection, the server aborts the request
        outcome.status = response.status_code  # finished in time (a stream's whole body was read)
        if response.status_code != 200:
            outcome.problems.append(f"{response.status_code}: {response.text[:300]}")


@pytest.fixture(scope="module")
def server():
    with running_tiny_server(**CONFIG) as served:
        yield served


# A client that leaves a stream early leaves httpx's async generators to the garbage collector, which
# may print "async generator ignored GeneratorExit": the client's noise (the server's would show here).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_soak_many_requests_valid_invalid_cancelled_and_extreme(server) -> None:
    running, engine = server
    doc = httpx.get(f"{running.base_url}/openapi.json").json()
    soak = Soak(running.base_url, doc)
    rng = random.Random(16)
    kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=REQUESTS)
    cancelled_before = engine.engine.stats.cancelled

    async def main() -> list[Outcome]:
        gate = asyncio.Semaphore(CONCURRENCY)
        limits = httpx.Limits(max_connections=CONCURRENCY * 2, max_keepalive_connections=CONCURRENCY)
        async with httpx.AsyncClient(base_url=running.base_url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(soak.one(client, gate, i, kind) for i, kind in enumerate(kinds)))

    started = time.perf_counter()
    outcomes = asyncio.run(main())
    seconds = time.perf_counter() - started

    by_kind = collections.Counter(o.kind for o in outcomes)
    statuses = collections.Counter((o.kind, o.status) for o in outcomes)
    complete = collections.Counter(o.kind for o in outcomes if o.complete)
    cancelled = engine.engine.stats.cancelled - cancelled_before
    rate = len(outcomes) / seconds
    print(f"\nsoak: {len(outcomes)} requests in {seconds:.1f} s ({rate:.1f}/s), {CONCURRENCY} at a time")
    for kind in KINDS:
        got = {str(status): n for (k, status), n in sorted(statuses.items(), key=str) if k == kind}
        print(f"  {kind:>13}: {by_kind[kind]:5d} requests, complete answers {complete[kind]:5d}, statuses {got}")
    print(f"  aborted in the engine (client gone): {cancelled}")

    problems = [f"{o.index} {o.kind}: {'; '.join(o.problems)}" for o in outcomes if o.problems]
    assert not problems, "\n".join(problems[:20])
    assert not [o for o in outcomes if o.status is not None and o.status >= 500]
    for kind in ("valid", "stream", "extreme"):  # every valid request that was not cancelled: complete
        assert complete[kind] == by_kind[kind] > 0, kind
    assert by_kind["invalid"] > 0 and by_kind["cancel_stream"] > 0 and by_kind["cancel_wait"] > 0
    assert cancelled > 0
    assert httpx.get(f"{running.base_url}/health").json() == {"status": "ok"}
    wait_for_empty_pool(engine, timeout=30)
    metrics = httpx.get(f"{running.base_url}/metrics").text
    assert 'memento_http_requests_total{route="/v1/completions",status="200"}' in metrics
