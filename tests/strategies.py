"""Hypothesis generators for memento traces, their mutations, and an independent grammar oracle.

Nothing here calls the parser in :mod:`memento.format` or the tracker in :mod:`memento.masking`:
the oracle below is written from the specification (the team's paper notes, section 1, and the
list of defects in the masking/format contract), so the property tests compare two independent
implementations. Only plain data types (``SpecialTokenIds``, ``MaskConfig``) are imported.

Token sequences are built symbolically (``"bs"``, ``"be"``, ``"ss"``, ``"se"``, ``"ts"``,
``"te"`` for the six special tokens) and mapped onto a randomly drawn vocabulary, so special ids
vary from example to example (0 included, which is also the default padding id).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hypothesis import strategies as st

from memento.format import SpecialTokenIds
from memento.masking import MaskConfig

SCALE = float(os.environ.get("MEMENTO_PROPERTY_SCALE", "1"))
"""Multiplies every property's example count (e.g. 10 for a long soak run)."""


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


BS, BE, SS, SE, TS, TE = "bs", "be", "ss", "se", "ts", "te"
MEMENTO_KINDS = (BS, BE, SS, SE)
ALL_KINDS = (BS, BE, SS, SE, TS, TE)


# ----------------------------------------------------------------------------------------------
# Vocabularies
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocab:
    """Which id each special kind has (think kinds may be absent) and the plain ids."""

    ids: dict[str, int]
    plain: tuple[int, ...]
    whitespace: tuple[int, ...] = ()  # plain ids that decode to whitespace

    @property
    def specials(self) -> SpecialTokenIds:
        return SpecialTokenIds(
            block_start=self.ids[BS],
            block_end=self.ids[BE],
            summary_start=self.ids[SS],
            summary_end=self.ids[SE],
            think_start=self.ids.get(TS),
            think_end=self.ids.get(TE),
        )

    def kind(self, token_id: int) -> str | None:
        for kind, tid in self.ids.items():
            if tid == token_id:
                return kind
        return None

    def has_think(self) -> bool:
        return TS in self.ids and TE in self.ids

    def decode(self, ids: Sequence[int]) -> str:
        """A stand-in detokeniser: whitespace ids decode to spaces/newlines, others to letters."""
        out = []
        for t in ids:
            if t in self.whitespace:
                out.append(" \n"[t % 2])
            elif self.kind(t) is not None:
                out.append(f"<special {t}>")
            else:
                out.append(chr(ord("a") + t % 26))
        return "".join(out)


@st.composite
def vocabs(draw: st.DrawFn, think: bool | None = None) -> Vocab:
    """Six distinct special ids drawn from 0..11; think ids present, absent, or drawn."""
    ids = draw(st.lists(st.integers(0, 11), min_size=6, max_size=6, unique=True))
    with_think = draw(st.booleans()) if think is None else think
    kinds = dict(zip(ALL_KINDS, ids, strict=True))
    if not with_think:
        del kinds[TS], kinds[TE]
    plain = (*sorted(set(range(12)) - set(kinds.values())), 20, 21, 22, 23)
    whitespace = tuple(t for t in plain if t >= 22)
    return Vocab(ids=kinds, plain=plain, whitespace=whitespace)


# ----------------------------------------------------------------------------------------------
# The independent grammar oracle (token ids)
# ----------------------------------------------------------------------------------------------


class Malformed(Exception):
    """The oracle's verdict: the first defect sits at ``position``."""

    def __init__(self, position: int, why: str) -> None:
        super().__init__(f"{why} at {position}")
        self.position = position
        self.why = why


@dataclass
class Unit:
    """Delimiter positions of one (block, memento) unit; None while not seen yet."""

    bs: int
    be: int | None = None
    ss: int | None = None
    se: int | None = None


def tracking_start(ids: Sequence[int], prefix: Sequence[int] | None, require: bool) -> int | None:
    """First index after the first complete occurrence of ``prefix`` (0 when not required)."""
    if not require:
        return 0
    assert prefix
    m = len(prefix)
    for i in range(len(ids) - m + 1):
        if tuple(ids[i : i + m]) == tuple(prefix):
            return i + m
    return None


