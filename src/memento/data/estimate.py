"""What a ``memento data build`` will ask of the LLM, before it asks: requests, tokens and price.

Stage 2 (boundary scores) is known exactly before any call: the sentences and the window sizes fix
every window, so its requests are counted and its prompts are built and tokenised as the build will
send them; only the answers' length is estimated (the JSON object the prompt asks for, with one
digit per gap). Stage 4 (mementos) depends on the segmentation, which needs the scores, so it is
estimated from the trace's tokens under stated assumptions: blocks of ``block_tokens`` tokens,
mementos of ``memento_tokens``, judge answers of ``judge_tokens``, and between one round (every
memento accepted at once) and ``max_rounds`` (every memento rewritten) per block. The result says
which figures are exact and which rest on those assumptions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from memento.data.boundaries import BoundarySettings, boundary_messages, window_spans
from memento.data.sentences import split_sentences, split_think
from memento.data.summarize import SummarizeSettings, compressor_messages, judge_messages

MESSAGE_OVERHEAD_TOKENS = 4
"""Tokens a chat template adds around each message (role markers), as OpenAI counts them."""
CONTEXT_LINE_TOKENS = 3
"""The ``[i] `` and newline around each earlier memento shown to the compressor and the judge."""


@dataclass
class Calls:
    """Requests and tokens of one kind of call."""

    requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0

    def add(self, requests: int, prompt_tokens: int, output_tokens: int) -> None:
        self.requests += requests
        self.prompt_tokens += prompt_tokens
        self.output_tokens += output_tokens

    def price(self, per_1k_prompt: float, per_1k_output: float) -> float:
        return self.prompt_tokens / 1000 * per_1k_prompt + self.output_tokens / 1000 * per_1k_output


@dataclass
class BuildEstimate:
    """The LLM work of a build: boundaries exactly, mementos as a (one round, every round) range."""

    records: int = 0
    traces: int = 0
    """Records with text inside ``<think>`` (the others fail without a call)."""
    sentences: int = 0
    think_tokens: int = 0
    blocks: int = 0
    """Estimated: each trace's thinking tokens / ``block_tokens`` (at least one block)."""
    boundaries: Calls = field(default_factory=Calls)
    mementos_low: Calls = field(default_factory=Calls)
    mementos_high: Calls = field(default_factory=Calls)
    assumptions: dict[str, Any] = field(default_factory=dict)

    def price(self, per_1k_prompt: float, per_1k_output: float) -> tuple[float, float]:
        """(low, high) price at the given rates per 1,000 tokens."""
        base = self.boundaries.price(per_1k_prompt, per_1k_output)
        return (
            base + self.mementos_low.price(per_1k_prompt, per_1k_output),
            base + self.mementos_high.price(per_1k_prompt, per_1k_output),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _message_tokens(messages: list[dict], count: Callable[[str], int]) -> int:
    return sum(count(m["content"]) + MESSAGE_OVERHEAD_TOKENS for m in messages)


def estimate_build(
    records: Iterable[dict[str, Any] | str],
    count_tokens: Callable[[str], int],
    *,
    boundaries: BoundarySettings | None = None,
    summarize: SummarizeSettings | None = None,
    block_tokens: int = 1000,
    memento_tokens: int = 150,
    judge_tokens: int = 120,
) -> BuildEstimate:
    """Count the LLM work a build of ``records`` will do (see the module docstring); no call is made.

    ``records`` are the build's inputs (``problem`` and ``cot`` or ``response``); an unreadable one
    (a string: the reader's error) counts as a record and costs nothing, as in the build.
    """
    if block_tokens < 1 or memento_tokens < 1 or judge_tokens < 1:
        raise ValueError("block_tokens, memento_tokens and judge_tokens must be >= 1")
    boundaries = boundaries or BoundarySettings()
    summarize = summarize or SummarizeSettings()
    out = BuildEstimate(
        assumptions={
            "exact": "boundary requests and prompt tokens",
            "boundary_output": "the JSON object asked for, one digit per gap",
            "block_tokens": block_tokens,
            "memento_tokens": memento_tokens,
            "judge_tokens": judge_tokens,
            "rounds": [1, summarize.max_rounds],
            "message_overhead_tokens": MESSAGE_OVERHEAD_TOKENS,
        }
    )
    for record in records:
        out.records += 1
        if not isinstance(record, dict):
            continue
        problem = record.get("problem")
        cot = record.get("cot", record.get("response"))
        if not isinstance(problem, str) or not isinstance(cot, str):
            continue
        _, inside, _ = split_think(cot)
        sentences = [s.text for s in split_sentences(inside)]
        if not sentences:
            continue
        out.traces += 1
        out.sentences += len(sentences)
        think = sum(count_tokens(s) for s in sentences)
        out.think_tokens += think
        for size in boundaries.window_sizes:
            for span in window_spans(len(sentences), size):
                prompt = _message_tokens(boundary_messages(problem, sentences, span, boundaries), count_tokens)
                answer = count_tokens(json.dumps({str(g): 0 for g in list(span)[:-1]}))
                out.boundaries.add(1, prompt, answer)
        blocks = max(1, round(think / block_tokens))
        out.blocks += blocks
        # The prompts' fixed parts as the build renders them (empty block and mementos), then the
        # block's share of the thinking tokens and the earlier mementos each call shows.
        compressor = _message_tokens(
            compressor_messages(problem, [], "", max_chars=summarize.max_memento_chars), count_tokens
        )
        judge = _message_tokens(judge_messages(problem, [], "", ""), count_tokens)
        per_block = think / blocks
        for i in range(blocks):
            shown = i if summarize.context_mementos is None else min(i, summarize.context_mementos)
            context = shown * (memento_tokens + CONTEXT_LINE_TOKENS)
            write = (1, round(compressor + per_block + context), memento_tokens)
            check = (1, round(judge + per_block + context + memento_tokens), judge_tokens)
            out.mementos_low.add(*write)
            out.mementos_low.add(*check)
            for round_index in range(summarize.max_rounds):
                out.mementos_high.add(*write)
                out.mementos_high.add(*check)
                if round_index:  # a rewrite also shows the rejected memento and the judge's feedback
                    out.mementos_high.add(0, memento_tokens + judge_tokens, 0)
    return out
