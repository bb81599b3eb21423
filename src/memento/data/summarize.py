"""Stage 4 of the OpenMementos pipeline: one memento per block, written by a compressor, scored by a judge.

The MEMENTO recipe: a compressor LLM reads the problem, the mementos already written for the earlier
blocks and the current block, and writes a terse memento (semicolon clauses, ``name: value`` pairs,
compact math). A judge LLM scores it 0-10 on a fixed rubric (:data:`RUBRIC`) minus deductions; below
the threshold (tau = 8) the judge's feedback and the rejected memento go back to the compressor for a
rewrite. By default that is at most two rounds: compress -> judge -> compress -> judge.

Why the care over failures: mementos are training targets. A memento the pipeline cannot vouch for
must be visible as such, never papered over. So a judgement that cannot be parsed is retried by the
client (through ``validate``) and, if it stays unparseable, recorded as ``None`` with the error, not
guessed; a compressor answer that could corrupt the training format (special tokens, ``<think>``) or
that ignores the length budget is likewise rejected and retried. Every round is kept in
:attr:`MementoResult.rounds`, so the pipeline's reports can show what the judge said and why.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

from memento.data.llm import LLMClient, LLMError
from memento.format import MEMENTO_TOKENS, SPECIAL_TOKENS

__all__ = [
    "COMPRESSOR_SYSTEM",
    "JUDGE_SYSTEM",
    "RUBRIC",
    "Judgement",
    "MementoResult",
    "SummarizeSettings",
    "check_memento",
    "compressor_messages",
    "judge_messages",
    "parse_judgement",
    "summarize_block",
    "summarize_trace",
]

log = logging.getLogger(__name__)

RUBRIC: dict[str, int] = {
    "formulas": 3,
    "values": 2,
    "methods": 2,
    "verification": 1,
    "faithful": 1,
    "result_first": 1,
}
"""Each criterion's maximum score (the minimum is 0); the maxima add up to 10."""

MAX_SCORE = sum(RUBRIC.values())


@dataclass
class SummarizeSettings:
    """How demanding the judge loop is and how much context each call gets."""

    threshold: int = 8
    """A memento scoring at least this (the paper's tau) is accepted and ends the loop."""
    max_rounds: int = 2
    """Compress + judge rounds per block; rounds after the first are rewrites driven by the judge's feedback."""
    max_memento_chars: int | None = 2000
    """A longer answer counts as a failed compression (the client retries it); ``None``: no cap.

    A memento that is nearly as long as its block defeats the purpose (the block is evicted to save
    context), and very long answers are usually the compressor copying the block or rambling."""
    context_mementos: int | None = None
    """How many of the previous mementos the compressor and the judge see (the most recent ones);
    ``None``: all of them, as the model will at inference time."""

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= MAX_SCORE:
            raise ValueError(f"threshold must be within 0..{MAX_SCORE}, got {self.threshold}")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")
        if self.max_memento_chars is not None and self.max_memento_chars < 1:
            raise ValueError(f"max_memento_chars must be >= 1 or None, got {self.max_memento_chars}")
        if self.context_mementos is not None and self.context_mementos < 0:
            raise ValueError(f"context_mementos must be >= 0 or None, got {self.context_mementos}")


# --- prompts ---------------------------------------------------------------------------------------

_FORBIDDEN = ", ".join(MEMENTO_TOKENS)

COMPRESSOR_SYSTEM = f"""\
You compress one block of a step-by-step mathematical or scientific reasoning trace into a memento.
The block will be deleted from the context; the memento replaces it. Whoever continues the reasoning
sees only the problem, the earlier mementos and your memento, so the memento must carry everything
from the block that later steps may need.

Rules:
- Result first: open with what the block established, decided or ruled out; supporting details follow.
- Formulas verbatim: copy every equation, formula and expression the block derived or relied on exactly,
  in compact math notation (e.g. x^2+3x-4=0, a_n=2a_(n-1)+1, S=n(n+1)/2). Never paraphrase a formula in words.
- Numerical values: keep every value that matters (intermediate results, constants, case values, final
  answers) as name: value pairs.
- Methods: name the methods, theorems and tricks used (e.g. Vieta; casework on parity; AM-GM; substitution u=x+1).
- Verification: if the block checked something, state what was checked and the outcome (including failed checks).
- Faithful: record only what the block actually did and confirmed. Add nothing that is not in the block; do not
  state a conjecture, guess or abandoned attempt as a finding (mark it as tentative or rejected, or drop it).
- No process narration ("first I", "then we try", "the model considers", "let me"): state findings.
- Do not restate what the earlier mementos already record unless this block changed it.

Style: terse clauses separated by semicolons; name: value pairs; compact math. No headings, no bullet
lists, no markdown, no preamble, no closing remarks.

Output format: only the memento text, nothing before or after it. Never write <think> or </think>, and never
write any of these special tokens: {_FORBIDDEN}."""