def token_grammar(
    ids: Sequence[int],
    vocab: Vocab,
    *,
    format_mode: bool = False,
    start: int = 0,
    decode: Callable[[Sequence[int]], str] | None = None,
) -> list[Unit]:
    """The units of ``ids[start:]``, or :class:`Malformed` naming the first defect.

    Masking mode (``format_mode=False``): a well-formed *prefix* is fine; ``<think>`` is an
    ordinary token; a ``</think>`` between units ends the think section (memento tokens after it
    are defects, further ``</think>`` are ordinary). Format mode: memento tokens live inside one
    ``<think> ... </think>``, the trace must be complete with at least one unit, and with
    ``decode`` the text between units (and between a block and its memento) must be whitespace.
    Emptiness is by adjacency: a block is empty when ``<|block_end|>`` follows ``<|block_start|>``
    directly, a memento when ``<|summary_end|>`` follows ``<|summary_start|>`` directly; in format
    mode with ``decode``, also when what lies between decodes to whitespace only (as for text).
    """

    def empty(first: int, stop: int) -> bool:
        if stop == first:
            return True
        return format_mode and decode is not None and not decode(ids[first:stop]).strip()

    state = "between"  # between | block | await | memento | done
    units: list[Unit] = []
    think_seen = False
    run_start = start
    for pos in range(start, len(ids)):
        kind = vocab.kind(ids[pos])
        if kind is None:
            continue
        checked = format_mode and decode is not None and think_seen and state in ("between", "await")
        if checked and pos > run_start and decode(ids[run_start:pos]).strip():  # type: ignore[misc]
            raise Malformed(run_start, "text outside blocks and mementos")
        run_start = pos + 1
        if kind == TS:
            if format_mode:
                if think_seen:
                    raise Malformed(pos, "second <think>")
                think_seen = True
            continue
        if kind == TE:
            if state == "done":
                if format_mode:
                    raise Malformed(pos, "second </think>")
                continue
            if format_mode and not think_seen:
                raise Malformed(pos, "</think> without <think>")
            if state != "between":
                raise Malformed(pos, f"</think> in state {state}")
            state = "done"
            continue
        if state == "done":
            raise Malformed(pos, "memento token after </think>")
        if format_mode and not think_seen:
            raise Malformed(pos, "memento token before <think>")
        if kind == BS:
            if state != "between":
                raise Malformed(pos, f"block_start in state {state}")
            units.append(Unit(bs=pos))
            state = "block"
        elif kind == BE:
            if state != "block":
                raise Malformed(pos, f"block_end in state {state}")
            if empty(units[-1].bs + 1, pos):
                raise Malformed(pos, "empty block")
            units[-1].be = pos
            state = "await"
        elif kind == SS:
            if state != "await":
                raise Malformed(pos, f"summary_start in state {state}")
            units[-1].ss = pos
            state = "memento"
        else:
            assert kind == SE
            if state != "memento":
                raise Malformed(pos, f"summary_end in state {state}")
            if empty(units[-1].ss + 1, pos):  # type: ignore[operator]
                raise Malformed(pos, "empty memento")
            units[-1].se = pos
            state = "between"
    if format_mode:
        end = len(ids)
        if not think_seen:
            raise Malformed(end, "no <think>")
        if state != "done":
            raise Malformed(end, f"incomplete trace (state {state})")
        if not units:
            raise Malformed(end, "no units")
    return units


def masking_verdict(
    ids: Sequence[int], vocab: Vocab, config: MaskConfig, prefix: Sequence[int] | None
) -> tuple[int | None, list[Unit]]:
    """(tracking start, units) for the masking contract; raises :class:`Malformed`."""
    start = tracking_start(ids, prefix, config.require_assistant_section)
    if start is None:
        return None, []
    return start, token_grammar(ids, vocab, start=start)


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------

MODES = ("vanilla", "memento", "keep1", "keep2", "restart")


@st.composite
def mask_configs(draw: st.DrawFn, modes: Sequence[str] = MODES) -> MaskConfig:
    mode = draw(st.sampled_from(modes))
    keep = {"vanilla": -1, "memento": 0, "keep1": 1, "keep2": 2, "restart": 0}[mode]
    restart = mode == "restart"
    return MaskConfig(
        keep_last_n=keep,
        mask_delimiters=draw(st.booleans()),
        keep_last_block_for_answer=keep >= 0 and not restart and draw(st.booleans()),
        require_assistant_section=draw(st.booleans()),
        restart=restart,
    )


# ----------------------------------------------------------------------------------------------
# Well-formed token sequences (masking mode)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskCase:
    ids: tuple[int, ...]
    vocab: Vocab
    config: MaskConfig
    prefix: tuple[int, ...] | None
    notes: dict[str, object] = field(default_factory=dict, compare=False)

    @property
    def specials(self) -> SpecialTokenIds:
        return self.vocab.specials


def _tokens(draw: st.DrawFn, pool: Sequence[int], lo: int, hi: int) -> list[int]:
    return draw(st.lists(st.sampled_from(list(pool)), min_size=lo, max_size=hi))


