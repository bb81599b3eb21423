"""The OpenAI-compatible HTTP API over the engine (FastAPI).

Routes: ``/v1/completions``, ``/v1/chat/completions`` (the tokenizer's chat template; the thinking in
``reasoning``, and again in ``reasoning_content``, the answer in ``content``; in stream deltas too),
``/v1/models``, ``/health``, ``/metrics`` (Prometheus). Both completion routes stream as server-sent
events when ``stream`` is set. ``usage`` has vLLM 0.32's fields (``prompt_tokens_details`` null;
``completion_tokens_details.reasoning_tokens`` on chat, null on completions) and the request's peak
live KV (tokens, the largest over its samples) and the tokens evicted from its KV. ``memento serve
--backend vllm`` answers with the same fields (``tests/vllm_backend/test_vllm_serve_parity.py``).

Errors are OpenAI error objects: 400 for a body that is not JSON, unknown or invalid fields, a
prompt the context or the KV budget cannot hold; 404 for another model name; 429 when too many
requests are in flight; 500 when the engine failed while stepping this request (the server goes
on); 503 while shutting down or once the engine has stopped. A client that disconnects (streaming or
not) has its request aborted, and its KV slots freed, before the engine's next step.

The OpenAPI document (``/openapi.json``) declares exactly these: every status a route answers, each
error with the error object's schema, and no 422 (FastAPI's default for a body that fails
validation, which this server answers with 400).

The handlers are module-level functions on :data:`router`; each reads what the routes share (the
engine, the model's name, the metrics) from ``request.app.state.memento``, the :class:`ServerState`
that :func:`create_app` attaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from memento.engine import RequestOutput, SamplingParams
from memento.serve.async_engine import (
    AsyncEngine,
    EngineOverloaded,
    EngineUnavailable,
    ErrorEvent,
    FinishedEvent,
    TokenEvent,
)
from memento.serve.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    HealthStatus,
    ModelList,
    error_body,
)
from memento.serve.text import (
    IncrementalText,
    ReasoningStream,
    final_text,
    reasoning_token_count,
    special_ids,
    split_reasoning,
    think_token_ids,
)

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "kv_budget": "length", "abort": "abort"}
"""Engine finish reasons as the API reports them (``format_error`` ends like a stop: the engine's
reason is also in ``stop_reason``)."""
_ERROR_KINDS = {400: "invalid_request_error", 500: "server_error"}
"""The OpenAI error type of a request that failed in the engine, by status."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, status), status_code=status)


