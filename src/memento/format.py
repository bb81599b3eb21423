"""The memento trace format: special tokens, the grammar, parse/render, validation, records.

A memento response looks like::

    <think>
    <|block_start|> reasoning 1 <|block_end|><|summary_start|> memento 1 <|summary_end|>
    <|block_start|> reasoning 2 <|block_end|><|summary_start|> memento 2 <|summary_end|>
    </think>
    final answer

The grammar is defined once, by :class:`StructureParser`, an incremental parser over the special
tokens. Text parsing, token-id parsing and :mod:`memento.masking` all drive that one parser, so
"well-formed" means the same thing everywhere, and every defect is reported with its position and
a reason.
"""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

BLOCK_START = "<|block_start|>"
BLOCK_END = "<|block_end|>"
SUMMARY_START = "<|summary_start|>"
SUMMARY_END = "<|summary_end|>"
THINK_START = "<think>"
THINK_END = "</think>"

MEMENTO_TOKENS: tuple[str, ...] = (BLOCK_START, BLOCK_END, SUMMARY_START, SUMMARY_END)
"""The four tokens a memento model learns (added to the tokenizer as special tokens)."""
THINK_TOKENS: tuple[str, ...] = (THINK_START, THINK_END)
SPECIAL_TOKENS: tuple[str, ...] = MEMENTO_TOKENS + THINK_TOKENS


class Kind(enum.IntEnum):
    """What a token (or a text segment) is, as far as the grammar cares."""

    PLAIN = 0
    BLOCK_START = 1
    BLOCK_END = 2
    SUMMARY_START = 3
    SUMMARY_END = 4
    THINK_START = 5
    THINK_END = 6


TEXT_OF_KIND: dict[Kind, str] = {
    Kind.BLOCK_START: BLOCK_START,
    Kind.BLOCK_END: BLOCK_END,
    Kind.SUMMARY_START: SUMMARY_START,
    Kind.SUMMARY_END: SUMMARY_END,
    Kind.THINK_START: THINK_START,
    Kind.THINK_END: THINK_END,
}
KIND_OF_TEXT: dict[str, Kind] = {text: kind for kind, text in TEXT_OF_KIND.items()}


class MementoFormatError(ValueError):
    """A defect in a memento trace, with where it is and why it is wrong.

    ``position`` is a character offset for text and a token index for token ids. ``record`` is
    filled in by whoever knows which record of a data set was being read.
    """

    def __init__(self, reason: str, position: int | None = None, *, record: int | str | None = None) -> None:
        self.reason = reason
        self.position = position
        self.record = record
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.record is not None:
            where.append(f"record {self.record}")
        if self.position is not None:
            where.append(f"position {self.position}")
        return f"{', '.join(where)}: {self.reason}" if where else self.reason

    def for_record(self, record: int | str) -> MementoFormatError:
        """The same defect, labelled with the record it was found in."""
        return MementoFormatError(self.reason, self.position, record=record)


# ----------------------------------------------------------------------------------------------
# The grammar
# ----------------------------------------------------------------------------------------------


class ParseState(enum.Enum):
    BETWEEN = "between units"
    IN_BLOCK = "inside a block"
    AWAIT_SUMMARY = "after a block, before its memento"
    IN_SUMMARY = "inside a memento"
    AFTER_THINK = "after </think>"


_UNFINISHED: dict[ParseState, tuple[str, str]] = {
    ParseState.IN_BLOCK: (
        "{unit} left open: </think> came before <|block_end|>",
        "{unit} left open: no <|block_end|>",
    ),
    ParseState.AWAIT_SUMMARY: ("{unit} has no memento: </think> came first", "{unit} has no memento"),
    ParseState.IN_SUMMARY: (
        "the memento of {unit} left open: </think> came before <|summary_end|>",
        "the memento of {unit} left open: no <|summary_end|>",
    ),
}
"""The states in which the reasoning may not end, with why: at ``</think>``, at the end of the trace."""