@st.composite
def masking_sequences(
    draw: st.DrawFn,
    vocab: Vocab,
    require: bool,
    *,
    max_units: int = 5,
    truncate: bool = True,
    prefix: tuple[int, ...] | None = None,
) -> tuple[list[int], tuple[int, ...]]:
    """A well-formed sequence for masking (or, when ``truncate``, possibly a well-formed prefix).

    With ``require`` the sequence opens with a prompt (any tokens, special ones included, but never
    the prefix's last token, so the first complete prefix is the intended one) and the assistant
    prefix, which may itself contain special ids. ``<think>`` may appear anywhere after it, inside
    blocks and mementos included (it is an ordinary token for masking).
    """
    ids = vocab.ids
    plain = list(vocab.plain)
    loose = plain + ([ids[TS]] if TS in ids else [])
    out: list[int] = []
    if prefix is None:
        pool = plain[:3] + list(ids.values())
        prefix = tuple(draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3)))
    if require:
        prompt_pool = [t for t in plain + list(ids.values()) if t != prefix[-1]]
        out += _tokens(draw, prompt_pool, 0, 6) + list(prefix)
    else:
        out += _tokens(draw, plain, 0, 3)
    if TS in ids and draw(st.booleans()):
        out.append(ids[TS])
    for _ in range(draw(st.integers(0, max_units) | st.integers(1, max_units))):
        out += _tokens(draw, loose, 0, 2)
        out += [ids[BS], *_tokens(draw, loose, 1, 5), ids[BE]]
        out += _tokens(draw, loose, 0, 2)
        out += [ids[SS], *_tokens(draw, loose, 1, 4), ids[SE]]
    out += _tokens(draw, loose, 0, 2)
    if TE in ids and draw(st.booleans()):
        out.append(ids[TE])
        out += _tokens(draw, [*loose, ids[TE]], 0, 4)
    if truncate and draw(st.integers(0, 3)) == 0:
        out = out[: draw(st.integers(0, len(out)))]
    return out, prefix


@st.composite
def mutate_tokens(draw: st.DrawFn, ids: Sequence[int], vocab: Vocab, max_ops: int = 2) -> list[int]:
    """Delete, insert, replace, swap or duplicate tokens (mostly special ones); append after the end."""
    out = list(ids)
    specials = list(vocab.ids.values())
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["delete", "insert", "replace", "swap", "duplicate", "append", "empty"]))
        special_at = [i for i, t in enumerate(out) if vocab.kind(t) is not None]
        if op == "delete" and out:
            where = special_at or list(range(len(out)))
            del out[draw(st.sampled_from(where))]
        elif op == "insert":
            out.insert(draw(st.integers(0, len(out))), draw(st.sampled_from(specials)))
        elif op == "replace" and out:
            out[draw(st.integers(0, len(out) - 1))] = draw(st.sampled_from(specials))
        elif op == "swap" and len(out) > 1:
            i = draw(st.sampled_from(special_at or list(range(len(out)))))
            j = draw(st.integers(0, len(out) - 1))
            out[i], out[j] = out[j], out[i]
        elif op == "duplicate" and special_at:
            i = draw(st.sampled_from(special_at))
            out.insert(i, out[i])
        elif op == "append":
            if TE in vocab.ids and vocab.ids[TE] not in out:
                out.append(vocab.ids[TE])
            out += [*_tokens(draw, vocab.plain, 0, 2), vocab.ids[draw(st.sampled_from(MEMENTO_KINDS))]]
        elif op == "empty" and special_at:
            # make a block or memento empty: drop everything between a start and the next token
            starts = [i for i in special_at if vocab.kind(out[i]) in (BS, SS)]
            if starts:
                i = draw(st.sampled_from(starts))
                j = next((k for k in special_at if k > i), None)
                if j is not None:
                    del out[i + 1 : j]
    return out


@st.composite
def mask_cases(
    draw: st.DrawFn,
    *,
    modes: Sequence[str] = MODES,
    truncate: bool = True,
    mutate: float = 0.0,
    max_units: int = 5,
) -> MaskCase:
    """A vocabulary, a configuration and a sequence; ``mutate`` is the chance of a mutation."""
    vocab = draw(vocabs())
    config = draw(mask_configs(modes))
    ids, prefix = draw(
        masking_sequences(vocab, config.require_assistant_section, max_units=max_units, truncate=truncate)
    )
    mutated = mutate > 0 and draw(st.floats(0, 1)) < mutate
    if mutated:
        ids = draw(mutate_tokens(ids, vocab))
    return MaskCase(ids=tuple(ids), vocab=vocab, config=config, prefix=prefix, notes={"mutated": mutated})


# ----------------------------------------------------------------------------------------------
# Well-formed token sequences (format mode: a whole response with <think> ... </think>)
# ----------------------------------------------------------------------------------------------


@st.composite
def format_token_sequences(draw: st.DrawFn, vocab: Vocab, *, blank_gaps: bool) -> list[int]:
    """prompt, <think>, >= 1 unit, </think>, answer; with ``blank_gaps`` gaps/joins decode to space."""
    ids = vocab.ids
    plain = list(vocab.plain)
    gap_pool = list(vocab.whitespace) if blank_gaps else plain
    visible_ink = [t for t in plain if t not in vocab.whitespace]

    def content(most: int) -> list[int]:
        """Block or memento text: never whitespace only (that is an empty block or memento)."""
        tokens = _tokens(draw, plain, 0, most - 1)
        tokens.insert(draw(st.integers(0, len(tokens))), draw(st.sampled_from(visible_ink)))
        return tokens

    out = [*_tokens(draw, plain, 0, 4), ids[TS]]
    for _ in range(draw(st.integers(1, 4))):
        out += _tokens(draw, gap_pool, 0, 2)
        out += [ids[BS], *content(4), ids[BE]]
        out += _tokens(draw, gap_pool, 0, 2)
        out += [ids[SS], *content(3), ids[SE]]
    out += _tokens(draw, gap_pool, 0, 2)
    out += [ids[TE], *_tokens(draw, plain, 0, 4)]
    return out
