"""The engine behind an asyncio server: one thread steps the engine, coroutines wait for their tokens.

:class:`~memento.engine.LLMEngine` is synchronous and not thread-safe, so exactly one thread (the
*engine thread*) touches it. Requests and cancellations reach that thread through a queue and are
applied between steps; every sampled token and every finished request goes back to the asyncio
loop of the request that asked for it (``call_soon_threadsafe``). A cancelled request (a client that
went away) is aborted before the next step, so its KV slots are back in the pool at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from memento.engine import LLMEngine, RequestOutput, SamplingParams
from memento.engine.sampling import SampledToken


class EngineOverloaded(RuntimeError):
    """Too many requests in flight (answered with 429)."""


class EngineUnavailable(RuntimeError):
    """The engine is shutting down or has stopped (answered with 503)."""


@dataclass
class TokenEvent:
    index: int
    token_id: int
    sampled: SampledToken


@dataclass
class FinishedEvent:
    output: RequestOutput


@dataclass
class ErrorEvent:
    """The request failed: ``status`` 400 when it could not run (bad input), 500 when the engine
    failed while stepping it (the request alone: the server goes on)."""

    message: str
    status: int = 400


@dataclass
class _Submission:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    submitted: float = field(default_factory=time.perf_counter)


class AsyncEngine:
    """Owns an :class:`LLMEngine` and the thread that steps it."""

    def __init__(self, engine: LLMEngine, max_pending_requests: int = 256) -> None:
        if max_pending_requests < 1:
            raise ValueError(f"max_pending_requests must be >= 1, got {max_pending_requests}")
        self.engine = engine
        self.max_pending_requests = max_pending_requests
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._live: dict[str, _Submission] = {}  # engine thread only
        self._step_tokens: dict[str, list[TokenEvent]] = {}  # engine thread only: this step's tokens
        self._pending = 0  # submitted and not yet finished or cancelled (any thread; guarded)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._ids = itertools.count()
        self._draining = False
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="memento-engine", daemon=True)
        self._thread.start()

    # -- called from the asyncio side ------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests submitted and not yet finished or cancelled."""
        return self._pending

    @property
    def accepting(self) -> bool:
        return not (self._draining or self._stopped or self.error is not None)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """The engine's own checks, without queueing anything (ValueError on bad input)."""
        self.engine.check_request(prompt_ids, params)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[list]:
        """Yield batches of events: :class:`TokenEvent` per sampled token, at last a :class:`FinishedEvent`
        (or an :class:`ErrorEvent`). A batch holds everything that arrived since the consumer last
        looked (one engine step's tokens, or more when the consumer is slower than the engine).

        Leaving the iteration early (the consumer is cancelled or stops) aborts the request.
        """
        if not self.accepting:
            raise EngineUnavailable("the server is shutting down" if self._draining else "the engine has stopped")
        with self._lock:
            if self._pending >= self.max_pending_requests:
                raise EngineOverloaded(
                    f"{self._pending} requests are in flight (the limit is {self.max_pending_requests}); retry later"
                )
            self._pending += 1
        submission = _Submission(
            f"req-{next(self._ids)}", prompt_ids, params, asyncio.get_running_loop(), asyncio.Queue()
        )
        self._send("add", submission)
        finished = False
        try:
            while True:
                batch = list(await submission.events.get())
                while not submission.events.empty():
                    batch.extend(submission.events.get_nowait())
                yield batch
                if isinstance(batch[-1], FinishedEvent | ErrorEvent):
                    finished = True
                    return
        finally:
            if not finished:
                self._send("abort", submission.request_id)
            else:
                self._release()

    async def drain(self, timeout: float) -> int:
        """Refuse new requests, wait up to ``timeout`` s for those in flight; abort the rest. Returns aborted."""
        self._draining = True
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = self._pending
        if left:
            self._send("abort_all", None)
            while self._pending and time.monotonic() < deadline + 5:
                await asyncio.sleep(0.02)
        return left

    def stop(self) -> None:
        """Stop the engine thread (after :meth:`drain`)."""
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    # -- the engine thread -----------------------------------------------------------------------

    def _send(self, kind: str, payload: Any) -> None:
        self._inbox.put((kind, payload))
        self._wake.set()

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1

    def _emit(self, submission: _Submission, *events: Any) -> None:
        # RuntimeError: the request's event loop is closed, nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            submission.loop.call_soon_threadsafe(submission.events.put_nowait, list(events))

    def _apply_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.add_request(payload.prompt_ids, payload.params, payload.request_id)
                except ValueError as err:
                    self._emit(payload, ErrorEvent(str(err)))
                else:
                    self._live[payload.request_id] = payload
            elif kind == "abort":
                if self._live.pop(payload, None) is not None:
                    self.engine.abort_request(payload)
                self._release()
            elif kind == "abort_all":
                for request_id, submission in list(self._live.items()):
                    output = self.engine.abort_request(request_id)
                    del self._live[request_id]
                    if output is not None:
                        self._emit(submission, FinishedEvent(output))

    def _on_token(self, request_id: str, index: int, token_id: int, sampled: SampledToken) -> None:
        if request_id in self._live:  # sent after the step, one hand-over per request
            self._step_tokens.setdefault(request_id, []).append(TokenEvent(index, token_id, sampled))

    def _run(self) -> None:
        try:
            while not self._stopped:
                self._apply_inbox()
                if not self.engine.has_unfinished():
                    self._wake.wait(timeout=0.05)
                    self._wake.clear()
                    continue
                self._step_tokens: dict[str, list[TokenEvent]] = {}
                finished = {output.request_id: output for output in self.engine.step(self._on_token)}
                for request_id in self._step_tokens.keys() | finished.keys():
                    submission = self._live.get(request_id)
                    if submission is None:
                        continue
                    events: list[Any] = self._step_tokens.get(request_id, [])
                    if request_id in finished:
                        events = [*events, _final_event(finished[request_id])]
                        del self._live[request_id]
                    self._emit(submission, *events)
        except BaseException as err:  # the engine broke: fail every request in flight, refuse new ones
            self.error = err
            for submission in self._live.values():
                self._emit(submission, ErrorEvent(f"engine failure: {type(err).__name__}: {err}"))
            self._live.clear()
            raise


def _final_event(output: RequestOutput) -> FinishedEvent | ErrorEvent:
    """A finished request, or a 500 when the engine failed while stepping one of its samples."""
    failed = [o for o in output.outputs if o.finish_reason == "error"]
    if failed:
        return ErrorEvent(f"internal error in the engine, this request was stopped: {failed[0].error}", status=500)
    return FinishedEvent(output)