class _EngineCollector:
    """Prometheus metrics read from the engine at scrape time."""

    def __init__(self, server: ServerState) -> None:
        self.server = server

    def collect(self):
        engine = self.server.async_engine.engine
        stats = engine.stats
        gauges = {
            "memento_requests_in_flight": ("requests submitted and not finished", self.server.async_engine.pending),
            "memento_queue_length": ("sequences waiting for admission", engine.num_waiting),
            "memento_running_sequences": ("sequences holding KV", engine.num_running),
            "memento_kv_pool_used_tokens": ("KV slots in use", engine.pool.num_used),
            "memento_kv_pool_capacity_tokens": ("KV slots in the pool", engine.pool.capacity),
            "memento_kv_bytes_per_token": ("bytes of KV per token", engine.geometry.bytes_per_token),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "memento_generated_tokens": ("tokens generated", stats.generated_tokens),
            "memento_evictions": ("blocks evicted", stats.evictions),
            "memento_evicted_tokens": ("tokens evicted from the KV pool", stats.evicted_tokens),
            "memento_preemptions": ("sequences preempted (recomputed later)", stats.preemptions),
            "memento_engine_steps": ("engine steps", stats.steps),
            "memento_cancelled_requests": ("requests aborted (client gone or shutdown)", stats.cancelled),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


class ServerState:
    """What the routes share: the engine, the model's name and the metrics (``app.state.memento``)."""

    def __init__(self, async_engine: AsyncEngine, model_name: str, shutdown_timeout: float) -> None:
        self.async_engine = async_engine
        self.model_name = model_name
        self.shutdown_timeout = shutdown_timeout
        self.created = int(time.time())
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "memento_http_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.prompt_tokens = Counter("memento_prompt_tokens", "prompt tokens received", registry=self.registry)
        self.registry.register(_EngineCollector(self))
        self.think_ids = think_token_ids(self.tokenizer)
        self.skip_ids = {chat: special_ids(self.tokenizer, keep_think_tags=chat) for chat in (False, True)}
        """What ``skip_special_tokens`` leaves out of the text, by route (chat keeps the think tags)."""

    @property
    def tokenizer(self) -> Any:
        return self.async_engine.engine.tokenizer

    @property
    def eos_ids(self) -> set[int]:
        return self.async_engine.engine.eos_token_ids


# -- building responses --------------------------------------------------------------------------


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _completion_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list, tops: list, start: int) -> dict:
    """The legacy completions format: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [_token_text(tokenizer, t) for t in token_ids]
    offsets, at = [], start
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": list(logprobs),
        "top_logprobs": [
            {_token_text(tokenizer, t): lp for t, lp in top.items()} if top is not None else None for top in tops
        ],
        "text_offset": offsets,
    }


def _chat_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list, tops: list) -> dict:
    """The chat format: one entry per token with its bytes and the top alternatives."""

    def entry(token_id: int, logprob: float | None) -> dict:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for token_id, logprob, top in zip(token_ids, logprobs, tops, strict=True):
        item = entry(token_id, logprob)
        item["top_logprobs"] = [entry(t, lp) for t, lp in (top or {}).items()]
        content.append(item)
    return {"content": content}


def _usage(outputs: list[RequestOutput], chat: bool, think_ids: tuple[int, int] | None) -> dict:
    """vLLM's usage fields (chat: the reasoning tokens, 0 when the think tags are not single tokens;
    completions: null details, as vLLM's), and the request's KV; summed over a batch of prompts (the
    peak: the largest)."""
    samples = [o for output in outputs for o in output.outputs]
    completion = sum(len(o.token_ids) for o in samples)
    prompt = sum(len(output.prompt_token_ids) for output in outputs)
    details = None
    if chat:
        details = {"reasoning_tokens": sum(reasoning_token_count(o.token_ids, think_ids) for o in samples)}
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": None,
        "completion_tokens_details": details,
        "peak_kv_tokens": max((o.kv.peak for o in samples), default=0),
        "evicted_tokens": sum(o.kv.evicted_tokens for o in samples),
    }


def _finish_reason(sample: Any) -> str:
    return FINISH_REASONS.get(sample.finish_reason or "", "stop")


FORMAT_ERROR_STOP = "memento_format_error"
"""The ``stop_reason`` of a sample the format checker stopped (``finish_reason`` "stop"): the vLLM
backend's (``memento.vllm.scheduler.FORMAT_ERROR``)."""


def _stop_reason(sample: Any) -> Any:
    """The stop string or id that ended the sample; :data:`FORMAT_ERROR_STOP` when the format checker did."""
    return sample.stop_reason if sample.finish_reason != "format_error" else FORMAT_ERROR_STOP


@dataclass(frozen=True)
class Rendering:
    """How a request's samples become text: the route, the prompt echoed before the completion
    (completions' ``echo``) and the tokens left out of the text (``skip_special_tokens``)."""

    chat: bool
    echo: bool = False
    skip_ids: frozenset[int] = frozenset()

    @classmethod
    def of(cls, state: ServerState, body: CompletionRequest | ChatCompletionRequest, chat: bool) -> Rendering:
        skip = state.skip_ids[chat] if body.skip_special_tokens else frozenset()
        return cls(chat, bool(getattr(body, "echo", False)), skip)

    def prompt_text(self, tokenizer: Any, prompt_ids: list[int]) -> str:
        """The echoed prompt ("" without echo)."""
        if not self.echo:
            return ""
        return tokenizer.decode([t for t in prompt_ids if t not in self.skip_ids])


def _sample_text(tokenizer: Any, sample: Any, params: SamplingParams, rendering: Rendering) -> str:
    return final_text(tokenizer, sample.token_ids, sample.finish_reason, sample.stop_reason, params, rendering.skip_ids)


def _logprobs(tokenizer: Any, chat: bool, token_ids: list[int], logprobs: list, tops: list, offset: int = 0) -> dict:
    """Logprobs in the route's format (``offset``: where the tokens' text starts, for completions)."""
    if chat:
        return _chat_logprobs(tokenizer, token_ids, logprobs, tops)
    return _completion_logprobs(tokenizer, token_ids, logprobs, tops, offset)


