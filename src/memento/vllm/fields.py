"""The embedded server's answer fields on vLLM's OpenAI server: an ASGI middleware.

``memento serve --backend vllm`` adds it (``--middleware memento.vllm.fields.MementoFields``). On
``POST /v1/chat/completions`` and ``/v1/completions`` it

* copies ``reasoning`` to ``reasoning_content`` in chat messages and stream deltas (vLLM 0.32 sends
  only ``reasoning``; the embedded server sends both, for clients of either name);
* adds ``peak_kv_tokens`` and ``evicted_tokens`` to every ``usage``. The scheduler that evicts runs
  in vLLM's engine process, so the figures are computed here from the request's token ids by the
  rule the scheduler applies (masking.py: :func:`memento.eval.kvsim.replay_live_kv` for the live KV
  at each step, a :class:`memento.masking.SequenceTracker` for the evictions), under the server's
  memento settings: the same figures the embedded engine measures for the same tokens. The two
  fields are null where the ids are not to be had (vLLM hides those of a chat stream whose
  ``include_reasoning`` is false) or the rule is not (a server without memento tokens);
* asks vLLM for those token ids (``return_token_ids``) and hides them again (null, as vLLM sends
  them when not asked) unless the client asked for them;
* defaults ``skip_special_tokens`` to false: the memento tokens are special tokens, and the embedded
  server never drops them from the text.

Everything else (other routes, error answers, error events of a stream) passes through untouched.
No vLLM import: it runs on the ASGI messages alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from memento.chat import tracked_prefix
from memento.eval.kvsim import replay_live_kv
from memento.format import MementoFormatError, SpecialTokenIds
from memento.masking import MaskConfig, SequenceTracker
from memento.vllm.config import MementoSettings

logger = logging.getLogger(__name__)

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ROUTES = ("/v1/chat/completions", "/v1/completions")
KV_FIELDS = ("peak_kv_tokens", "evicted_tokens")


@dataclass(frozen=True)
class KVRule:
    """What the scheduler evicts by: the memento token ids, the mask, the assistant prefix, the policy."""

    specials: SpecialTokenIds
    mask: MaskConfig
    assistant_prefix: list[int] | None
    strict: bool

    @classmethod
    def from_settings(cls, settings: MementoSettings, tokenizer: Any) -> KVRule:
        prefix = tracked_prefix(settings.mask, settings.assistant_prefix, tokenizer)
        return cls(SpecialTokenIds.from_tokenizer(tokenizer), settings.mask, prefix, settings.strict)

    def peak(self, prompt: Sequence[int], output: Sequence[int]) -> int:
        """The sample's peak live KV: the most keys any of its decode steps attended to."""
        if not output:
            return 0
        ids = [*prompt, *output]
        return max(replay_live_kv(ids, len(prompt), self.specials, self.mask, self.assistant_prefix))

    def evicted(self, prompt: Sequence[int], output: Sequence[int]) -> int:
        """Tokens evicted from the sample's KV, counted as the engines count them: the prompt's
        evictions, then each sampled token's, up to a structure defect (the request stops there)."""
        tracker = SequenceTracker(self.specials, self.mask, self.assistant_prefix, stop_on_format_error=self.strict)
        try:
            tracker.count.add(tracker.feed(list(prompt)))
            for token in output:
                tracker.count.add(tracker.feed([int(token)]))
        except MementoFormatError:
            pass
        return tracker.count.evicted_tokens

    def usage(self, prompt: Sequence[int] | None, outputs: Sequence[Sequence[int]] | None) -> dict[str, int | None]:
        """The request's KV fields (the peak over its samples, the evictions summed), null without ids."""
        if prompt is None or outputs is None:
            return dict.fromkeys(KV_FIELDS)
        return {
            "peak_kv_tokens": max((self.peak(prompt, out) for out in outputs), default=0),
            "evicted_tokens": sum(self.evicted(prompt, out) for out in outputs),
        }


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes:
    return next((value for key, value in headers if key.lower() == name), b"")


