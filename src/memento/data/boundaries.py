"""Stage 2 of the OpenMementos pipeline: an LLM scores every gap between sentences, 0 to 3.

0 mid-thought, 1 weak, 2 a clear transition, 3 a major one. The model sees windows of consecutive
sentences, numbered, and scores the gaps inside each. As in the paper's release, two passes with
window sizes that share no factor (16 and 11) put every gap at a different place in its window
in each pass; a gap's score is the mean of the passes that scored it.

Windows overlap by one sentence, so each pass scores every gap exactly once. An answer that does not
parse (missing gaps, out-of-range or non-integer scores, no JSON) is rejected inside the client's
retry loop; a window that still fails is recorded as missing for that pass, never guessed: the other
pass's score stands alone, and a gap neither pass scored is None (the segmenter counts it as 0).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from memento.data.llm import LLMClient, LLMError

SYSTEM = """You segment a chain of thought into blocks. You see numbered sentences of a reasoning trace.
For every gap between two consecutive sentences, rate how good a place it is to end one block of
reasoning and start the next:
0 = mid-thought: the next sentence continues the same step (never cut inside a calculation,
    a derivation, a list, or right after a sentence ending in ':' or '=');
1 = weak: a small shift inside the same step;
2 = clear transition: one sub-task or idea is finished and another starts;
3 = major transition: a phase of the solution ends (e.g. exploration -> verification, a new approach,
    the final answer).
Answer with one JSON object and nothing else, mapping each gap id to its integer score, e.g.
{"4": 0, "5": 2, "6": 1}. Gap id k is the gap between sentence k and sentence k+1."""


@dataclass(frozen=True)
class BoundarySettings:
    window_sizes: tuple[int, ...] = (16, 11)
    """Sentences per window, one pass per size (coprime sizes vary each gap's place in its window)."""
    max_sentence_chars: int = 1500
    """Longer sentences are shown cut in the middle (the model only needs their start and end)."""

    def __post_init__(self) -> None:
        if not self.window_sizes or any(size < 2 for size in self.window_sizes):
            raise ValueError(f"window sizes must be >= 2, got {self.window_sizes}")


@dataclass
class BoundaryScores:
    """Per gap: the mean over passes (None: no pass scored it); per pass: each gap's raw score."""

    scores: list[float | None]
    passes: list[list[int | None]]
    failed_windows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def missing(self) -> int:
        return sum(score is None for score in self.scores)


def window_spans(n_sentences: int, size: int) -> list[range]:
    """Consecutive windows of ``size`` sentences overlapping by one: each gap lies in exactly one."""
    if n_sentences < 2:
        return []
    step = size - 1
    return [range(start, min(start + size, n_sentences)) for start in range(0, n_sentences - 1, step)]


def _shown(sentence: str, limit: int) -> str:
    text = " ".join(sentence.split())
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]} [...] {text[-half:]}"


def boundary_messages(problem: str, sentences: Sequence[str], span: range, settings: BoundarySettings) -> list[dict]:
    """The chat for one window: the problem for context, the numbered sentences, the gap ids wanted."""
    lines = [f"[{i}] {_shown(sentences[i], settings.max_sentence_chars)}" for i in span]
    gaps = ", ".join(str(i) for i in list(span)[:-1])
    user = (
        f"Problem (for context):\n{_shown(problem, 2000)}\n\nSentences:\n"
        + "\n".join(lines)
        + f"\n\nScore the gaps {gaps}."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)


def parse_scores(text: str, expected: Sequence[int]) -> dict[int, int]:
    """The gap scores in a model's answer; ValueError unless every expected gap has an integer 0-3.

    Accepts the JSON object alone, in a code fence or after some prose (the last object wins).
    """
    found = _OBJECT.findall(text)
    if not found:
        raise ValueError("no JSON object in the answer")
    try:
        raw = json.loads(found[-1])
    except json.JSONDecodeError as err:
        raise ValueError(f"the JSON object does not parse: {err}") from None
    scores: dict[int, int] = {}
    for key, value in raw.items():
        try:
            gap = int(str(key).strip())
        except ValueError:
            raise ValueError(f"gap id {key!r} is not a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise ValueError(f"gap {gap}: score {value!r} is not an integer")
        if not 0 <= value <= 3:
            raise ValueError(f"gap {gap}: score {value} is outside 0-3")
        scores[gap] = int(value)
    missing = [g for g in expected if g not in scores]
    if missing:
        raise ValueError(f"no score for gaps {missing}")
    return {g: scores[g] for g in expected}


async def score_boundaries(
    client: LLMClient, problem: str, sentences: Sequence[str], settings: BoundarySettings | None = None
) -> BoundaryScores:
    """Score every gap of one trace: all windows of all passes concurrently (the client bounds them)."""
    settings = settings or BoundarySettings()
    n = len(sentences)
    passes: list[list[int | None]] = [[None] * max(n - 1, 0) for _ in settings.window_sizes]
    failed: list[dict[str, Any]] = []

    async def one(pass_index: int, span: range) -> None:
        expected = list(span)[:-1]
        try:
            result = await client.chat(
                boundary_messages(problem, sentences, span, settings),
                validate=lambda text: parse_scores(text, expected),
            )
        except LLMError as err:
            failed.append({"pass": pass_index, "start": span.start, "stop": span.stop, "error": str(err)})
            return
        for gap, score in result.parsed.items():
            passes[pass_index][gap] = score

    await asyncio.gather(
        *(one(p, span) for p, size in enumerate(settings.window_sizes) for span in window_spans(n, size))
    )
    scores: list[float | None] = []
    for gap in range(max(n - 1, 0)):
        got = [p[gap] for p in passes if p[gap] is not None]
        scores.append(sum(got) / len(got) if got else None)
    failed.sort(key=lambda f: (f["pass"], f["start"]))
    return BoundaryScores(scores, passes, failed)
