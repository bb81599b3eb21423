"""Text out of token ids for the API: final text, streamed deltas, reasoning split from the answer.

The rules follow vLLM's OpenAI server: an EOS or stop token id ends the text without appearing in
it; a stop string cuts the text where it starts (kept when ``include_stop_str_in_output``). While
streaming, text that might still turn out to be the start of a stop string is held back, and so is
a trailing replacement character (half of a multi-byte character).

Reasoning: a memento model thinks inside ``<think> ... </think>`` (blocks and mementos included) and
answers after it. :func:`split_reasoning` returns (reasoning, answer): the chat answer's ``reasoning``
(vLLM 0.32's name; also sent as ``reasoning_content``, the name of earlier vLLM and DeepSeek's API)
and ``content``. The vLLM backend's reasoning parser (:mod:`memento.vllm.reasoning`) splits with the
same function, and counts ``usage.completion_tokens_details.reasoning_tokens`` with
:func:`reasoning_token_count`, so both servers answer alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from memento.engine import SamplingParams

THINK_START = "<think>"
THINK_END = "</think>"


def final_text(
    tokenizer: Any,
    token_ids: list[int],
    finish_reason: str | None,
    stop_reason: Any,
    params: SamplingParams,
    skip_ids: frozenset[int] = frozenset(),
) -> str:
    """The text a finished (or aborted) sample returns (``skip_ids``: tokens left out of the text,
    for ``skip_special_tokens``)."""
    ids = token_ids
    ended_by_token = finish_reason == "eos" or (finish_reason == "stop" and isinstance(stop_reason, int))
    if ids and ended_by_token and not (finish_reason == "stop" and params.include_stop_str_in_output):
        ids = ids[:-1]
    if skip_ids:
        ids = [t for t in ids if t not in skip_ids]
    text = tokenizer.decode(ids)
    if isinstance(stop_reason, str):
        cut = text.find(stop_reason)
        if cut >= 0:
            text = text[: cut + (len(stop_reason) if params.include_stop_str_in_output else 0)]
    return text


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might be the start of a stop string (or half a character)."""
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    if text.endswith("\ufffd"):
        hold = max(hold, 1)
    return hold


@dataclass
class IncrementalText:
    """Turns one sample's growing token ids into text deltas that never need taking back.

    Decoding is incremental, as vLLM's detokenizer does it: only the tokens since the last emitted
    boundary (and a few before them, for context) are decoded per step, so a long answer costs
    O(1) per token instead of decoding the whole output again.
    """

    tokenizer: Any
    params: SamplingParams
    skip_ids: frozenset[int] = frozenset()  # tokens left out of the text (skip_special_tokens)
    emitted: int = 0  # characters of the text already sent
    text: str = ""  # the decoded text so far (whole characters only)
    _prefix: int = 0  # token offsets: tokens[_prefix:_read] decode to the tail of ``text``
    _read: int = 0
    _stopped: bool = False
    _kept: list[int] | None = None  # with skip_ids: the ids that are not skipped
    _seen: int = 0  # with skip_ids: how many of the sample's ids were looked at

    def _without_skipped(self, ids: list[int]) -> list[int]:
        if not self.skip_ids:
            return ids
        if self._kept is None:
            self._kept = []
        self._kept.extend(t for t in ids[self._seen :] if t not in self.skip_ids)
        self._seen = len(ids)
        return self._kept

    def _advance(self, ids: list[int]) -> None:
        """Append the text of ``ids[self._read:]`` to :attr:`text` (holding back half characters)."""
        if len(ids) <= self._read:
            return
        before = self.tokenizer.decode(ids[self._prefix : self._read])
        after = self.tokenizer.decode(ids[self._prefix :])
        if after.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return
        self.text += after[len(before) :]
        self._prefix, self._read = max(self._read - 4, 0), len(ids)

    def delta(self, token_ids: list[int], eos_token_ids: set[int]) -> str:
        """New text after the latest token (the token may end the sample: EOS and stop ids add nothing)."""
        if self._stopped:
            return ""
        ids = token_ids
        if ids and (ids[-1] in eos_token_ids or ids[-1] in self.params.stop_token_ids):
            ids = ids[:-1]
        ids = self._without_skipped(ids)
        start = max(0, len(self.text) - max((len(s) for s in self.params.stop), default=0))
        self._advance(ids)
        text = self.text
        for stop in self.params.stop:  # a stop string has appeared: the finish will cut there
            cut = text.find(stop, start)
            if cut >= 0:
                text, self._stopped = text[:cut], True
        ready = len(text) - (0 if self._stopped else held_back(text, self.params.stop))
        if ready <= self.emitted:
            return ""
        out = text[self.emitted : ready]
        self.emitted = ready
        return out

    def finish(self, final: str) -> str:
        """The rest of the text once the sample is finished."""
        out = final[self.emitted :] if len(final) > self.emitted else ""
        self.emitted = max(self.emitted, len(final))
        return out