def _choice(
    index: int, field: str, content: Any, logprobs: Any = None, finish: str | None = None, **extra: Any
) -> dict:
    """One choice: ``field`` is ``text`` (completions), ``message`` (chat) or ``delta`` (chat stream)."""
    return {"index": index, field: content, "logprobs": logprobs, "finish_reason": finish, **extra}


def _stream_choice(
    index: int,
    text: str,
    reasoning: ReasoningStream | None,
    finish: str | None = None,
    logprobs: Any = None,
    **extra: Any,
) -> dict:
    """A streamed choice; for chat (``reasoning`` given) the text's delta split into reasoning and answer."""
    if reasoning is None:
        return _choice(index, "text", text, logprobs, finish, **extra)
    reasoning_delta, answer_delta = reasoning.push(text, final=finish is not None)
    delta: dict[str, Any] = {}
    if reasoning_delta:
        delta["reasoning"] = delta["reasoning_content"] = reasoning_delta
    if answer_delta:
        delta["content"] = answer_delta
    return _choice(index, "delta", delta, logprobs, finish, **extra)


def _envelope(request_id: str, kind: str, created: int, model: str, choices: list[dict], **usage: Any) -> dict:
    """A response or stream chunk around its choices (``usage`` last, when given)."""
    return {"id": request_id, "object": kind, "created": created, "model": model, "choices": choices, **usage}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _logprob_ids(sample: Any, params: SamplingParams, chat: bool) -> list[int]:
    """The sampled ids whose logprobs are returned. Completions: every one, a final EOS or stop id
    included, as vLLM returns them (lm-eval's log-likelihood reads the prompt's logprobs as
    ``token_logprobs[ctxlen:-1]``, taking the last entry for the one generated token). Chat: the
    ids whose text is returned (a final EOS / stop id is not)."""
    ids, finish_reason = list(sample.token_ids), sample.finish_reason
    if not chat:
        return ids
    by_token = finish_reason == "eos" or (finish_reason == "stop" and isinstance(sample.stop_reason, int))
    if ids and by_token and not (finish_reason == "stop" and params.include_stop_str_in_output):
        ids = ids[:-1]
    return ids


# -- generating ----------------------------------------------------------------------------------


def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}", "not_found")


def _prepare(
    state: ServerState, prompts: list[list[int]], params_builder: Callable[[], SamplingParams]
) -> SamplingParams:
    """The request's sampling parameters, checked by the engine against every prompt before any is
    submitted; a ValueError from either is a 400."""
    try:
        params = params_builder()
        for prompt_ids in prompts:
            state.async_engine.validate(prompt_ids, params)
    except ValueError as err:
        raise ApiError(400, str(err)) from None
    return params


async def _respond(
    state: ServerState,
    request: Request,
    route: str,
    prompts: list[list[int]],
    params: SamplingParams,
    body: CompletionRequest | ChatCompletionRequest,
    rendering: Rendering,
) -> StreamingResponse | dict:
    """Submit every prompt of the request (the engine batches them), then stream or wait for all."""
    streams = [state.async_engine.generate(prompt_ids, params) for prompt_ids in prompts]
    firsts = await asyncio.gather(*(anext(events) for events in streams), return_exceptions=True)
    refused = next((f for f in firsts if isinstance(f, BaseException)), None)
    if refused is not None:
        for events in streams:  # the prompts that got in are aborted
            await events.aclose()
        if isinstance(refused, EngineOverloaded):
            raise ApiError(429, str(refused), "rate_limit_exceeded") from None
        if isinstance(refused, EngineUnavailable):
            raise ApiError(503, str(refused), "service_unavailable") from None
        raise refused
    state.prompt_tokens.inc(sum(len(p) for p in prompts))
    request_id = f"{'chatcmpl' if rendering.chat else 'cmpl'}-{uuid.uuid4().hex}"
    started = list(zip(firsts, streams, strict=True))
    response: StreamingResponse | dict
    if body.stream:
        stream = _stream(state, request_id, started, prompts, params, body, rendering)
        response = StreamingResponse(stream, media_type="text/event-stream")
    else:
        outputs = await _collect_unless_gone(request, started)
        if outputs is None:
            raise ApiError(499, "the client closed the request", "client_closed")
        response = _full_response(state, request_id, outputs, params, rendering)
    state.requests.labels(route, "200").inc()
    return response


