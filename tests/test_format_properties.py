"""Property tests of memento.format: exact round trips, and every defect reported where it is.

Texts are rendered here by plain string concatenation and judged by an independent grammar
(:func:`text_grammar`, written from the specification); token ids are judged by the grammar oracle
in ``strategies.py`` (format mode). Neither uses the parser in :mod:`memento.format`.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from memento.format import (
    DEFAULT_FIELDS,
    FULL_FIELDS,
    MementoFormatError,
    MementoTrace,
    MementoUnit,
    TraceLayout,
    parse_response,
    parse_token_ids,
    record_from_trace,
    render_response,
    render_token_ids,
    trace_from_record,
)
from memento.masking import MaskConfig, compute_visibility
from strategies import (
    BE,
    BS,
    SE,
    SS,
    TE,
    TS,
    Malformed,
    Vocab,
    examples,
    format_token_sequences,
    mutate_tokens,
    token_grammar,
    vocabs,
)

SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
}

# The six special strings, spelled out here rather than imported.
SPECIAL_TEXT = {
    "<|block_start|>": BS,
    "<|block_end|>": BE,
    "<|summary_start|>": SS,
    "<|summary_end|>": SE,
    "<think>": TS,
    "</think>": TE,
}
TEXT_OF = {kind: text for text, kind in SPECIAL_TEXT.items()}

# ----------------------------------------------------------------------------------------------
# Independent text oracle
# ----------------------------------------------------------------------------------------------


def scan(text: str) -> list[tuple[str | None, int, int]]:
    """(kind or None for plain text, start, end) segments, leftmost special first."""
    out: list[tuple[str | None, int, int]] = []
    i = 0
    while i < len(text):
        hits = [(text.find(s, i), s) for s in SPECIAL_TEXT]
        hits = [(at, s) for at, s in hits if at >= 0]
        if not hits:
            out.append((None, i, len(text)))
            break
        at, s = min(hits)
        if at > i:
            out.append((None, i, at))
        out.append((SPECIAL_TEXT[s], at, at + len(s)))
        i = at + len(s)
    return out


def contains_special(text: str) -> bool:
    return any(s in text for s in SPECIAL_TEXT)


def text_grammar(text: str) -> int:
    """The number of units of a well-formed response; raises :class:`Malformed` at the first defect.

    Inside ``<think> ... </think>`` every non-blank character belongs to a block or a memento; a
    block or memento is empty when it holds only whitespace; nothing special may follow
    ``</think>``; only whitespace may precede ``<think>``.
    """
    state = "between"
    think = False
    content = False
    units = 0
    for kind, start, end in scan(text):
        if kind is None:
            if not text[start:end].strip():
                continue
            if state in ("between", "await"):
                raise Malformed(start, f"text in state {state}")
            content = True
            continue
        if kind == TS:
            if think:
                raise Malformed(start, "second <think>")
            think = True
        elif kind == TE:
            if not think or state != "between":
                raise Malformed(start, f"</think> in state {state}")
            state = "done"
        else:
            if state == "done" or not think:
                raise Malformed(start, "memento token outside <think>")
            expected_state = {BS: "between", BE: "block", SS: "await", SE: "memento"}[kind]
            if state != expected_state:
                raise Malformed(start, f"{kind} in state {state}")
            if kind in (BE, SE) and not content:
                raise Malformed(start, f"empty before {kind}")
            state = {BS: "block", BE: "await", SS: "memento", SE: "between"}[kind]
            units += kind == SE
        content = False
    if not think or state != "done" or not units:
        raise Malformed(len(text), f"incomplete ({state})")
    return units


def render(trace: MementoTrace[str]) -> str:
    """The response text, by concatenation."""
    layout = trace.layout
    text = layout.head + "<think>" + layout.gaps[0]
    for unit, join, gap in zip(trace.units, layout.joins, layout.gaps[1:], strict=True):
        text += f"<|block_start|>{unit.block}<|block_end|>{join}<|summary_start|>{unit.memento}<|summary_end|>{gap}"
    return text + "</think>" + trace.answer


# ----------------------------------------------------------------------------------------------
# Text generators
# ----------------------------------------------------------------------------------------------

whitespace = st.text(alphabet=" \t\n\r\u00a0\u2003", max_size=3)
PIECES = [
    "a",
    "Z9",
    " ",
    "\n",
    "x = 1;",
    "<",
    ">",
    "|",
    "/",
    "think",
    "<think",
    "think>",
    "</think",
    "<|",
    "|>",
    "block_start",
    "<|block_end",
    "summary_end|>",
    "<|summary_start",
    "$\\frac{1}{2}$",
    "é",
    "\u00a0",
    "😀",
]
free_text = st.lists(st.sampled_from(PIECES), max_size=6).map("".join).filter(lambda s: not contains_special(s))
nonblank = (
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=6)
    .map("".join)
    .filter(lambda s: bool(s.strip()) and not contains_special(s))
)


@st.composite
def text_traces(draw: st.DrawFn, max_units: int = 4) -> MementoTrace[str]:
    k = draw(st.integers(1, max_units))
    units = tuple(MementoUnit(block=draw(nonblank), memento=draw(nonblank)) for _ in range(k))
    layout = TraceLayout(
        head=draw(whitespace),
        gaps=tuple(draw(whitespace) for _ in range(k + 1)),
        joins=tuple(draw(whitespace) for _ in range(k)),
    )
    return MementoTrace(prompt=draw(st.text(max_size=8)), units=units, answer=draw(free_text), layout=layout)


@st.composite
def broken_texts(draw: st.DrawFn) -> str:
    """A rendered trace with structural damage and/or raw edits (some edits leave it well-formed)."""
    trace = draw(text_traces())
    units = list(trace.units)
    head, gaps, joins = trace.layout.head, list(trace.layout.gaps), list(trace.layout.joins)
    damage = draw(st.sampled_from(["none", "blank block", "blank memento", "text in head", "text in gap", "join"]))
    i = draw(st.integers(0, len(units) - 1))
    if damage == "blank block":
        units[i] = MementoUnit(block=draw(whitespace), memento=units[i].memento)
    elif damage == "blank memento":
        units[i] = MementoUnit(block=units[i].block, memento=draw(whitespace))
    elif damage == "text in head":
        head = draw(whitespace) + draw(nonblank)
    elif damage == "text in gap":
        gaps[draw(st.integers(0, len(gaps) - 1))] += draw(nonblank)
    elif damage == "join":
        joins[i] = draw(nonblank) + joins[i]
    layout = TraceLayout(head=head, gaps=tuple(gaps), joins=tuple(joins))
    text = render(MementoTrace(prompt="", units=tuple(units), answer=trace.answer, layout=layout))
    for _ in range(draw(st.integers(0 if damage != "none" else 1, 2))):
        op = draw(st.sampled_from(["insert", "delete", "duplicate", "append", "truncate"]))
        specials = [(start, end) for kind, start, end in scan(text) if kind is not None]
        if op == "insert":
            at = draw(st.integers(0, len(text)))  # may land inside another special, breaking it
            text = text[:at] + draw(st.sampled_from(list(SPECIAL_TEXT))) + text[at:]
        elif op == "delete" and specials:
            start, end = draw(st.sampled_from(specials))
            text = text[:start] + text[end:]
        elif op == "duplicate" and specials:
            start, end = draw(st.sampled_from(specials))
            text = text[:start] + text[start:end] + text[start:]
        elif op == "append":
            text += draw(free_text) + draw(st.sampled_from(list(SPECIAL_TEXT))) + draw(free_text)
        elif op == "truncate":
            text = text[: draw(st.integers(0, len(text)))]
    return text


# ----------------------------------------------------------------------------------------------
# 11a. Text round trips
# ----------------------------------------------------------------------------------------------


@settings(max_examples=examples(500), **SETTINGS)
@given(trace=text_traces())
def test_text_round_trips_exactly(trace: MementoTrace[str]) -> None:
    text = render(trace)
    assert text_grammar(text) == len(trace.units)
    assert render_response(trace) == text
    parsed = parse_response(text, prompt=trace.prompt)
    assert parsed == trace  # units, answer and whitespace layout, field by field
    assert render_response(parsed) == text
    assert parsed.final_answer == trace.answer.strip()


@settings(max_examples=examples(300), **SETTINGS)
@given(trace=text_traces(), data=st.data())
def test_records_round_trip(trace: MementoTrace[str], data) -> None:
    meta = {"domain": data.draw(st.sampled_from(["math", "code", ""])), "source": "s", "difficulty": 3}
    record = record_from_trace(trace, **meta)
    assert tuple(record) == DEFAULT_FIELDS
    assert record["response"] == render(trace) and record["problem"] == trace.prompt
    assert trace_from_record(record) == trace

    # full schema: each block split into sentences at random cut points (empty sentences allowed)
    splits = []
    for unit in trace.units:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(unit.block)), max_size=3)))
        bounds = [0, *cuts, len(unit.block)]
        splits.append([unit.block[a:b] for a, b in itertools.pairwise(bounds)])
    full = record_from_trace(trace, schema="full", block_sentences=splits, **meta)
    assert tuple(full) == FULL_FIELDS
    assert full["sentences"] == [s for parts in splits for s in parts]
    assert [len(b) for b in full["blocks"]] == [len(parts) for parts in splits]
    assert [i for b in full["blocks"] for i in b] == list(range(len(full["sentences"])))
    assert full["block_summaries"] == [u.memento for u in trace.units]
    assert trace_from_record(full) == trace
    # the release's segmenter writes each block as an inclusive [first, last] pair
    pairs = {**full, "blocks": [[b[0], b[-1]] for b in full["blocks"]]}
    assert trace_from_record(pairs) == trace
    # and a full record whose parts disagree with the response is a defect
    i = data.draw(st.integers(0, len(trace.units) - 1))
    wrong = {**full, "block_summaries": [*full["block_summaries"][:i], "zz", *full["block_summaries"][i + 1 :]]}
    with pytest.raises(MementoFormatError):
        trace_from_record(wrong)


# ----------------------------------------------------------------------------------------------
# 11b. Malformed texts: an error at the first defect, with a reason
# ----------------------------------------------------------------------------------------------


@settings(max_examples=examples(600), **SETTINGS)
@given(text=broken_texts())
def test_malformed_texts_raise_at_the_defect(text: str) -> None:
    try:
        text_grammar(text)
    except Malformed as defect:
        event(f"malformed: {defect.why.split(' in state')[0]}")
        with pytest.raises(MementoFormatError) as info:
            parse_response(text)
        assert info.value.position == defect.position, (info.value, defect)
        assert 0 <= info.value.position <= len(text)
        assert info.value.reason.strip()
        with pytest.raises(MementoFormatError):
            trace_from_record({"problem": "p", "response": text})
        return
    event("still well-formed")
    assert render_response(parse_response(text)) == text


# ----------------------------------------------------------------------------------------------
# 11c. Token ids: round trips, and defects at the right token
# ----------------------------------------------------------------------------------------------


def expected_trace(ids: list[int], vocab: Vocab) -> MementoTrace[tuple[int, ...]]:
    """The trace the specification cuts ``ids`` into (from the oracle's delimiter positions)."""
    units = token_grammar(ids, vocab, format_mode=True)
    ts, te = ids.index(vocab.ids[TS]), ids.index(vocab.ids[TE])
    seq = tuple(ids)
    gaps, cursor = [], ts + 1
    for u in units:
        gaps.append(seq[cursor : u.bs])
        cursor = u.se + 1  # type: ignore[operator]
    gaps.append(seq[cursor:te])
    return MementoTrace(
        prompt=seq[:ts],
        units=tuple(MementoUnit(block=seq[u.bs + 1 : u.be], memento=seq[u.ss + 1 : u.se]) for u in units),  # type: ignore[operator]
        answer=seq[te + 1 :],
        layout=TraceLayout(head=(), gaps=tuple(gaps), joins=tuple(seq[u.be + 1 : u.ss] for u in units)),  # type: ignore[operator]
    )


@settings(max_examples=examples(400), **SETTINGS)
@given(vocab=vocabs(think=True), data=st.data())
def test_token_ids_round_trip(vocab: Vocab, data) -> None:
    blank = data.draw(st.booleans())
    ids = data.draw(format_token_sequences(vocab, blank_gaps=blank))
    decode = vocab.decode if blank else None
    trace = parse_token_ids(ids, vocab.specials, decode=decode)
    assert trace == expected_trace(ids, vocab)
    assert render_token_ids(trace, vocab.specials) == ids
    assert parse_token_ids(render_token_ids(trace, vocab.specials), vocab.specials) == trace
    # "well-formed" means the same for masking: the same units, and nothing is refused
    vis = compute_visibility(np.asarray(ids), vocab.specials, MaskConfig())
    assert [(u.block_start, u.block_end, u.summary_start, u.summary_end) for u in vis.units] == [
        (u.bs, u.be, u.ss, u.se) for u in token_grammar(ids, vocab, format_mode=True)
    ]


@settings(max_examples=examples(600), **SETTINGS)
@given(vocab=vocabs(think=True), data=st.data())
def test_malformed_token_ids_raise_at_the_defect(vocab: Vocab, data) -> None:
    blank = data.draw(st.booleans())
    ids = data.draw(format_token_sequences(vocab, blank_gaps=blank))
    ids = data.draw(mutate_tokens(ids, vocab))
    if data.draw(st.booleans()):
        ids = ids[: data.draw(st.integers(0, len(ids)))]
    decode = vocab.decode if blank else None
    try:
        expected = token_grammar(ids, vocab, format_mode=True, decode=decode)
    except Malformed as defect:
        event(f"malformed: {defect.why.split(' in state')[0]}")
        with pytest.raises(MementoFormatError) as info:
            parse_token_ids(ids, vocab.specials, decode=decode)
        assert info.value.position == defect.position, (info.value, defect)
        assert 0 <= info.value.position <= len(ids)
        assert info.value.reason.strip()
        return
    event("still well-formed")
    trace = parse_token_ids(ids, vocab.specials, decode=decode)
    assert len(trace.units) == len(expected)
    assert render_token_ids(trace, vocab.specials) == ids


def test_release_pair_for_a_one_sentence_block() -> None:
    # Regression: the release writes a one-sentence block as [i, i], which used to be refused.
    trace = MementoTrace.new("p", [("only sentence.", "m1"), ("first. ", "m2")], "a")
    record = record_from_trace(trace, schema="full", block_sentences=[["only sentence."], ["first. "]])
    assert trace_from_record({**record, "blocks": [[0, 0], [1, 1]]}) == trace