@dataclass
class UnitSpan:
    """Where one (block, memento) unit's four delimiters sit; None while not yet seen."""

    block_start: int
    block_end: int | None = None
    summary_start: int | None = None
    summary_end: int | None = None

    @property
    def complete(self) -> bool:
        return self.summary_end is not None


def _ordinal(index: int) -> str:
    return f"block {index + 1}"


class StructureParser:
    """Incremental parser of the memento grammar; raises :class:`MementoFormatError` on a defect.

    Feed it the special tokens in order with their positions (:meth:`feed`); plain text may be fed
    too (:meth:`feed_plain`) so that text between units can be reported. Call :meth:`finish` when
    the trace is complete; a prefix of a well-formed trace is accepted until then, which is what
    an inference engine sees while generating.

    ``require_think`` (format mode): memento tokens must sit inside ``<think> ... </think>``, and a
    complete trace needs both tags and at least one unit. Without it (masking mode), ``<think>`` is
    ignored (a chat template may put it in the prompt) but nothing memento-shaped may follow
    ``</think>``.

    ``token_positions``: positions are token indices, so a block or memento is empty exactly when
    its delimiters are adjacent. Otherwise (text) emptiness is judged from the plain text fed.
    """

    def __init__(self, *, require_think: bool, token_positions: bool) -> None:
        self.require_think = require_think
        self.token_positions = token_positions
        self.units: list[UnitSpan] = []
        self.state = ParseState.BETWEEN
        self.think_start: int | None = None
        self.think_end: int | None = None
        self._last_special = -1
        self._content_since_special = False

    # -- helpers -------------------------------------------------------------------------------
    def _fail(self, reason: str, position: int) -> MementoFormatError:
        return MementoFormatError(reason, position)

    def _has_content(self, position: int) -> bool:
        if self.token_positions:
            return position > self._last_special + 1
        return self._content_since_special

    @property
    def _current(self) -> str:
        return _ordinal(len(self.units) - 1)

    def _mark(self, position: int, delimiter: str, then: ParseState, *, empty: str | None = None) -> None:
        """Record ``position`` as the current unit's ``delimiter`` (a :class:`UnitSpan` field) and move
        to state ``then``; with ``empty``, first fail for that reason (``{unit}``: the unit's name) if
        nothing came since the last special token (an empty block or memento)."""
        if empty is not None and not self._has_content(position):
            raise self._fail(empty.format(unit=self._current), position)
        setattr(self.units[-1], delimiter, position)
        self.state = then

    def _require_finished_unit(self, position: int, *, at_think_end: bool) -> None:
        """Fail if the reasoning ends (at ``</think>``, or at the end of the trace) inside a unit."""
        reasons = _UNFINISHED.get(self.state)
        if reasons is not None:
            raise self._fail(reasons[0 if at_think_end else 1].format(unit=self._current), position)

    # -- feeding -------------------------------------------------------------------------------
    def feed_plain(self, position: int, blank: bool) -> None:
        """Plain text at ``position``; ``blank`` when it is only whitespace."""
        if blank:
            return
        self._content_since_special = True
        state = self.state
        if state is ParseState.BETWEEN and self.require_think:
            if self.think_start is None:
                raise self._fail("text before <think>: a memento response opens with <think>", position)
            if self.units and self.units[-1].complete:
                where = f"after {_ordinal(len(self.units) - 1)}'s memento"
            else:
                where = "before the first block"
            raise self._fail(
                f"text between units ({where}): inside <think> every word belongs to a block or a memento",
                position,
            )
        if state is ParseState.AWAIT_SUMMARY and self.require_think:
            raise self._fail(f"text between <|block_end|> and <|summary_start|> of {self._current}", position)

    def feed(self, kind: Kind, position: int) -> None:
        """A special token of ``kind`` at ``position``."""
        handler = {
            Kind.BLOCK_START: self._block_start,
            Kind.BLOCK_END: self._block_end,
            Kind.SUMMARY_START: self._summary_start,
            Kind.SUMMARY_END: self._summary_end,
            Kind.THINK_START: self._think_start,
            Kind.THINK_END: self._think_end,
        }.get(kind)
        if handler is None:
            raise ValueError(f"feed() takes special tokens, not {kind!r}")
        # Without require_think a think tag the grammar ignores (any <think>, a </think> after the
        # first) is an ordinary token: it must not make the block or memento around it look empty.
        ignored = not self.require_think and (
            kind is Kind.THINK_START or (kind is Kind.THINK_END and self.state is ParseState.AFTER_THINK)
        )
        handler(position)
        if ignored:
            return
        self._last_special = position
        self._content_since_special = False

    def _outside_think(self, token: str, position: int) -> None:
        if self.state is ParseState.AFTER_THINK:
            raise self._fail(
                f"{token} after </think>: blocks and mementos belong inside the think section",
                position,
            )
        if self.require_think and self.think_start is None:
            raise self._fail(
                f"{token} before <think>: blocks and mementos belong inside the think section",
                position,
            )

    def _block_start(self, position: int) -> None:
        self._outside_think(BLOCK_START, position)
        state = self.state
        if state is ParseState.IN_BLOCK:
            opened = self.units[-1].block_start
            raise self._fail(
                f"nested <|block_start|>: {self._current} (opened at {opened}) is still open",
                position,
            )
        if state is ParseState.AWAIT_SUMMARY:
            raise self._fail(
                f"{self._current} has no memento: a new <|block_start|> came before <|summary_start|>",
                position,
            )
        if state is ParseState.IN_SUMMARY:
            raise self._fail(
                f"<|block_start|> inside the memento of {self._current} (no <|summary_end|>)",
                position,
            )
        self.units.append(UnitSpan(block_start=position))
        self.state = ParseState.IN_BLOCK

    def _block_end(self, position: int) -> None:
        self._outside_think(BLOCK_END, position)
        state = self.state
        if state is ParseState.BETWEEN:
            raise self._fail("<|block_end|> without an open block", position)
        if state is ParseState.AWAIT_SUMMARY:
            raise self._fail(f"second <|block_end|> for {self._current}", position)
        if state is ParseState.IN_SUMMARY:
            raise self._fail(f"<|block_end|> inside the memento of {self._current}", position)
        self._mark(position, "block_end", ParseState.AWAIT_SUMMARY, empty="empty block: {unit} has no reasoning")

    def _summary_start(self, position: int) -> None:
        self._outside_think(SUMMARY_START, position)
        state = self.state
        if state is ParseState.BETWEEN:
            if self.units:
                raise self._fail(
                    f"memento without a block: {self._current} already has its memento",
                    position,
                )
            raise self._fail("memento without a block: no block precedes it", position)
        if state is ParseState.IN_BLOCK:
            raise self._fail(
                f"<|summary_start|> inside {self._current}: its <|block_end|> is missing",
                position,
            )
        if state is ParseState.IN_SUMMARY:
            raise self._fail(f"nested <|summary_start|> inside the memento of {self._current}", position)
        self._mark(position, "summary_start", ParseState.IN_SUMMARY)

    def _summary_end(self, position: int) -> None:
        self._outside_think(SUMMARY_END, position)
        state = self.state
        if state is not ParseState.IN_SUMMARY:
            raise self._fail(f"<|summary_end|> without <|summary_start|> ({state.value})", position)
        self._mark(position, "summary_end", ParseState.BETWEEN, empty="empty memento: {unit}'s memento has no text")

    def _think_start(self, position: int) -> None:
        if not self.require_think:
            return  # a chat template may open the think section in the prompt
        if self.think_start is not None:
            raise self._fail(f"second <think> (the first is at {self.think_start})", position)
        if self.state is ParseState.AFTER_THINK:
            raise self._fail("<think> after </think>", position)
        self.think_start = position

    def _think_end(self, position: int) -> None:
        state = self.state
        if state is ParseState.AFTER_THINK:
            if self.require_think:
                raise self._fail(f"second </think> (the first is at {self.think_end})", position)
            return
        if self.require_think and self.think_start is None:
            raise self._fail("</think> without <think>", position)
        self._require_finished_unit(position, at_think_end=True)
        self.think_end = position
        self.state = ParseState.AFTER_THINK

    def finish(self, end: int) -> None:
        """Checks that hold only for a complete trace; ``end`` is the position past the last one."""
        if self.require_think and self.think_start is None:
            raise self._fail("no <think>: a memento response opens with <think>", end)
        self._require_finished_unit(end, at_think_end=False)
        if self.require_think and self.think_end is None:
            raise self._fail("the think section is never closed: no </think>", end)
        if self.require_think and not self.units:
            raise self._fail("no blocks: a memento trace needs at least one block", end)