async def _collect_unless_gone(
    request: Request, started: list[tuple[list, AsyncGenerator[list, None]]]
) -> list[RequestOutput] | None:
    """The finished outputs, in prompt order, or None when the client disconnects first (every prompt
    is aborted)."""
    task = asyncio.create_task(_collect_all(started))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.1)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _collect_all(started: list[tuple[list, AsyncGenerator[list, None]]]) -> list[RequestOutput]:
    """Every prompt's output; the first error cancels (aborts) the others and is raised."""
    tasks = [asyncio.create_task(_collect(first, events)) for first, events in started]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _collect(first: list, events: AsyncGenerator[list, None]) -> RequestOutput:
    """The batches up to the finished output (an engine error is a 400)."""
    try:
        batch = first
        while True:
            last = batch[-1]
            if isinstance(last, FinishedEvent):
                return last.output
            if isinstance(last, ErrorEvent):
                raise ApiError(last.status, last.message, _ERROR_KINDS[last.status])
            batch = await anext(events)
    finally:
        await events.aclose()  # cancelled (client gone): aborts the request in the engine


def _full_response(
    state: ServerState, request_id: str, outputs: list[RequestOutput], params: SamplingParams, rendering: Rendering
) -> dict:
    tokenizer = state.tokenizer
    choices = []
    for p, output in enumerate(outputs):
        prompt_text = rendering.prompt_text(tokenizer, output.prompt_token_ids)
        for sample in output.outputs:
            text = prompt_text + _sample_text(tokenizer, sample, params, rendering)
            logprobs = None
            if params.logprobs is not None:
                ids = _logprob_ids(sample, params, rendering.chat)
                n = len(ids)
                lps, tops = list(sample.logprobs[:n]), list(sample.top_logprobs[:n])
                if rendering.echo:  # the prompt's tokens first (the first has no logprob)
                    ids = output.prompt_token_ids + ids
                    lps = list(output.prompt_logprobs or []) + lps
                    tops = list(output.prompt_top_logprobs or []) + tops
                logprobs = _logprobs(tokenizer, rendering.chat, ids, lps, tops)
            if rendering.chat:
                reasoning, answer = split_reasoning(text)
                message = {
                    "role": "assistant",
                    "content": answer,
                    "reasoning": reasoning,
                    "reasoning_content": reasoning,
                }
                field, content = "message", message
            else:
                field, content = "text", text
            index = p * params.n + sample.index
            choices.append(
                _choice(index, field, content, logprobs, _finish_reason(sample), stop_reason=_stop_reason(sample))
            )
    kind = "chat.completion" if rendering.chat else "text_completion"
    usage = _usage(outputs, rendering.chat, state.think_ids)
    return _envelope(request_id, kind, int(time.time()), state.model_name, choices, usage=usage)


async def _merged(started: list[tuple[list, AsyncGenerator[list, None]]]) -> AsyncIterator[tuple[int, list]]:
    """(prompt index, batch) from every prompt's events as they come; a prompt is done at its finished or
    error event. Leaving early (an error, a client gone) aborts the prompts still running."""
    streams = [events for _, events in started]
    waiting: dict[asyncio.Task, int] = {}
    try:
        for p, (first, _) in enumerate(started):
            yield p, first
            if not isinstance(first[-1], FinishedEvent | ErrorEvent):
                waiting[asyncio.create_task(anext(streams[p]))] = p  # type: ignore[arg-type]
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=waiting.__getitem__):
                p = waiting.pop(task)
                batch = task.result()
                yield p, batch
                if not isinstance(batch[-1], FinishedEvent | ErrorEvent):
                    waiting[asyncio.create_task(anext(streams[p]))] = p  # type: ignore[arg-type]
    finally:
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        for events in streams:
            await events.aclose()


