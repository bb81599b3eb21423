"""One async OpenAI-compatible chat client for the data pipeline.

The pipeline makes many thousands of chat calls (segmenting, summarising and judging traces) against
hosted APIs or local servers. Such calls fail in boring ways: rate limits, overloaded backends,
dropped connections, half-written bodies, answers the caller cannot parse. This client absorbs those
with bounded retries (exponential backoff with full jitter) and turns everything else into an
:class:`LLMError`, so a caller can record the item as missing instead of guessing.

It speaks HTTP through :mod:`httpx` directly, not through the ``openai`` SDK: the SDK retries on its
own, which would hide failures from our accounting and multiply our retry budget by its own.

A content-addressed on-disk cache makes reruns cheap and reproducible: the same request (same
endpoint, model, messages, sampling parameters) returns the stored answer without an HTTP call. Only
successful, validated answers are stored, so a rerun retries exactly the items that failed. Because
the key is the exact request, identical requests at ``temperature > 0`` share one cached sample; to
draw several samples, make the requests differ (e.g. pass a distinct ``seed=``).
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from memento.records_io import write_json_atomic

__all__ = ["ChatResult", "LLMClient", "LLMConfig", "LLMError", "LLMStats", "cache_key"]

log = logging.getLogger(__name__)

# Statuses worth another try: rate limiting, a request timeout reported by the server, server errors.
# Any other 4xx means the request itself is wrong (bad parameters, bad key, unknown model): repeating
# it cannot help, so it fails at once.
_RETRYABLE_4XX = frozenset({408, 429})


@dataclass
class LLMConfig:
    """Where to send chat requests, how hard to push and how patiently to retry."""

    base_url: str
    """The API root including the version, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``."""
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    """Name of the environment variable holding the key; unset means no ``Authorization`` header (local servers)."""
    max_concurrency: int = 16
    """HTTP requests in flight at once (also the connection pool size)."""
    max_retries: int = 5
    """Extra attempts after the first one; a request is tried at most ``max_retries + 1`` times."""
    timeout_s: float = 60.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    cache_dir: Path | None = None
    temperature: float = 0.0
    max_tokens: int | None = None
    price_per_1k_prompt: float = 0.0
    price_per_1k_completion: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    """Extra request fields sent with every call (e.g. ``{"top_p": 0.9}``); part of the cache key."""

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir)


@dataclass
class ChatResult:
    """One answer: its text, what ``validate`` made of it, token usage and how it was obtained."""

    text: str
    parsed: Any
    """The return value of ``validate(text)``; ``None`` when no validator was given."""
    usage: dict[str, Any]
    cached: bool
    attempts: int
    """HTTP attempts made for this answer (0 for a cache hit)."""
    finish_reason: str | None = None
    """As reported by the server; ``"length"`` means the answer was cut at ``max_tokens``."""


@dataclass
class LLMStats:
    """Running totals over a client's lifetime, for progress logs and cost reports.

    Updated only from the event loop's thread (no awaits between read and write), so no lock is needed.
    """

    requests: int = 0
    """HTTP calls made, including failed ones."""
    cache_hits: int = 0
    successes: int = 0
    """``chat`` calls that returned an answer (cache hits included)."""
    retries: int = 0
    """Attempts beyond the first one of each call."""
    failures: int = 0
    """``chat`` calls that raised :class:`LLMError`."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    """From the configured prices; every response that reports usage is billed, rejected ones included."""
    status_codes: Counter[int] = field(default_factory=Counter)
    """HTTP responses by status code."""
    errors: Counter[str] = field(default_factory=Counter)
    """Failed attempts by kind: ``http_<status>``, ``timeout``, ``connection``, ``malformed``, ``invalid``."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "cache_hits": self.cache_hits,
            "successes": self.successes,
            "retries": self.retries,
            "failures": self.failures,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost": self.cost,
            "status_codes": dict(self.status_codes),
            "errors": dict(self.errors),
        }