def split_reasoning(text: str) -> tuple[str | None, str | None]:
    """(reasoning, answer). Without ``</think>`` everything after ``<think>`` is reasoning (unfinished)."""
    start = text.find(THINK_START)
    end = text.find(THINK_END)
    if start < 0 and end < 0:
        return None, text
    body_from = start + len(THINK_START) if start >= 0 and (end < 0 or start < end) else 0
    if end < 0:
        return text[body_from:].strip("\n") or None, None
    reasoning = text[body_from:end].strip("\n")
    answer = text[end + len(THINK_END) :].lstrip("\n")
    return reasoning or None, answer


def special_ids(tokenizer: Any, keep_think_tags: bool) -> frozenset[int]:
    """The ids ``skip_special_tokens`` leaves out of the text: the tokenizer's special tokens (the memento
    delimiters, EOS, ...), but not ``<think>``/``</think>`` where the chat's reasoning split needs them."""
    skip = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            skip.add(tokenizer.convert_tokens_to_ids(token.content))
    if keep_think_tags:
        skip -= set(think_token_ids(tokenizer) or ())
    return frozenset(skip)


def think_token_ids(tokenizer: Any) -> tuple[int, int] | None:
    """The ids of ``<think>`` and ``</think>`` when each is one token of ``tokenizer``, else None."""
    ids = []
    for tag in (THINK_START, THINK_END):
        encoded = tokenizer.encode(tag, add_special_tokens=False)
        if len(encoded) != 1:
            return None
        ids.append(int(encoded[0]))
    return ids[0], ids[1]


def reasoning_token_count(token_ids: Sequence[int], think_ids: tuple[int, int] | None) -> int:
    """The sampled tokens :func:`split_reasoning` puts in the reasoning, the tags left out (0 when the
    tags are not single tokens): the ``reasoning_tokens`` of ``usage.completion_tokens_details``."""
    if think_ids is None:
        return 0
    ids = list(token_ids)
    start_id, end_id = think_ids
    start = ids.index(start_id) if start_id in ids else -1
    end = ids.index(end_id) if end_id in ids else -1
    if start < 0 and end < 0:
        return 0
    body_from = start + 1 if start >= 0 and (end < 0 or start < end) else 0
    return (len(ids) if end < 0 else end) - body_from


@dataclass
class ReasoningStream:
    """Routes streamed text to the reasoning until ``</think>``, then to ``content``."""

    sent_reasoning: int = 0
    sent_answer: int = 0
    text: str = ""

    def push(self, delta: str, final: bool = False) -> tuple[str, str]:
        """(reasoning delta, answer delta) after appending ``delta`` to the sample's text."""
        self.text += delta
        text = self.text
        if not final:  # hold back what could be the start of a tag
            text = text[: len(text) - held_back(text, [THINK_START, THINK_END])]
        reasoning, answer = split_reasoning(text)
        reasoning, answer = reasoning or "", answer or ""
        r_delta = reasoning[self.sent_reasoning :] if len(reasoning) > self.sent_reasoning else ""
        a_delta = answer[self.sent_answer :] if len(answer) > self.sent_answer else ""
        self.sent_reasoning = max(self.sent_reasoning, len(reasoning))
        self.sent_answer = max(self.sent_answer, len(answer))
        return r_delta, a_delta