# ----------------------------------------------------------------------------------------------
# Token ids of the special tokens
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecialTokenIds:
    """The vocabulary ids of the special tokens; think ids are optional (not every model has them)."""

    block_start: int
    block_end: int
    summary_start: int
    summary_end: int
    think_start: int | None = None
    think_end: int | None = None

    def __post_init__(self) -> None:
        ids = [i for i in self.by_kind().values()]
        if len(set(ids)) != len(ids):
            raise ValueError(f"special token ids must be distinct, got {self}")

    def by_kind(self) -> dict[Kind, int]:
        pairs = {
            Kind.BLOCK_START: self.block_start,
            Kind.BLOCK_END: self.block_end,
            Kind.SUMMARY_START: self.summary_start,
            Kind.SUMMARY_END: self.summary_end,
            Kind.THINK_START: self.think_start,
            Kind.THINK_END: self.think_end,
        }
        return {kind: tid for kind, tid in pairs.items() if tid is not None}

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> SpecialTokenIds:
        """Look the tokens up in an HF tokenizer; a missing memento token is an error."""
        vocab = tokenizer.get_vocab()
        missing = [tok for tok in MEMENTO_TOKENS if tok not in vocab]
        if missing:
            raise ValueError(
                f"the tokenizer lacks the memento tokens {missing}: add them first "
                "(memento.modeling adds them and initialises their embeddings)"
            )
        return cls(
            block_start=vocab[BLOCK_START],
            block_end=vocab[BLOCK_END],
            summary_start=vocab[SUMMARY_START],
            summary_end=vocab[SUMMARY_END],
            think_start=vocab.get(THINK_START),
            think_end=vocab.get(THINK_END),
        )