def _with_length(headers: Sequence[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k.lower() != b"content-length"] + [(b"content-length", str(length).encode())]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class _Answer:
    """One request's answer rewritten on its way out: a JSON body or a stream of events."""

    def __init__(self, rule: KVRule | None, hide_ids: bool, send: Send) -> None:
        self.rule, self.hide_ids, self._send = rule, hide_ids, send
        self.start: Message | None = None
        self.mode = "json"  # or "stream", or "pass"
        self.buffer = b""
        self.prompt: list[int] | None = None
        self.outputs: dict[int, list[int]] = {}
        self.ids_missing = False

    # -- the fields --------------------------------------------------------------------------

    def _kv(self) -> dict[str, int | None]:
        outputs = None if self.ids_missing or not self.outputs else list(self.outputs.values())
        if self.rule is None:
            return dict.fromkeys(KV_FIELDS)
        return self.rule.usage(self.prompt, outputs)

    def _take_ids(self, holder: dict[str, Any], key: str) -> list[int] | None:
        ids = holder.get(key)
        if self.hide_ids and key in holder:
            holder[key] = None
        return ids if isinstance(ids, list) else None

    def rewrite(self, obj: Any) -> Any:
        """A response or stream chunk with the fields added (an error object or anything else: as is)."""
        if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
            return obj
        prompt = self._take_ids(obj, "prompt_token_ids")
        for choice in obj["choices"]:
            if not isinstance(choice, dict):
                continue
            prompt = self._take_ids(choice, "prompt_token_ids") or prompt
            index = choice.get("index", 0)
            if "token_ids" in choice:
                ids = self._take_ids(choice, "token_ids")
                if ids is None:
                    self.ids_missing = True
                else:
                    self.outputs.setdefault(index, []).extend(ids)
            elif "text" in choice or "message" in choice:
                self.ids_missing = True
            for key in ("message", "delta"):
                part = choice.get(key)
                if isinstance(part, dict) and "reasoning" in part:
                    part["reasoning_content"] = part["reasoning"]
        if prompt is not None:
            self.prompt = prompt
        usage = obj.get("usage")
        if isinstance(usage, dict):
            usage.update(self._kv())
        return obj

    # -- the ASGI messages -------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            if message.get("status") != 200:
                self.mode = "pass"
            elif _header(headers, b"content-type").startswith(b"text/event-stream"):
                self.mode = "stream"
            if self.mode == "json":
                self.start = message  # sent with the rewritten body (its length changes)
            else:
                await self._send(message)
            return
        if message["type"] != "http.response.body" or self.mode == "pass":
            await self._send(message)
            return
        more = bool(message.get("more_body", False))
        self.buffer += message.get("body", b"")
        if self.mode == "stream":
            events = self.buffer.split(b"\n\n")
            self.buffer = events.pop()
            out = b"".join(self._event(event) + b"\n\n" for event in events)
            if not more:
                out, self.buffer = out + self.buffer, b""
            await self._send({"type": "http.response.body", "body": out, "more_body": more})
            return
        if more:
            return
        body = self.buffer
        with contextlib.suppress(ValueError):  # not JSON: as it is
            body = _dumps(self.rewrite(json.loads(body)))
        assert self.start is not None
        start = dict(self.start)
        start["headers"] = _with_length(list(self.start.get("headers", [])), len(body))
        await self._send(start)
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    def _event(self, event: bytes) -> bytes:
        """One server-sent event: its ``data:`` chunk rewritten (``[DONE]`` and the rest as they are)."""
        if not event.startswith(b"data: "):
            return event
        payload = event[len(b"data: ") :]
        if payload.strip() == b"[DONE]":
            return event
        try:
            return b"data: " + _dumps(self.rewrite(json.loads(payload)))
        except ValueError:
            return event


async def _read_body(receive: Receive) -> tuple[bytes, Message | None]:
    """The request body, or what came instead of its end (a disconnect) to hand on."""
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return body, message
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body, None


def _replay(body: bytes, receive: Receive, interrupted: Message | None) -> Receive:
    """A ``receive`` that gives ``body`` once, then what the client sends next."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
    if interrupted is not None:
        pending = [{"type": "http.request", "body": body, "more_body": True}, interrupted]

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


class MementoFields:
    """``--middleware memento.vllm.fields.MementoFields`` (see the module docstring)."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app
        self._rule: KVRule | None = None
        self._rule_loaded = False

    def _kv_rule(self, scope: Message) -> KVRule | None:
        """The server's eviction rule, read once from the app's vLLM config (None when there is none)."""
        if not self._rule_loaded:
            self._rule_loaded = True
            config = getattr(getattr(scope.get("app"), "state", None), "vllm_config", None)
            try:
                from transformers import AutoTokenizer

                model = config.model_config
                tokenizer = AutoTokenizer.from_pretrained(model.tokenizer, trust_remote_code=model.trust_remote_code)
                self._rule = KVRule.from_settings(MementoSettings.from_vllm_config(config), tokenizer)
            except Exception as err:  # the server still answers; its KV fields are null
                logger.warning("memento: no KV fields in usage (%s: %s)", type(err).__name__, err)
        return self._rule

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in ROUTES:
            await self.app(scope, receive, send)
            return
        body, interrupted = await _read_body(receive)
        try:
            request = json.loads(body) if interrupted is None else None
        except ValueError:
            request = None
        if not isinstance(request, dict):  # vLLM answers it (a 400)
            await self.app(scope, _replay(body, receive, interrupted), send)
            return
        asked = bool(request.get("return_token_ids"))
        request["return_token_ids"] = True
        request.setdefault("skip_special_tokens", False)
        body = _dumps(request)
        scope = dict(scope)
        scope["headers"] = _with_length(list(scope.get("headers", [])), len(body))
        answer = _Answer(self._kv_rule(scope), hide_ids=not asked, send=send)
        await self.app(scope, _replay(body, receive, None), answer.send)