JUDGE_SYSTEM = """\
You are a strict reviewer of mementos. A memento is a terse summary of one block of a step-by-step reasoning
trace; the block will be deleted and the memento must replace it for whoever continues the reasoning. You get
the problem, the earlier mementos, the block and the memento to review. Compare the memento with the block.

Score each criterion (integers only):
- formulas (0-3): every equation, formula and expression the block derived or used appears verbatim in the
  memento (compact notation is fine; wording instead of the formula is not). 3: all; 2: a minor one missing or
  altered; 1: important ones missing or paraphrased; 0: formulas largely lost or wrong. Give 3 if the block has none.
- values (0-2): every numerical value that matters is present and correct. 2: all; 1: some missing; 0: critical
  values missing or wrong.
- methods (0-2): the methods, theorems and tricks used are named. 2: all; 1: some; 0: none.
- verification (0-1): checks the block made and their outcomes are kept. 1 also if the block made no checks.
- faithful (0-1): nothing is invented; only findings the block confirmed are stated as findings (conjectures and
  abandoned attempts are not presented as results). 0 on any hallucination.
- result_first (0-1): the memento opens with the block's result, not with the process.

Deductions (points subtracted from the sum of the scores, as one non-negative integer):
- hallucinated content (anything not in the block, or an unconfirmed claim stated as fact): 2-3 points;
- process narration ("first I", "then we try", "the model considers", ...): 1 point;
- a paraphrased formula (words or a different form instead of the block's formula): 1 point each, at most 2;
- a missing critical value (one later steps depend on): 1 point each, at most 2.

total = max(0, min(10, sum of the six scores - deductions)).

feedback: concrete and actionable instructions for a rewrite: name exactly which formulas, values, methods or
checks to add or fix (quote them from the block), what to remove, and how to reorder. If nothing needs fixing,
say so briefly.

Output format: exactly one JSON object and nothing else, with integers for all numbers:
{"scores": {"formulas": 0, "values": 0, "methods": 0, "verification": 0, "faithful": 0, "result_first": 0},
 "deductions": 0, "total": 0, "feedback": "..."}
Inside the JSON strings, escape backslashes (\\\\) and double quotes (\\")."""


def _context(previous: list[str]) -> str:
    if not previous:
        return "(none: this is the first block)"
    return "\n".join(f"[{i}] {memento}" for i, memento in enumerate(previous, 1))