# ----------------------------------------------------------------------------------------------
# The trace type
# ----------------------------------------------------------------------------------------------

P = TypeVar("P", str, tuple[int, ...])
"""A piece of a trace: text, or a tuple of token ids."""


@dataclass(frozen=True)
class MementoUnit(Generic[P]):
    """One block of reasoning and the memento that records its state."""

    block: P
    memento: P


@dataclass(frozen=True)
class TraceLayout(Generic[P]):
    """The whitespace around the structure, kept so that rendering a parsed trace is exact.

    ``head`` precedes ``<think>``; ``gaps`` has one entry more than there are units (after
    ``<think>``, between units, before ``</think>``); ``joins`` sit between a block's
    ``<|block_end|>`` and its ``<|summary_start|>``.
    """

    head: P
    gaps: tuple[P, ...]
    joins: tuple[P, ...]


@dataclass(frozen=True)
class MementoTrace(Generic[P]):
    """A memento trace: the prompt, its (block, memento) units, and the answer.

    For text, ``prompt`` is the problem (kept beside the response, not rendered into it) and
    ``answer`` is everything after ``</think>``, verbatim. For token ids, ``prompt`` is every token
    before ``<think>`` (the chat template's prompt) and is rendered.
    """

    prompt: P
    units: tuple[MementoUnit[P], ...]
    answer: P
    layout: TraceLayout[P] = field(repr=False, compare=True, default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.layout is None:
            if not isinstance(self.answer, str):
                raise ValueError("a token-id trace needs an explicit layout")
            k = len(self.units)
            layout = TraceLayout(head="", gaps=("\n",) * (k + 1), joins=("",) * k)
            object.__setattr__(self, "layout", layout)
        if len(self.layout.gaps) != len(self.units) + 1 or len(self.layout.joins) != len(self.units):
            raise ValueError(
                f"layout does not fit {len(self.units)} units: {len(self.layout.gaps)} gaps, "
                f"{len(self.layout.joins)} joins"
            )

    @classmethod
    def new(cls, prompt: str, pairs: Iterable[tuple[str, str]], answer: str) -> MementoTrace[str]:
        """A text trace in the canonical layout (one newline between units, before the answer)."""
        units = tuple(MementoUnit(block=b, memento=m) for b, m in pairs)
        return cls(prompt=prompt, units=units, answer="\n" + answer)  # type: ignore[arg-type]

    @property
    def final_answer(self) -> str:
        """The answer text without surrounding whitespace (text traces)."""
        return str(self.answer).strip()


def _render(trace: MementoTrace[Any], special: Callable[[Kind], Any]) -> Any:
    layout = trace.layout
    parts = [layout.head, special(Kind.THINK_START), layout.gaps[0]]
    for unit, join, gap in zip(trace.units, layout.joins, layout.gaps[1:], strict=True):
        parts += [
            special(Kind.BLOCK_START),
            unit.block,
            special(Kind.BLOCK_END),
            join,
            special(Kind.SUMMARY_START),
            unit.memento,
            special(Kind.SUMMARY_END),
            gap,
        ]
    parts += [special(Kind.THINK_END), trace.answer]
    out = parts[0]
    for part in parts[1:]:
        out = out + part
    return out


def render_response(trace: MementoTrace[str]) -> str:
    """The response text of a trace (without the prompt); exact inverse of :func:`parse_response`."""
    return _render(trace, TEXT_OF_KIND.__getitem__)


def render_token_ids(trace: MementoTrace[tuple[int, ...]], specials: SpecialTokenIds) -> list[int]:
    """The token ids of a trace (prompt included); exact inverse of :func:`parse_token_ids`."""
    ids = specials.by_kind()

    def special(kind: Kind) -> tuple[int, ...]:
        if kind not in ids:
            raise ValueError(f"{TEXT_OF_KIND[kind]} has no token id in {specials}")
        return (ids[kind],)

    return list(trace.prompt + _render(trace, special))


_SPECIAL_RE = re.compile("|".join(re.escape(tok) for tok in SPECIAL_TOKENS))


@dataclass(frozen=True)
class _Special:
    kind: Kind
    start: int
    end: int


def _assemble(seq: Any, parser: StructureParser, specials: list[_Special], prompt: Any) -> Any:
    """Cut a parsed sequence into a :class:`MementoTrace` (prompt, units, answer, layout)."""
    end_of = {s.start: s.end for s in specials}
    think_start, think_end = parser.think_start, parser.think_end
    assert think_start is not None and think_end is not None
    units, gaps, joins = [], [], []
    cursor = end_of[think_start]
    for span in parser.units:
        assert span.block_end is not None and span.summary_start is not None
        assert span.summary_end is not None
        gaps.append(seq[cursor : span.block_start])
        units.append(
            MementoUnit(
                block=seq[end_of[span.block_start] : span.block_end],
                memento=seq[end_of[span.summary_start] : span.summary_end],
            )
        )
        joins.append(seq[end_of[span.block_end] : span.summary_start])
        cursor = end_of[span.summary_end]
    gaps.append(seq[cursor:think_end])
    layout = TraceLayout(head=seq[:think_start], gaps=tuple(gaps), joins=tuple(joins))
    return MementoTrace(prompt=prompt, units=tuple(units), answer=seq[end_of[think_end] :], layout=layout)


def parse_response(text: str, prompt: str = "") -> MementoTrace[str]:
    """Parse a memento response; raises :class:`MementoFormatError` naming the first defect.

    Positions in errors are character offsets into ``text``.
    """
    parser = StructureParser(require_think=True, token_positions=False)
    specials: list[_Special] = []
    cursor = 0
    for match in _SPECIAL_RE.finditer(text):
        if match.start() > cursor:
            parser.feed_plain(cursor, blank=not text[cursor : match.start()].strip())
        kind = KIND_OF_TEXT[match.group()]
        parser.feed(kind, match.start())
        specials.append(_Special(kind, match.start(), match.end()))
        cursor = match.end()
    if cursor < len(text):
        parser.feed_plain(cursor, blank=not text[cursor:].strip())
    parser.finish(len(text))
    trace = _assemble(text, parser, specials, prompt)
    return trace


def parse_token_ids(
    ids: Sequence[int],
    specials: SpecialTokenIds,
    *,
    decode: Callable[[Sequence[int]], str] | None = None,
) -> MementoTrace[tuple[int, ...]]:
    """Parse token ids (a response, or a whole chat whose prompt precedes ``<think>``).

    Positions in errors are token indices. Without ``decode`` the grammar is checked on the special
    tokens alone; with it, text between units must also decode to whitespace only.
    """
    if specials.think_start is None or specials.think_end is None:
        raise ValueError("parsing a whole trace needs the ids of <think> and </think>")
    seq = tuple(int(t) for t in ids)
    kind_by_id = {tid: kind for kind, tid in specials.by_kind().items()}
    # With decode, emptiness is judged by the decoded text (as for text); without it, by adjacency.
    parser = StructureParser(require_think=True, token_positions=decode is None)
    found: list[_Special] = []
    run_start = 0
    for pos, tid in enumerate(seq):
        kind = kind_by_id.get(tid)
        if kind is None:
            continue
        if decode is not None and pos > run_start and parser.think_start is not None:
            parser.feed_plain(run_start, blank=not decode(seq[run_start:pos]).strip())
        parser.feed(kind, pos)
        found.append(_Special(kind, pos, pos + 1))
        run_start = pos + 1
    parser.finish(len(seq))
    think_start = parser.think_start
    assert think_start is not None
    trace = _assemble(seq, parser, found, seq[:think_start])
    # For token ids the prompt is everything before <think>, so the head is empty.
    layout = TraceLayout(head=(), gaps=trace.layout.gaps, joins=trace.layout.joins)
    return MementoTrace(prompt=trace.prompt, units=trace.units, answer=trace.answer, layout=layout)


# ----------------------------------------------------------------------------------------------
# OpenMementos records
# ----------------------------------------------------------------------------------------------

DEFAULT_FIELDS = ("problem", "response", "domain", "source", "difficulty")
FULL_FIELDS = (*DEFAULT_FIELDS, "sentences", "blocks", "block_summaries")


def _normalise_space(text: str) -> str:
    return " ".join(text.split())


def block_sentence_indices(block: Sequence[int], n_sentences: int, index: int) -> list[int]:
    """A block's sentence indices, accepting both a full list and the release's [start, end] pair.

    Blocks are contiguous, so a two-element list [a, b] with b > a + 1 can only be an inclusive
    range, and so can [a, a] (the release's pair for a one-sentence block); any other list must
    already be consecutive.
    """
    items = [int(i) for i in block]
    if not items:
        raise MementoFormatError(f"block {index + 1} lists no sentences")
    if len(items) == 2 and (items[1] > items[0] + 1 or items[1] == items[0]):
        items = list(range(items[0], items[1] + 1))
    if any(b != a + 1 for a, b in itertools.pairwise(items)):
        raise MementoFormatError(f"block {index + 1}'s sentences are not consecutive: {list(block)}")
    if items[0] < 0 or items[-1] >= n_sentences:
        raise MementoFormatError(
            f"block {index + 1} names sentence {items[-1] if items[0] >= 0 else items[0]}, "
            f"but there are {n_sentences} sentences"
        )
    return items


def trace_from_record(record: Mapping[str, Any]) -> MementoTrace[str]:
    """Read an OpenMementos record (default or full schema) into a trace.

    The response is the source of truth; in the full schema the sentences, blocks and
    block_summaries are cross-checked against it and any disagreement is a defect.
    """
    for name in ("problem", "response"):
        if name not in record:
            raise MementoFormatError(f"missing field {name!r}")
        if not isinstance(record[name], str):
            raise MementoFormatError(f"field {name!r} must be a string, not {type(record[name]).__name__}")
    trace = parse_response(record["response"], prompt=record["problem"])
    full = [name for name in ("sentences", "blocks", "block_summaries") if record.get(name) is not None]
    if full:
        _check_full_schema(record, trace, full)
    return trace


def _check_full_schema(record: Mapping[str, Any], trace: MementoTrace[str], present: list[str]) -> None:
    missing = [n for n in ("sentences", "blocks", "block_summaries") if n not in present]
    if missing:
        raise MementoFormatError(f"full schema: {', '.join(present)} given but {', '.join(missing)} missing")
    sentences, blocks, summaries = record["sentences"], record["blocks"], record["block_summaries"]
    k = len(trace.units)
    if len(blocks) != k or len(summaries) != k:
        raise MementoFormatError(
            f"full schema: the response has {k} blocks but blocks has {len(blocks)} and "
            f"block_summaries has {len(summaries)}"
        )
    expected_next = 0
    for i, (block, summary, unit) in enumerate(zip(blocks, summaries, trace.units, strict=True)):
        indices = block_sentence_indices(block, len(sentences), i)
        if indices[0] != expected_next:
            kind = "overlaps the previous one" if indices[0] < expected_next else "leaves a gap"
            raise MementoFormatError(f"full schema: block {i + 1} starts at sentence {indices[0]} and {kind}")
        expected_next = indices[-1] + 1
        text = "".join(str(sentences[j]) for j in indices)
        if _normalise_space(text) != _normalise_space(unit.block):
            raise MementoFormatError(
                f"full schema: block {i + 1}'s sentences {indices[0]}..{indices[-1]} do not match "
                "its text in the response"
            )
        if _normalise_space(str(summary)) != _normalise_space(unit.memento):
            raise MementoFormatError(
                f"full schema: block_summaries[{i}] does not match block {i + 1}'s memento in the response"
            )
    if expected_next != len(sentences):
        raise MementoFormatError(f"full schema: sentences {expected_next}..{len(sentences) - 1} belong to no block")


def record_from_trace(
    trace: MementoTrace[str],
    *,
    schema: str = "default",
    domain: str = "",
    source: str = "",
    difficulty: int = 0,
    block_sentences: Sequence[Sequence[str]] | None = None,
) -> dict[str, Any]:
    """An OpenMementos record for a trace.

    ``schema="full"`` adds sentences, blocks (lists of sentence indices) and block_summaries.
    ``block_sentences`` gives each block's sentences (joined they must equal the block text);
    without it every block is one sentence.
    """
    if schema not in ("default", "full"):
        raise ValueError(f"schema must be 'default' or 'full', not {schema!r}")
    record: dict[str, Any] = {
        "problem": trace.prompt,
        "response": render_response(trace),
        "domain": domain,
        "source": source,
        "difficulty": int(difficulty),
    }
    if schema == "full":
        if block_sentences is None:
            block_sentences = [[unit.block] for unit in trace.units]
        if len(block_sentences) != len(trace.units):
            raise ValueError(f"{len(block_sentences)} sentence lists for {len(trace.units)} blocks")
        sentences: list[str] = []
        blocks: list[list[int]] = []
        for i, (unit, parts) in enumerate(zip(trace.units, block_sentences, strict=True)):
            if "".join(parts) != unit.block:
                raise ValueError(f"block {i + 1}'s sentences do not join to its text")
            blocks.append(list(range(len(sentences), len(sentences) + len(parts))))
            sentences.extend(parts)
        record["sentences"] = sentences
        record["blocks"] = blocks
        record["block_summaries"] = [unit.memento for unit in trace.units]
    return record