async def _stream(
    state: ServerState,
    request_id: str,
    started: list[tuple[list, AsyncGenerator[list, None]]],
    prompts: list[list[int]],
    params: SamplingParams,
    body: CompletionRequest | ChatCompletionRequest,
    rendering: Rendering,
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per sampled token, a final chunk per sample, [DONE]. Choice
    ``p * n + i`` is sample ``i`` of prompt ``p``; with ``echo`` its first chunk is the prompt."""
    tokenizer, chat, n = state.tokenizer, rendering.chat, params.n
    kind = "chat.completion.chunk" if chat else "text_completion"
    envelope = functools.partial(_envelope, request_id, kind, int(time.time()), state.model_name)
    choices = len(started) * n
    texts = [IncrementalText(tokenizer, params, rendering.skip_ids) for _ in range(choices)]
    reasoning = [ReasoningStream() if chat else None for _ in range(choices)]
    ids: list[list[int]] = [[] for _ in range(choices)]
    offsets = [0] * choices
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    no_usage = {"usage": None} if include_usage else {}
    outputs: list[RequestOutput | None] = [None] * len(started)
    events = _merged(started)

    try:
        if chat:
            role = {"role": "assistant", "content": ""}
            yield _sse(envelope([_choice(c, "delta", role) for c in range(choices)], **no_usage))
        if rendering.echo:
            for p, prompt_ids in enumerate(prompts):
                text = rendering.prompt_text(tokenizer, prompt_ids)
                for c in range(p * n, (p + 1) * n):
                    offsets[c] = len(text)
                    yield _sse(envelope([_choice(c, "text", text, None, None)], **no_usage))
        async for p, batch in events:
            # One chunk per sample per batch: a batch is one engine step, or several when this
            # stream fell behind (then their tokens go out together).
            tokens: dict[int, list[TokenEvent]] = {}
            for event in batch:
                if isinstance(event, TokenEvent):
                    tokens.setdefault(p * n + event.index, []).append(event)
            for c, got in tokens.items():
                ids[c].extend(e.token_id for e in got)
                delta = texts[c].delta(ids[c], state.eos_ids)
                logprobs = None
                if params.logprobs is not None:
                    hidden = state.eos_ids | set(params.stop_token_ids) if chat else set()  # as _logprob_ids
                    shown = [e for e in got if e.token_id not in hidden]
                    one = [e.token_id for e in shown]
                    lps, tops = [e.sampled.logprob for e in shown], [e.sampled.top_logprobs for e in shown]
                    logprobs = _logprobs(tokenizer, chat, one, lps, tops, offsets[c])
                offsets[c] += len(delta)
                if delta or logprobs is not None:
                    yield _sse(envelope([_stream_choice(c, delta, reasoning[c], logprobs=logprobs)], **no_usage))
            last = batch[-1]
            if isinstance(last, ErrorEvent):
                yield _sse(error_body(last.message, _ERROR_KINDS[last.status]))
                break
            if isinstance(last, FinishedEvent):
                output = outputs[p] = last.output
                for sample in output.outputs:
                    c = p * n + sample.index
                    rest = texts[c].finish(_sample_text(tokenizer, sample, params, rendering))
                    choice = _stream_choice(
                        c, rest, reasoning[c], _finish_reason(sample), stop_reason=_stop_reason(sample)
                    )
                    yield _sse(envelope([choice], **no_usage))
        else:
            if include_usage:
                done = [o for o in outputs if o is not None]
                yield _sse(envelope([], usage=_usage(done, chat, state.think_ids)))
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()  # a client gone mid-stream: every prompt still running is aborted here


# -- the routes ------------------------------------------------------------------------------------

router = APIRouter()
"""The API's routes; :func:`create_app` includes them. The handlers have no return annotation on
purpose: FastAPI would take it for a response model and re-validate what they return."""


def _state(request: Request) -> ServerState:
    """The state :func:`create_app` attached to the app."""
    return request.app.state.memento


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's validation errors (a body that is not JSON included) as one OpenAI 400."""
    problems = []
    param = None
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        param = param or where or None
        problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    message = "; ".join(problems) or "invalid request"
    if any(err.get("type") == "json_invalid" for err in exc.errors()):
        message = f"the body is not valid JSON ({message})"
    return await _api_error(request, ApiError(400, message, param=param))


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    """An :class:`ApiError` as an OpenAI error object, counted by route and status."""
    _state(request).requests.labels(request.url.path, str(exc.status)).inc()
    return _error(exc.status, exc.message, exc.kind, exc.param)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """The framework's own errors as OpenAI error objects: a body that cannot be read (400; FastAPI's
    ``{"detail": ...}`` otherwise), an unknown path (404) or method (405)."""
    status = exc.status_code
    kinds = {400: "invalid_request_error", 404: "not_found", 405: "method_not_allowed"}
    message = str(exc.detail)
    if status == 400:
        message = f"the body could not be read as JSON ({message})"
        _state(request).requests.labels(request.url.path, "400").inc()  # only on a route: it has a body
    response = _error(status, message, kinds.get(status, "server_error" if status >= 500 else "invalid_request_error"))
    response.headers.update(exc.headers or {})
    return response


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug in a handler: still an OpenAI error object (the exception is logged by the server)."""
    with contextlib.suppress(Exception):
        _state(request).requests.labels(request.url.path, "500").inc()
    return _error(500, f"internal server error: {type(exc).__name__}", "server_error")


class PrometheusText(Response):
    """The Prometheus text format, under exactly its content type (no charset appended)."""

    media_type = "text/plain; version=0.0.4"

    def __init__(self, content: bytes = b"", status_code: int = 200) -> None:
        super().__init__(content, status_code, headers={"content-type": self.media_type})


_ERRORS: dict[int, str] = {
    400: "The request is invalid: a body that is not JSON, an unknown or invalid field, a rule across fields "
    "(stream_options without stream, top_logprobs without logprobs, best_of other than n), token ids outside "
    "the model's vocabulary, a prompt the context or the KV budget cannot hold.",
    404: "The model asked for is not the one this server serves.",
    429: "Too many requests are in flight (the queue is full): retry later.",
    500: "The engine failed while stepping this request (this request alone: the server goes on).",
    503: "The server is draining (shutting down) or its engine has stopped.",
}


def _error_responses(*statuses: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """Errors as documented: the error object, and what the status means (``descriptions``: ``s503=...``)."""
    return {
        status: {"model": ErrorResponse, "description": descriptions.get(f"s{status}", _ERRORS[status])}
        for status in statuses
    }


def _event_stream(chunk: type) -> dict[str, Any]:
    """The ``text/event-stream`` answer of a completion route: its events (OpenAPI 3.2's ``itemSchema``)."""
    data = {
        "description": f"A {chunk.__name__} (JSON); an error object when the engine failed after the stream began "
        "(a 500 of the engine); `[DONE]` last.",
        "anyOf": [
            {"const": "[DONE]"},
            {
                "type": "string",
                "not": {"const": "[DONE]"},
                "contentMediaType": "application/json",
                "contentSchema": {"anyOf": [{"$ref": _ref(chunk)}, {"$ref": _ref(ErrorResponse)}]},
            },
        ],
    }
    properties = {"data": data, "event": {"type": "string"}, "id": {"type": "string"}}
    return {"itemSchema": {"type": "object", "required": ["data"], "properties": properties}}


def _ref(model: type) -> str:
    return f"#/components/schemas/{model.__name__}"


def _generation_responses(model: type, chunk: type) -> dict[int | str, dict[str, Any]]:
    """What a completion route answers: the response (JSON, or server-sent events with ``stream``), the errors."""
    ok = {
        "model": model,
        "description": "The completion (application/json); with stream=true, server-sent events.",
        "content": {"text/event-stream": _event_stream(chunk)},
    }
    return {200: ok, **_error_responses(400, 404, 429, 500, 503)}


_DOCUMENTED = {
    "validation": (CompletionRequest, ChatCompletionRequest),
    "serialization": (
        CompletionResponse,
        ChatCompletionResponse,
        CompletionChunk,
        ChatCompletionChunk,
        ModelList,
        HealthStatus,
        ErrorResponse,
    ),
}
"""The models whose schemas the document holds, as pydantic writes them: FastAPI's own copies turn
every bound into a float (an int64 seed's 2**63 - 1 would read 2**63), and the stream events' chunks,
referred to only by the routes' ``itemSchema``, are not in them at all."""


_HEALTH = {
    200: {"model": HealthStatus, "description": '"ok", or "draining" while shutting down.'},
    **_error_responses(503, s503="The engine has stopped after a failure: the server cannot serve."),
}


@router.get("/health", responses=_HEALTH)
async def health(request: Request):
    async_engine = _state(request).async_engine
    if async_engine.error is not None:
        return _error(503, f"engine failure: {async_engine.error}", "service_unavailable")
    return {"status": "ok" if async_engine.accepting else "draining"}


@router.get(
    "/metrics",
    response_class=PrometheusText,
    responses={200: {"description": "Prometheus metrics (text format 0.0.4)"}},
)
async def metrics(request: Request):
    return PrometheusText(generate_latest(_state(request).registry))


@router.get("/v1/models", responses={200: {"model": ModelList, "description": "The one model this server serves."}})
async def models(request: Request):
    state = _state(request)
    engine = state.async_engine.engine
    card = {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "memento",
        "max_model_len": engine.max_model_len,
        "kv_budget_tokens": engine.pool.capacity,
        "keep_last_n": engine.config.mask.keep_last_n,
    }
    return {"object": "list", "data": [card]}


@router.post("/v1/completions", responses=_generation_responses(CompletionResponse, CompletionChunk))
async def completions(body: CompletionRequest, request: Request):
    state = _state(request)
    _check_model(state, body.model)
    prompts = [_encode(state.tokenizer, p) if isinstance(p, str) else list(p) for p in body.prompts()]
    prompt_logprobs = body.logprobs if body.echo else None  # echo: the prompt's logprobs too
    max_tokens = body.max_tokens or 16
    params = _prepare(state, prompts, lambda: body.sampling_params(max_tokens, body.logprobs, prompt_logprobs))
    rendering = Rendering.of(state, body, chat=False)
    return await _respond(state, request, "/v1/completions", prompts, params, body, rendering)


@router.post("/v1/chat/completions", responses=_generation_responses(ChatCompletionResponse, ChatCompletionChunk))
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = _state(request)
    _check_model(state, body.model)
    tokenizer = state.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions")
    try:
        text = tokenizer.apply_chat_template(
            body.chat_messages(),
            tokenize=False,
            add_generation_prompt=body.add_generation_prompt,
            **(body.chat_template_kwargs or {}),
        )
    except Exception as err:  # a template that fails on these messages or kwargs: the request's fault
        raise ApiError(400, f"the chat template failed: {type(err).__name__}: {err}") from None
    prompt_ids = _encode(tokenizer, text)
    room = state.async_engine.engine.max_model_len - len(prompt_ids)
    max_tokens = body.max_completion_tokens or body.max_tokens or max(room, 1)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = _prepare(state, [prompt_ids], lambda: body.sampling_params(max_tokens, logprobs))
    rendering = Rendering.of(state, body, chat=True)
    return await _respond(state, request, "/v1/chat/completions", [prompt_ids], params, body, rendering)


# -- the app ---------------------------------------------------------------------------------------


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Serve; on shutdown let the requests in flight finish (up to the timeout), then stop the engine."""
    yield
    state: ServerState = app.state.memento
    await state.async_engine.drain(state.shutdown_timeout)
    state.async_engine.stop()


_FASTAPI_422 = ("HTTPValidationError", "ValidationError")
"""The component schemas FastAPI adds for its 422 answers."""


def _document(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's OpenAPI document made true: without its 422 answers (this server answers 400) and their
    schemas, with pydantic's exact schemas of the models (:data:`_DOCUMENTED`). Idempotent (FastAPI
    caches the document it hands over)."""
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for mode, models in _DOCUMENTED.items():
        for model in models:
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
    for name in _FASTAPI_422:  # HTTPValidationError refers to ValidationError: drop it first
        if name in components:
            rest = {**schema, "components": {**schema["components"], "schemas": dict(components)}}
            del rest["components"]["schemas"][name]
            if f'"#/components/schemas/{name}"' not in json.dumps(rest):
                del components[name]
    return schema


def create_app(async_engine: AsyncEngine, model_name: str, shutdown_timeout: float = 30.0) -> FastAPI:
    """The FastAPI app; the engine thread is already running, the app stops it on shutdown."""
    app = FastAPI(
        title="memento",
        description="An OpenAI-compatible server over the memento engine (KV-evicting inference).",
        lifespan=_lifespan,
        exception_handlers={
            RequestValidationError: _invalid_request,
            ApiError: _api_error,
            StarletteHTTPException: _http_error,
            Exception: _internal_error,
        },
    )
    app.state.memento = ServerState(async_engine, model_name, shutdown_timeout)
    app.include_router(router)
    generated = app.openapi
    app.openapi = lambda: _document(generated())  # type: ignore[method-assign]
    return app