def compressor_messages(
    problem: str,
    previous: list[str],
    block: str,
    feedback: str | None = None,
    previous_attempt: str | None = None,
    *,
    max_chars: int | None = None,
) -> list[dict]:
    """The compressor's chat: the problem, the earlier mementos and the block, plus on a rewrite the
    rejected memento and the judge's feedback on it.

    The sections are delimited by tags because blocks are free text that may contain anything,
    headings included; the instruction comes last so it is the freshest thing the model reads.
    """
    parts = [
        f"<problem>\n{problem}\n</problem>",
        f"<earlier_mementos>\n{_context(previous)}\n</earlier_mementos>",
        f"<block>\n{block}\n</block>",
    ]
    if previous_attempt is not None:
        parts.append(f"<previous_memento>\n{previous_attempt}\n</previous_memento>")
    if feedback is not None:
        parts.append(f"<reviewer_feedback>\n{feedback}\n</reviewer_feedback>")
    if feedback is not None or previous_attempt is not None:
        task = (
            "Rewrite the memento for the block above, fixing every issue the reviewer raised while following "
            "all the rules. Output only the new memento."
        )
    else:
        task = "Write the memento for the block above. Output only the memento."
    if max_chars is not None:
        task += f" Keep it under {max_chars} characters."
    parts.append(task)
    return [{"role": "system", "content": COMPRESSOR_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def judge_messages(problem: str, previous: list[str], block: str, memento: str) -> list[dict]:
    """The judge's chat: the same context the compressor had, and the memento to score against the block."""
    user = "\n\n".join(
        [
            f"<problem>\n{problem}\n</problem>",
            f"<earlier_mementos>\n{_context(previous)}\n</earlier_mementos>",
            f"<block>\n{block}\n</block>",
            f"<memento>\n{memento}\n</memento>",
            "Score the memento against the block. Output only the JSON object.",
        ]
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


# --- parsing the answers ---------------------------------------------------------------------------


def check_memento(text: str, max_chars: int | None = None) -> str:
    """The compressor's answer as a memento (stripped), or ValueError so the client asks again.

    Special tokens or ``<think>`` tags inside a memento would corrupt the rendered training trace
    (the grammar would see a block or summary boundary that is not one); an over-long answer is not
    a compression.
    """
    memento = text.strip()
    if not memento:
        raise ValueError("empty memento")
    found = [tok for tok in SPECIAL_TOKENS if tok in memento]
    if found:
        raise ValueError(f"memento contains special tokens: {found}")
    if max_chars is not None and len(memento) > max_chars:
        raise ValueError(f"memento has {len(memento)} characters, over the cap of {max_chars}")
    return memento


@dataclass(frozen=True)
class Judgement:
    """A parsed, checked judge verdict; ``total`` always equals ``clamp(sum(scores) - deductions, 0, 10)``."""

    scores: dict[str, int]
    deductions: int
    total: int
    feedback: str
    reported_total: int | None = None
    """The judge's own total when it disagreed with its parts (and was replaced); ``None`` when it agreed."""

    @property
    def recomputed(self) -> bool:
        return self.reported_total is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "scores": dict(self.scores),
            "deductions": self.deductions,
            "total": self.total,
            "feedback": self.feedback,
            "reported_total": self.reported_total,
        }


_JSON_ESCAPE = re.compile(r'\\(["\\/bfnrtu])|\\')


def _repair_escapes(text: str) -> str:
    """Double every backslash that does not start a valid JSON escape: judges quote LaTeX (``\\sqrt``)
    in their feedback without escaping it, which is otherwise a perfectly good verdict."""
    return _JSON_ESCAPE.sub(lambda m: m.group(0) if m.group(1) else "\\\\", text)


def _top_level_objects(text: str) -> list[Any]:
    """Every JSON object in ``text`` that is not nested in another one, in order of appearance.

    Scanning with ``raw_decode`` from each ``{`` finds objects inside fences and prose alike; after a
    hit the scan resumes past its end, so the inner ``scores`` object is not counted on its own.
    """
    decoder = json.JSONDecoder()
    found = []
    i = text.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            found.append(obj)
        i = text.find("{", end)
    return found


def _extract_json(text: str) -> dict[str, Any]:
    for candidate in (text, _repair_escapes(text)):
        objects = _top_level_objects(candidate)
        with_scores = [obj for obj in objects if "scores" in obj]
        if with_scores:
            return with_scores[-1]
    objects = _top_level_objects(text)
    if objects:
        return objects[-1]  # no verdict-shaped object: let the field checks say what is wrong with it
    raise ValueError("no JSON object in the judge's answer")


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name} must be an integer, got {value!r}")
        value = int(value)
    return value


def parse_judgement(text: str) -> Judgement:
    """The judge's verdict from its answer, or ValueError (the client then asks again).

    Accepts the JSON alone, in a fenced block or surrounded by prose (the last top-level object that
    has ``scores`` wins: models often restate a draft before the final answer). Every rubric score must
    be present and within its range; a total that disagrees with ``clamp(sum - deductions, 0, 10)`` is
    replaced by the recomputed one and noted in :attr:`Judgement.reported_total`, because the parts
    are what the judge actually assessed and arithmetic is where models slip.
    """
    data = _extract_json(text)
    scores_in = data.get("scores")
    if not isinstance(scores_in, Mapping):
        raise ValueError(f"'scores' must be an object, got {scores_in!r}")
    unknown = sorted(set(scores_in) - set(RUBRIC))
    missing = [name for name in RUBRIC if name not in scores_in]
    if unknown or missing:
        raise ValueError(f"scores do not match the rubric: missing {missing}, unknown {unknown}")
    scores = {}
    for name, top in RUBRIC.items():
        value = _as_int(scores_in[name], f"scores.{name}")
        if not 0 <= value <= top:
            raise ValueError(f"scores.{name} = {value} is outside 0..{top}")
        scores[name] = value
    if "deductions" not in data:
        raise ValueError("missing 'deductions'")
    deductions = _as_int(data["deductions"], "deductions")
    if deductions < 0:
        raise ValueError(f"deductions must be >= 0, got {deductions}")
    if "total" not in data:
        raise ValueError("missing 'total'")
    reported = _as_int(data["total"], "total")
    feedback = data.get("feedback")
    if not isinstance(feedback, str):
        raise ValueError(f"'feedback' must be a string, got {feedback!r}")
    total = max(0, min(MAX_SCORE, sum(scores.values()) - deductions))
    if reported != total:
        log.info("judge total %d disagrees with its parts; using the recomputed %d", reported, total)
    return Judgement(
        scores=scores,
        deductions=deductions,
        total=total,
        feedback=feedback.strip(),
        reported_total=reported if reported != total else None,
    )


# --- the loop --------------------------------------------------------------------------------------


@dataclass
class MementoResult:
    """The memento chosen for one block, and the record of how it was reached."""

    memento: str | None
    """``None`` only if no compression succeeded."""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    """One entry per round: ``round`` (1-based), ``memento``, ``judgement`` (:meth:`Judgement.as_dict` or
    ``None``), ``feedback``, ``cached`` / ``judge_cached`` (answers from the cache), ``finish_reason``
    and ``error`` (why the round stopped short, if it did)."""
    final_score: int | None = None
    """The judge's total for :attr:`memento`; ``None`` when it was never judged successfully."""
    accepted: bool = False
    """Whether :attr:`final_score` reached the threshold."""
    error: str | None = None
    """The last failure (compression or judging) that cut the loop short, if any."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _context_window(previous: list[str], n: int | None) -> list[str]:
    if n is None:
        return list(previous)
    return list(previous[len(previous) - n :]) if n else []


async def summarize_block(
    client: LLMClient,
    problem: str,
    previous: list[str],
    block: str,
    settings: SummarizeSettings | None = None,
    judge_client: LLMClient | None = None,
) -> MementoResult:
    """Compress ``block`` into a memento, judge it, and rewrite from the judge's feedback until it
    scores at least ``settings.threshold`` or ``settings.max_rounds`` rounds are spent.

    The memento kept is the best-scoring one across rounds (ties go to the later round, which had the
    benefit of feedback): a rewrite can score worse than its original. If the judge fails (after the
    client's retries) the latest memento is kept unscored, since there is no verdict to compare it by
    and no feedback to rewrite from; if a compression fails the loop stops with what it has. Neither
    failure raises: the error is recorded and the pipeline decides what to do with the item.
    """
    settings = settings or SummarizeSettings()
    judge = judge_client or client
    context = _context_window(previous, settings.context_mementos)
    validate_memento = partial(check_memento, max_chars=settings.max_memento_chars)
    result = MementoResult(memento=None)
    best: tuple[int, str] | None = None  # (score, memento) of the best judged round so far
    feedback: str | None = None
    attempt: str | None = None

    for number in range(1, settings.max_rounds + 1):
        messages = compressor_messages(problem, context, block, feedback, attempt, max_chars=settings.max_memento_chars)
        try:
            compressed = await client.chat(messages, validate=validate_memento)
        except LLMError as exc:
            result.error = f"compression failed in round {number}: {exc}"
            log.warning("%s", result.error)
            break
        memento: str = compressed.parsed
        if compressed.finish_reason == "length":
            log.warning("round %d memento was cut at max_tokens; judging it as it is", number)
        record: dict[str, Any] = {
            "round": number,
            "memento": memento,
            "judgement": None,
            "feedback": None,
            "cached": compressed.cached,
            "judge_cached": None,
            "finish_reason": compressed.finish_reason,
            "error": None,
        }
        result.rounds.append(record)
        try:
            judged = await judge.chat(judge_messages(problem, context, block, memento), validate=parse_judgement)
        except LLMError as exc:
            record["error"] = result.error = f"judge failed in round {number}: {exc}"
            log.warning("%s", result.error)
            result.memento, result.final_score, result.accepted = memento, None, False
            return result
        judgement: Judgement = judged.parsed
        record.update(judgement=judgement.as_dict(), feedback=judgement.feedback, judge_cached=judged.cached)
        if best is None or judgement.total >= best[0]:
            best = (judgement.total, memento)
        if judgement.total >= settings.threshold:
            break
        feedback, attempt = judgement.feedback, memento

    if best is not None:
        result.final_score, result.memento = best
        result.accepted = result.final_score >= settings.threshold
    return result


async def summarize_trace(
    client: LLMClient,
    problem: str,
    blocks: list[str],
    settings: SummarizeSettings | None = None,
    judge_client: LLMClient | None = None,
) -> list[MementoResult]:
    """One :class:`MementoResult` per block, in order, each block seeing the mementos chosen for the
    earlier ones.

    Sequential by necessity: a memento is written relative to the previous ones (it need not repeat
    them), so block i cannot start before block i - 1 is settled. Concurrency comes from running many
    traces at once. Once a block ends with no memento the trace cannot become a memento trace, so the
    remaining blocks are not sent (each gets ``memento=None`` and an error saying why) to save the calls.
    """
    settings = settings or SummarizeSettings()
    results: list[MementoResult] = []
    chosen: list[str] = []
    for index, block in enumerate(blocks):
        if len(chosen) < index:
            results.append(MementoResult(memento=None, error=f"skipped: block {len(chosen)} has no memento"))
            continue
        result = await summarize_block(client, problem, chosen, block, settings, judge_client)
        results.append(result)
        if result.memento is not None:
            chosen.append(result.memento)
    return results