class LLMError(RuntimeError):
    """A chat call that produced no usable answer; the item should be recorded as missing.

    ``kind`` is the class of the last failure (see :attr:`LLMStats.errors`), ``cause`` a readable
    description of it, ``status`` its HTTP status if any. The underlying exception, if any, is chained
    as ``__cause__``.
    """

    def __init__(self, message: str, *, kind: str, cause: str, attempts: int, status: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.cause = cause
        self.attempts = attempts
        self.status = status


class _AttemptFailed(Exception):
    """One failed attempt: whether another try could help, and how long the server asked us to wait."""

    def __init__(
        self,
        kind: str,
        cause: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(cause)
        self.kind = kind
        self.cause = cause
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def cache_key(
    base_url: str,
    model: str,
    messages: list[dict],
    temperature: float,
    max_tokens: int | None,
    extra: dict[str, Any],
) -> str:
    """The sha256 of the canonical JSON of everything that determines the answer.

    The temperature goes in as a float so that ``0`` and ``0.0`` name the same request.
    """
    material = {
        "base_url": base_url.rstrip("/"),
        "model": model,
        "messages": messages,
        "temperature": float(temperature),
        "max_tokens": max_tokens,
        "extra": extra,
    }
    return hashlib.sha256(_canonical(material)).hexdigest()


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: a number of seconds, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _short(text: str, limit: int = 200) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


class LLMClient:
    """An async chat client with bounded concurrency, retries, an on-disk cache and accounting.

    Use as ``async with LLMClient(config) as client: result = await client.chat(messages)``; the
    HTTP connection pool lives for the ``async with`` block. Meant for one event loop.
    """

    def __init__(self, config: LLMConfig):
        self.config = config
        self.stats = LLMStats()
        self._http: httpx.AsyncClient | None = None
        self._gate: asyncio.Semaphore | None = None
        self._url = config.base_url.rstrip("/") + "/chat/completions"

    async def __aenter__(self) -> LLMClient:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.config.api_key_env) if self.config.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        n = self.config.max_concurrency
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(self.config.timeout_s),
            # As many connections as requests in flight: a request never waits for the pool, so the
            # timeout measures the server, not our own queue.
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
        )
        self._gate = asyncio.Semaphore(n)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def chat(
        self,
        messages: list[dict],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        validate: Callable[[str], Any] | None = None,
        **extra: Any,
    ) -> ChatResult:
        """Send one chat request; return the answer, or raise :class:`LLMError`.

        ``temperature``/``max_tokens`` default to the config's; ``extra`` fields go into the request
        body (after the config's ``extra_body``). If ``validate`` is given it is called on the answer
        text and its return value becomes ``ChatResult.parsed``; an exception from it counts as a
        malformed answer and is retried like one, so an unparseable answer costs a retry, not an item.
        """
        if self._http is None or self._gate is None:
            raise RuntimeError("LLMClient must be used inside 'async with'")
        cfg = self.config
        temperature = cfg.temperature if temperature is None else temperature
        max_tokens = cfg.max_tokens if max_tokens is None else max_tokens
        params = {**cfg.extra_body, **extra}
        key = cache_key(cfg.base_url, cfg.model, messages, temperature, max_tokens, params)

        hit = await self._cache_load(key, validate)
        if hit is not None:
            self.stats.cache_hits += 1
            self.stats.successes += 1
            return hit

        body: dict[str, Any] = {**params, "model": cfg.model, "messages": messages, "temperature": temperature}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens

        attempts = 0
        while True:
            attempts += 1
            try:
                text, usage, finish_reason = await self._attempt(body)
                parsed = self._validate(validate, text)
            except _AttemptFailed as failure:
                self.stats.errors[failure.kind] += 1
                if not failure.retryable or attempts > cfg.max_retries:
                    self.stats.failures += 1
                    why = "not retryable" if not failure.retryable else f"gave up after {attempts} attempts"
                    raise LLMError(
                        f"chat request failed ({why}): {failure.cause}",
                        kind=failure.kind,
                        cause=failure.cause,
                        attempts=attempts,
                        status=failure.status,
                    ) from failure.__cause__
                self.stats.retries += 1
                await asyncio.sleep(self._backoff(attempts - 1, failure.retry_after))
                continue
            self.stats.successes += 1
            await self._cache_store(key, body, text, usage, finish_reason)
            return ChatResult(
                text=text, parsed=parsed, usage=usage, cached=False, attempts=attempts, finish_reason=finish_reason
            )

    def _backoff(self, retry_index: int, retry_after: float | None) -> float:
        """Full jitter (uniform over [0, capped exponential]) spreads retries of a burst of failures
        instead of sending them back in lockstep; a server's ``Retry-After`` is a floor, not a hint."""
        cfg = self.config
        delay = random.uniform(0.0, min(cfg.backoff_max_s, cfg.backoff_base_s * 2**retry_index))
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    @staticmethod
    def _validate(validate: Callable[[str], Any] | None, text: str) -> Any:
        if validate is None:
            return None
        try:
            return validate(text)
        except Exception as exc:
            raise _AttemptFailed(
                "invalid", f"validator rejected the answer: {type(exc).__name__}: {exc}", retryable=True
            ) from exc

    async def _attempt(self, body: dict[str, Any]) -> tuple[str, dict[str, Any], str | None]:
        """One HTTP call under the concurrency gate (not held while backing off, so others proceed)."""
        assert self._http is not None and self._gate is not None
        async with self._gate:
            self.stats.requests += 1
            try:
                response = await self._http.post(self._url, json=body)
            except httpx.TimeoutException as exc:
                raise _AttemptFailed("timeout", f"timeout: {type(exc).__name__}", retryable=True) from exc
            except httpx.TransportError as exc:
                # Refused/reset connections and bodies cut short (a protocol error) alike.
                raise _AttemptFailed(
                    "connection", f"connection error: {type(exc).__name__}: {exc}", retryable=True
                ) from exc
        status = response.status_code
        self.stats.status_codes[status] += 1
        if status != 200:
            retryable = status >= 500 or status in _RETRYABLE_4XX
            retry_after = _parse_retry_after(response.headers.get("retry-after")) if status == 429 else None
            raise _AttemptFailed(
                f"http_{status}",
                f"HTTP {status}: {_short(response.text)}",
                retryable=retryable,
                status=status,
                retry_after=retry_after,
            )
        try:
            payload = response.json()
        except ValueError as exc:
            raise _AttemptFailed(
                "malformed", f"malformed body (not JSON): {_short(response.text)}", retryable=True
            ) from exc
        usage = payload.get("usage") if isinstance(payload, dict) else None
        usage = usage if isinstance(usage, dict) else {}
        self._bill(usage)
        try:
            choice = payload["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise _AttemptFailed(
                "malformed", f"malformed body (no choices[0].message.content): {_short(response.text)}", retryable=True
            ) from exc
        if not isinstance(text, str):
            raise _AttemptFailed("malformed", f"malformed body (content is {type(text).__name__})", retryable=True)
        finish_reason = choice.get("finish_reason") if isinstance(choice, dict) else None
        return text, usage, finish_reason

    def _bill(self, usage: dict[str, Any]) -> None:
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        self.stats.prompt_tokens += prompt
        self.stats.completion_tokens += completion
        cfg = self.config
        self.stats.cost += prompt / 1000 * cfg.price_per_1k_prompt + completion / 1000 * cfg.price_per_1k_completion

    # --- the on-disk cache -------------------------------------------------------------------------

    def _cache_path(self, key: str) -> Path | None:
        if self.config.cache_dir is None:
            return None
        return self.config.cache_dir / key[:2] / f"{key}.json"

    async def _cache_load(self, key: str, validate: Callable[[str], Any] | None) -> ChatResult | None:
        """The stored answer, or None. An unreadable entry, or one the current validator rejects
        (validators change between runs), is a miss: the request is simply made again."""
        path = self._cache_path(key)
        if path is None:
            return None
        try:
            entry = await asyncio.to_thread(_read_json, path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable cache entry %s: %s", path, exc)
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
            log.warning("ignoring malformed cache entry %s", path)
            return None
        text = entry["text"]
        try:
            parsed = validate(text) if validate is not None else None
        except Exception as exc:
            log.info("cached answer %s rejected by the validator (%s); asking again", key, exc)
            return None
        return ChatResult(
            text=text,
            parsed=parsed,
            usage=entry.get("usage") or {},
            cached=True,
            attempts=0,
            finish_reason=entry.get("finish_reason"),
        )

    async def _cache_store(
        self, key: str, request: dict[str, Any], text: str, usage: dict[str, Any], finish_reason: str | None
    ) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        entry = {
            "key": key,
            "base_url": self.config.base_url.rstrip("/"),
            "request": request,
            "text": text,
            "usage": usage,
            "finish_reason": finish_reason,
            "created": time.time(),
        }
        try:
            await asyncio.to_thread(write_json_atomic, path, entry)
        except OSError as exc:
            # The answer is still good; losing its cache entry only costs a repeat call on a rerun.
            log.warning("could not write cache entry %s: %s", path, exc)


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
