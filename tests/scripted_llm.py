"""A scripted OpenAI-compatible chat server for tests: deterministic answers, injected faults.

It runs inside the test process (FastAPI + uvicorn on a background thread, 127.0.0.1, a free port)
and answers ``POST /v1/chat/completions`` through a ``responder(request_json) -> str`` callable.
A fault script decides, per call, what the call gets:

- ``"ok"``: a normal completion;
- ``"429"`` (or ``"429:<seconds>"``): rate limited, with a ``Retry-After`` header (default ``0``);
- ``"500"``, ``"503"``, ``"400"``, ... (any status code): that status with an error body;
- ``"timeout"``: hangs for ``hang_s`` (longer than the client's timeout), then answers normally;
- ``"truncated"``: status 200 with the first half of a valid JSON body;
- ``"garbage"``: status 200 with a non-JSON (HTML) body;
- ``"empty"``: status 200, valid JSON but ``choices`` is empty.

The script is a list (consumed in order; ``"ok"`` once exhausted) or a function
``(call_index, request_json) -> fault``. Every call is recorded (body, headers, fault served), as is
the peak number of requests in flight, for assertions::

    with ScriptedLLM(faults=["500", "ok"], latency=0.01) as server:
        ... LLMConfig(base_url=server.base_url, model="m") ...
        assert [c.fault for c in server.calls] == ["500", "ok"]
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

FAULT_KINDS = ("ok", "timeout", "truncated", "garbage", "empty")

Responder = Callable[[dict[str, Any]], str]
FaultScript = Iterable[str] | Callable[[int, dict[str, Any]], str] | None


def echo_responder(request: dict[str, Any]) -> str:
    """The default answer: a deterministic function of the last user message."""
    last = next((m.get("content", "") for m in reversed(request.get("messages", [])) if m.get("role") == "user"), "")
    return f"echo: {last}"


def count_tokens(text: str) -> int:
    """A stand-in tokenizer for usage counts: whitespace-separated words."""
    return len(text.split())


def _check_fault(fault: str) -> str:
    kind = fault.partition(":")[0]
    if kind not in FAULT_KINDS and not (kind.isdigit() and len(kind) == 3):
        raise ValueError(f"unknown fault {fault!r}: expected one of {FAULT_KINDS} or an HTTP status code")
    return fault


@dataclass
class Call:
    """One request as the server saw it."""

    index: int
    body: dict[str, Any]
    headers: dict[str, str]
    fault: str
    started: float
    finished: float | None = None
    status: int | None = None


@dataclass
class ScriptedLLM:
    """See the module docstring. ``latency`` is awaited on every call (so it overlaps across
    concurrent requests, like a real server's); ``hang_s`` is how long a ``"timeout"`` call hangs."""

    responder: Responder = echo_responder
    faults: FaultScript = None
    latency: float = 0.0
    hang_s: float = 5.0
    retry_after: str = "0"
    model: str = "scripted"
    calls: list[Call] = field(default_factory=list, init=False)
    peak_concurrency: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._in_flight = 0
        self._closing = False
        self._lock = threading.Lock()
        self.set_faults(self.faults)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # --- control from the test ------------------------------------------------------------------

    def set_faults(self, faults: FaultScript) -> None:
        """Replace the fault script (a list is consumed from its start)."""
        with self._lock:
            if faults is None or callable(faults):
                self._script: deque[str] | None = None
                self._decide = faults
            else:
                self._script = deque(_check_fault(f) for f in faults)
                self._decide = None

    def reset(self) -> None:
        """Forget recorded calls and the peak (the fault script is kept)."""
        with self._lock:
            self.calls.clear()
            self.peak_concurrency = 0

    @property
    def call_count(self) -> int:
        return len(self.calls)

    @property
    def faults_served(self) -> list[str]:
        return [c.fault for c in self.calls]

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server is not running")
        return f"http://127.0.0.1:{self.port}/v1"

    # --- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> ScriptedLLM:
        config = uvicorn.Config(self._app(), host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="scripted-llm", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the scripted LLM server did not start")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._closing = True  # hanging "timeout" calls notice this and return, so shutdown is quick
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.port = None

    # --- the app ----------------------------------------------------------------------------------

    def _next_fault(self, index: int, body: dict[str, Any]) -> str:
        with self._lock:
            if self._decide is not None:
                return _check_fault(self._decide(index, body))
            if self._script:
                return self._script.popleft()
            return "ok"

    def _completion(self, body: dict[str, Any], text: str, index: int) -> dict[str, Any]:
        prompt = sum(count_tokens(str(m.get("content", ""))) for m in body.get("messages", []))
        completion = count_tokens(text)
        return {
            "id": f"chatcmpl-scripted-{index}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }

    def _app(self) -> FastAPI:
        # (Request is imported at module level: FastAPI resolves the string annotation there.)
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = json.loads(await request.body())
            with self._lock:
                index = len(self.calls)
                self._in_flight += 1
                self.peak_concurrency = max(self.peak_concurrency, self._in_flight)
            try:
                fault = self._next_fault(index, body)
                call = Call(index, body, dict(request.headers), fault, time.monotonic())
                with self._lock:
                    self.calls.append(call)
                response = await self._serve(body, fault, index)
                call.status = response.status_code
                call.finished = time.monotonic()
                return response
            finally:
                with self._lock:
                    self._in_flight -= 1

        return app

    async def _serve(self, body: dict[str, Any], fault: str, index: int) -> Response:
        if self.latency:
            await asyncio.sleep(self.latency)
        kind, _, arg = fault.partition(":")
        if kind == "timeout":
            deadline = time.monotonic() + self.hang_s
            while time.monotonic() < deadline and not self._closing:
                await asyncio.sleep(0.02)
        if kind == "429":
            return JSONResponse(
                {"error": {"message": "rate limited (scripted)", "type": "rate_limit"}},
                status_code=429,
                headers={"Retry-After": arg or self.retry_after},
            )
        if kind.isdigit():
            return JSONResponse({"error": {"message": f"scripted {kind}", "type": "scripted"}}, status_code=int(kind))
        if kind == "garbage":
            return Response("<html><body>502 Bad Gateway</body></html>", status_code=200, media_type="text/html")
        if kind == "empty":
            return JSONResponse({"id": f"chatcmpl-scripted-{index}", "object": "chat.completion", "choices": []})
        text = self.responder(body)
        if inspect.isawaitable(text):
            text = await text
        payload = self._completion(body, text, index)
        if kind == "truncated":
            raw = json.dumps(payload)
            return Response(raw[: len(raw) // 2], status_code=200, media_type="application/json")
        return JSONResponse(payload)
