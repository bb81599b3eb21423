"""Who sees what: the single source of truth for memento visibility.

Everything here derives from one decision per token, ``invisible_from[j]``: the index of the first
query that can no longer see token ``j`` (:data:`NEVER` if it stays visible). Query ``q`` sees key
``kv`` exactly when::

    kv <= q  and  q < invisible_from[kv]            (see :func:`visible`)

The decision is made by :class:`MementoTracker`, an incremental state machine that consumes token
ids one at a time (as an inference engine does) and emits :class:`EvictionEvent` s. The dense 4D
masks used in training and the FlexAttention ``mask_mod`` are built from the events the tracker
emits over a whole sequence, so training, inference and analysis cannot disagree.

The rule (paper section 1, our ``../shared/paper-notes.md``): when block ``i``'s
``<|summary_end|>`` arrives, block ``i``'s reasoning becomes invisible to that token and every later
one (the paper's engine evicts as soon as the token is sampled, before it is fed back). The
memento's own tokens, which were computed while the block was visible, stay. Knobs:

- ``keep_last_n``: -1 vanilla (nothing evicted), 0 memento, N > 0 keep the N most recent finished
  blocks (block ``i`` dies at the ``<|summary_end|>`` of block ``i + N``).
- ``mask_delimiters``: also hide the block's ``<|block_start|>``/``<|block_end|>`` (Phi-4 style).
- ``keep_last_block_for_answer``: block ``i`` survives until block ``i + N + 1`` *starts* (its
  ``<|block_start|>`` already cannot see it), so the newest block stays visible for the answer.
- ``require_assistant_section``: only tokens after the assistant prefix (e.g. the ids of
  ``<|im_start|>assistant\\n``) are tracked; special tokens quoted in a prompt are plain text.
- ``restart`` (ablation, keep 0 only): at ``<|summary_end|>`` the block *with* its delimiters and
  the memento's tokens are evicted, and the memento is recomputed without the block. As one mask
  this is the same rule over an expanded sequence in which copies of the memento tokens (same
  logical positions) are inserted just before ``<|summary_end|>``; see :class:`Visibility`.

Sliding-window layers (Olmo 3: three of every four layers, window 4,096) add a second decision on
top of the rule, :func:`window_mask`: such a layer lets a query see the **last W keys still visible
to it** (those the memento rule keeps), not the keys within W logical positions. See
:func:`window_mask` for why; with no eviction both readings are transformers' window.

Unlike the release's engine, which evicts blocks found in the prompt only once generation starts,
the rule here holds inside the prompt too: a token after a prompt block's memento never sees it.
That keeps training, prefill and decode identical.
"""

from __future__ import annotations

import dataclasses
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from memento.arrays import GrowingTable
from memento.format import Kind, MementoFormatError, SpecialTokenIds, StructureParser, UnitSpan

NEVER: int = int(np.iinfo(np.int64).max)
"""``invisible_from`` of a token that stays visible for good."""


@dataclass(frozen=True)
class MaskConfig:
    """The visibility knobs; the same object configures training, the engine, vLLM, eval and analysis.

    Every settings object carries one whole (``EngineConfig.mask``, ``SFTSettings.mask``,
    ``MementoSettings.mask``, eval's modes); where knobs arrive as loose names (keyword arguments,
    a JSON dict, command-line options) :meth:`split_knobs` picks them out, so each knob is spelled
    and validated here only.
    """

    keep_last_n: int = 0
    mask_delimiters: bool = False
    keep_last_block_for_answer: bool = False
    require_assistant_section: bool = False
    restart: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.keep_last_n, bool) or not isinstance(self.keep_last_n, int) or self.keep_last_n < -1:
            raise ValueError(
                f"keep_last_n must be -1 (vanilla), 0 (memento) or a positive count, not {self.keep_last_n!r}"
            )
        if self.keep_last_block_for_answer and self.keep_last_n < 0:
            raise ValueError("keep_last_block_for_answer needs keep_last_n >= 0 (vanilla keeps all)")
        if self.restart and (self.keep_last_n != 0 or self.keep_last_block_for_answer):
            raise ValueError("restart mode is defined for keep_last_n=0 without keep_last_block_for_answer")

    @property
    def evicts(self) -> bool:
        return self.keep_last_n >= 0

    def stops_on_format_error(self, override: bool | None = None) -> bool:
        """The format-error policy: whether a sequence whose memento structure breaks must stop.

        Default: yes when blocks are evicted (what follows the defect has no defined mask), no in
        vanilla mode (structure plays no part there, so decoding goes on exactly as HF generate's).
        A consumer that goes on stops tracking at the defect (:class:`SequenceVisibility`).
        """
        return self.evicts if override is None else bool(override)

    @classmethod
    def chat(cls, **knobs: Any) -> MaskConfig:
        """A setting tracked from the assistant's turn on (what engines and training use on chat prompts)."""
        return cls(require_assistant_section=True, **knobs)

    # -- names ---------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """The setting as one word (eval's mode names): ``vanilla``, ``memento``, ``keep-N`` or
        ``restart``, with ``+delimiters`` / ``+last-block`` for the other two eviction knobs.
        :meth:`from_mode` reads it back (``require_assistant_section`` is not part of the name)."""
        name = {-1: "vanilla", 0: "restart" if self.restart else "memento"}.get(self.keep_last_n)
        name = name or f"keep-{self.keep_last_n}"
        if self.mask_delimiters:
            name += "+delimiters"
        if self.keep_last_block_for_answer:
            name += "+last-block"
        return name

    @classmethod
    def from_mode(cls, name: str, **knobs: Any) -> MaskConfig:
        """The setting a mode name (see :attr:`mode`) stands for; ``knobs`` set the rest."""
        base, *extras = name.strip().lower().split("+")
        match = _KEEP_MODE.fullmatch(base)
        if base in _BASE_MODES:
            knobs.update(_BASE_MODES[base])
        elif match and int(match.group(1)) >= 1:
            knobs["keep_last_n"] = int(match.group(1))
        else:
            raise ValueError(
                f"unknown mode {name!r}: memento, vanilla, restart or keep-N (N >= 1), "
                "optionally +delimiters and/or +last-block"
            )
        for extra in extras:
            if extra not in _MODE_EXTRAS:
                raise ValueError(f"unknown mode suffix +{extra} in {name!r}: +delimiters or +last-block")
            knobs[_MODE_EXTRAS[extra]] = True
        return cls(**knobs)

    def describe(self) -> str:
        """The knob setting in one line (titles of mask pictures)."""
        mode = {-1: "vanilla", 0: "memento"}.get(self.keep_last_n, f"keep last {self.keep_last_n}")
        parts = [f"keep_last_n={self.keep_last_n} ({mode})", f"mask_delimiters={self.mask_delimiters}"]
        if self.keep_last_block_for_answer:
            parts.append("keep_last_block_for_answer")
        if self.restart:
            parts.append("restart")
        return ", ".join(parts)

    # -- loose knobs ---------------------------------------------------------------------------

    def split_knobs(self, options: Mapping[str, Any]) -> tuple[MaskConfig, dict[str, Any]]:
        """This setting with the knobs named in ``options`` replaced, and the options that are not knobs.

        For entry points that take knobs as loose names: ``LLM(path, keep_last_n=-1)``, the vLLM
        backend's JSON settings. A ``mask`` entry (a whole :class:`MaskConfig`) may not be mixed
        with loose knobs.
        """
        knobs = {k: v for k, v in options.items() if k in MASK_KNOBS}
        rest = {k: v for k, v in options.items() if k not in MASK_KNOBS}
        if knobs and rest.get("mask") is not None:
            raise ValueError(f"give either mask= or the knobs {sorted(knobs)}, not both")
        base = rest.pop("mask", None) or self
        if not isinstance(base, MaskConfig):
            raise ValueError(f"mask must be a MaskConfig, not {type(base).__name__}")
        return (dataclasses.replace(base, **knobs) if knobs else base), rest

    def changed_knobs(self, base: MaskConfig) -> dict[str, Any]:
        """The knobs whose values differ from ``base`` (a compact JSON form)."""
        return {k: getattr(self, k) for k in MASK_KNOBS if getattr(self, k) != getattr(base, k)}


MASK_KNOBS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(MaskConfig))
"""The knob names, as keyword arguments, JSON keys and (with dashes) command-line options."""

_BASE_MODES: dict[str, dict[str, Any]] = {
    "vanilla": {"keep_last_n": -1},
    "memento": {"keep_last_n": 0},
    "restart": {"keep_last_n": 0, "restart": True},
}
_KEEP_MODE = re.compile(r"keep-(\d+)")
_MODE_EXTRAS = {"delimiters": "mask_delimiters", "last-block": "keep_last_block_for_answer"}


def check_block_cap(max_block_tokens: int | None) -> None:
    """The block-length cap is None (off) or a positive token count; anything else is refused."""
    cap = max_block_tokens
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ValueError(f"max_block_tokens must be a positive integer (None: no cap), got {cap!r}")


VANILLA = MaskConfig(keep_last_n=-1)
MEMENTO = MaskConfig(keep_last_n=0)
CHAT_MEMENTO = MaskConfig.chat(keep_last_n=0)
"""The default of the engine, training and the vLLM backend: memento eviction, tracked from the
assistant's turn on (special tokens quoted in a prompt are plain text)."""


@dataclass(frozen=True)
class EvictionEvent:
    """The tokens ``evicted`` become invisible before token ``at`` is fed to the model.

    In restart mode the tokens ``recompute`` (the memento, the end of the evicted span) must then
    be fed again at their own logical positions, without the block, before token ``at``.
    """

    at: int
    unit: int
    evicted: range
    recompute: range = range(0)

    @property
    def dropped(self) -> range:
        """The tokens whose KV is gone for good: the evicted span less the memento a restart recomputes."""
        return range(self.evicted.start, self.recompute.start) if self.recompute else self.evicted

    @property
    def rewind_to(self) -> int | None:
        """Restart, for an engine that keeps one KV entry per token (vLLM): drop everything from the
        block on and resume feeding at the memento's first token, so its KV is recomputed without the
        block. The expanded rows of :class:`RowLayout` are the same decision for a row-keyed engine."""
        return self.recompute.start if self.recompute else None


class MementoTracker:
    """Consumes token ids one at a time and says which earlier tokens die, and when.

    ``feed(token_id)`` returns the events to apply *before* that token's key/value is computed.
    Malformed structure raises :class:`memento.format.MementoFormatError` naming the defect and the
    token index; a well-formed prefix (e.g. a block still open) is fine.
    """

    def __init__(
        self,
        specials: SpecialTokenIds,
        config: MaskConfig = MEMENTO,
        assistant_prefix: Sequence[int] | None = None,
    ) -> None:
        if config.require_assistant_section and not assistant_prefix:
            raise ValueError(
                "require_assistant_section needs assistant_prefix: the token ids that open the "
                "assistant turn (e.g. those of '<|im_start|>assistant\\n')"
            )
        self.specials = specials
        self.config = config
        self.assistant_prefix = tuple(int(t) for t in assistant_prefix or ())
        self.position = 0
        self.tracking = not config.require_assistant_section
        self.tracking_from: int | None = 0 if self.tracking else None
        self._recent: deque[int] = deque(maxlen=max(1, len(self.assistant_prefix)))
        self._parser = StructureParser(require_think=False, token_positions=True)
        self._kind_by_id = {tid: kind for kind, tid in specials.by_kind().items()}
        self.events: list[EvictionEvent] = []

    @property
    def units(self) -> list[UnitSpan]:
        """The (block, memento) units seen so far, in order."""
        return self._parser.units

    def _evicted_range(self, span: UnitSpan) -> range:
        assert span.block_end is not None
        if self.config.mask_delimiters:
            return range(span.block_start, span.block_end + 1)
        return range(span.block_start + 1, span.block_end)

    def _on_special(self, kind: Kind, position: int) -> list[EvictionEvent]:
        self._parser.feed(kind, position)
        config = self.config
        if not config.evicts:
            return []
        units = self._parser.units
        victim: int | None = None
        if kind is Kind.SUMMARY_END and not config.keep_last_block_for_answer:
            victim = len(units) - 1 - config.keep_last_n
        elif kind is Kind.BLOCK_START and config.keep_last_block_for_answer:
            victim = len(units) - 2 - config.keep_last_n
        if victim is None or victim < 0:
            return []
        span = units[victim]
        if config.restart:
            assert span.summary_start is not None
            memento = range(span.summary_start, position)
            event = EvictionEvent(position, victim, range(span.block_start, position), memento)
        else:
            event = EvictionEvent(position, victim, self._evicted_range(span))
        self.events.append(event)
        return [event]

    def _watch_for_assistant(self, token_id: int) -> None:
        self._recent.append(token_id)
        if tuple(self._recent) == self.assistant_prefix:
            self.tracking = True
            self.tracking_from = self.position + 1

    def feed(self, token_id: int) -> list[EvictionEvent]:
        """Consume one token; return the evictions to apply before it is fed to the model."""
        position = self.position
        events: list[EvictionEvent] = []
        if self.tracking:
            kind = self._kind_by_id.get(int(token_id))
            if kind is not None:
                events = self._on_special(kind, position)
        else:
            self._watch_for_assistant(int(token_id))
        self.position = position + 1
        return events

    def feed_many(self, token_ids: Sequence[int] | np.ndarray) -> list[EvictionEvent]:
        """Consume many tokens at once (vectorised search for the special tokens)."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        start = 0
        if not self.tracking:
            start = self._find_assistant_start(ids)
            if start < 0:  # no assistant turn yet: remember the tail, track nothing
                self._recent.extend(int(t) for t in ids[-len(self.assistant_prefix) :])
                self.position += len(ids)
                return []
            self.tracking = True
            self.tracking_from = self.position + start
        base = self.position
        specials = np.fromiter(self._kind_by_id.keys(), dtype=np.int64)
        hits = np.flatnonzero(np.isin(ids[start:], specials)) + start
        events: list[EvictionEvent] = []
        for offset in hits.tolist():
            kind = self._kind_by_id[int(ids[offset])]
            events += self._on_special(kind, base + offset)
        self.position = base + len(ids)
        return events

    def _find_assistant_start(self, ids: np.ndarray) -> int:
        """Offset in ``ids`` just past the first complete assistant prefix, or -1.

        The last tokens of earlier chunks are carried, so a prefix split across chunks is found.
        """
        prefix = np.asarray(self.assistant_prefix, dtype=np.int64)
        m = len(prefix)
        carried_list = list(self._recent)[-(m - 1) :] if m > 1 else []
        carried = np.asarray(carried_list, dtype=np.int64)
        joined = np.concatenate([carried, ids])
        if len(joined) < m:
            return -1
        windows = np.lib.stride_tricks.sliding_window_view(joined, m)
        matches = np.flatnonzero(np.all(windows == prefix, axis=1))
        if len(matches) == 0:
            return -1
        return int(matches[0]) + m - len(carried)


# ----------------------------------------------------------------------------------------------
# Incremental consumers: what an engine asks as tokens arrive
# ----------------------------------------------------------------------------------------------


@dataclass
class EvictionCount:
    """Evictions and evicted tokens, each eviction counted once even when a preemption replays it.

    Events come in order of ``at``; a replay after a reset repeats ``at`` values already seen.
    """

    evictions: int = 0
    evicted_tokens: int = 0
    _last_at: int = -1

    def add(self, events: Iterable[EvictionEvent]) -> None:
        for event in events:
            if event.at > self._last_at:
                self.evictions += 1
                self.evicted_tokens += len(event.evicted)
                self._last_at = event.at


class SequenceTracker:
    """One sequence's eviction events as its tokens arrive, with the format-error policy applied.

    ``feed`` returns the events to apply before the tokens it was given are fed to the model.
    A malformed structure raises :class:`MementoFormatError` when ``stop_on_format_error`` (see
    :meth:`MaskConfig.stops_on_format_error` for the default); otherwise tracking stops at the
    defect: the evictions decided before it stand, and nothing from it on is tracked. ``reset``
    (a preemption: all KV gone) starts over; ``count`` keeps counting each eviction once.
    """

    def __init__(
        self,
        specials: SpecialTokenIds,
        config: MaskConfig = MEMENTO,
        assistant_prefix: Sequence[int] | None = None,
        *,
        stop_on_format_error: bool | None = None,
    ) -> None:
        self.specials = specials
        self.config = config
        self.assistant_prefix = assistant_prefix
        self.stop_on_format_error = config.stops_on_format_error(stop_on_format_error)
        self.count = EvictionCount()
        self.reset()

    def reset(self) -> None:
        self.tracker = MementoTracker(self.specials, self.config, self.assistant_prefix)
        self.structure_error: MementoFormatError | None = None
        self.num_tokens = 0

    def feed(self, token_ids: Sequence[int] | np.ndarray) -> list[EvictionEvent]:
        """Track the next tokens; the events they cause, in order of ``at``."""
        self.num_tokens += len(token_ids)
        if self.structure_error is not None:
            return []
        seen = len(self.tracker.events)
        try:
            if len(token_ids) == 1:  # a decode step: no array machinery
                return self.tracker.feed(int(token_ids[0]))
            return self.tracker.feed_many(np.asarray(token_ids, dtype=np.int64).reshape(-1))
        except MementoFormatError as err:
            if self.stop_on_format_error:
                raise
            self.structure_error = err
            return self.tracker.events[seen:]  # decided before the defect: they stand


class RowLayout:
    """One sequence laid out as forward-pass rows, built as its tokens arrive (the embedded engine,
    and :func:`compute_visibility` for a whole sequence at once).

    Normally one row per token. In restart mode each evicted memento is fed a second time, just
    before its ``<|summary_end|>`` and at the same logical positions, with its block already
    invisible; later rows see only that copy. Every row has ``invisible_from``, the first row that
    no longer sees it: the rule is :func:`visible`. ``row_of_token[t]`` is the row whose output
    predicts token ``t + 1``.
    """

    def __init__(self, tracker: SequenceTracker) -> None:
        self.tracker = tracker
        self.reset()

    def reset(self) -> None:
        """Forget every row and every eviction (a preemption); :attr:`tracker`'s count stays."""
        self.tracker.reset()
        self._rows = GrowingTable(3)  # token, logical position, invisible_from
        self._row_of_token = GrowingTable(1)
        self.doomed: list[range] = []
        """Runs of rows given a finite ``invisible_from`` (the same for the whole run: one eviction
        each) and not yet taken by :meth:`take_dead`."""

    @property
    def num_rows(self) -> int:
        return self._rows.size

    @property
    def num_tokens(self) -> int:
        return self._row_of_token.size

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views of every row's token, logical position (its RoPE position) and ``invisible_from``."""
        return self._rows.column(0), self._rows.column(1), self._rows.column(2)

    @property
    def row_of_token(self) -> np.ndarray:
        return self._row_of_token.column(0)

    def feed(self, token_ids: Sequence[int] | np.ndarray) -> list[EvictionEvent]:
        """Append the rows of the next tokens (and, in restart mode, the recomputed mementos)."""
        first_token = self.num_tokens
        if len(token_ids) != 1:  # one conversion, shared with the tracker
            token_ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        events = self.tracker.feed(token_ids)
        if len(token_ids) == 1 and not events:  # a decode step: one row, nothing evicted
            self._row_of_token.append_row(self.num_rows)
            self._rows.append_row(int(token_ids[0]), first_token, NEVER)
            return events
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        self._rows.reserve(self.num_rows + len(ids) + sum(len(e.recompute) for e in events))
        done = 0
        for event in events:
            self._append_tokens(ids[done : event.at - first_token])
            done = event.at - first_token
            self._apply(event)
        self._append_tokens(ids[done:])
        return events

    def _apply(self, event: EvictionEvent) -> None:
        first_new_row = self.num_rows
        recompute = event.recompute
        if recompute:
            sources = self.row_of_token[recompute.start : recompute.stop]
            self._rows.append(self._rows.column(0)[sources], np.arange(recompute.start, recompute.stop), NEVER)
        # A unit's tokens are consecutive rows (copies are only ever inserted after a unit's span),
        # and each unit is evicted once, so the run is new to eviction.
        first = int(self.row_of_token[event.evicted.start])
        victims = range(first, first + len(event.evicted))
        self._rows.data[2, victims.start : victims.stop] = first_new_row
        if victims:
            self.doomed.append(victims)

    def _append_tokens(self, ids: np.ndarray) -> None:
        first_row, first_token = self.num_rows, self.num_tokens
        self._row_of_token.append(np.arange(first_row, first_row + len(ids)))
        self._rows.append(ids, np.arange(first_token, first_token + len(ids)), NEVER)

    def take_dead(self, computed: int) -> list[range]:
        """Runs of rows that no row from ``computed`` on can see (rows below ``computed`` are done):
        their KV can go. Each run is returned once."""
        if not self.doomed:  # only rows an eviction touched can die: no scan of every row
            return []
        invisible = self._rows.column(2)
        dead = [run for run in self.doomed if invisible[run.start] <= computed]
        if dead:
            self.doomed = [run for run in self.doomed if invisible[run.start] > computed]
        return dead

    def evictable_from(self) -> int:
        """The first row a future eviction may still cover (:attr:`num_rows` when none can).

        Units are evicted in order, once each, so the first unit without an eviction event (a closed
        block kept by ``keep_last_n``, or the open one) is where future evictions begin; rows before
        it that are still visible stay visible for good.
        """
        tracker = self.tracker
        inner = tracker.tracker
        if not self.tracker.config.evicts or tracker.structure_error is not None:
            return self.num_rows
        pending = len(inner.events)
        if pending >= len(inner.units):
            return self.num_rows
        return int(self.row_of_token[inner.units[pending].block_start])

    def window_floor(self, live_rows: np.ndarray, window: int) -> int:
        """Rows below this one have left a sliding window of ``window`` keys for good (:func:`window_mask`).

        A key leaves the window when W visible keys follow it, but it comes back if some of them are
        evicted later; it is out for good once W keys after it can never be evicted (visible now,
        before :meth:`evictable_from`). ``live_rows`` are the computed rows still held (ascending):
        an engine whose every layer slides may free the live rows below the floor. 0: none.
        """
        frontier = self.evictable_from()
        settled = live_rows[live_rows < frontier]
        settled = settled[self._rows.column(2)[settled] == NEVER]
        return int(settled[-window]) if len(settled) >= window else 0

    def visibility(self) -> Visibility:
        """The decision so far, for one forward pass over every row."""
        tracker = self.tracker.tracker
        tokens, positions, invisible_from = (c.copy() for c in self.columns())
        return Visibility(
            token_ids=tokens,
            position_ids=positions,
            invisible_from=invisible_from,
            source=positions.copy(),
            output_rows=self.row_of_token.copy(),
            events=tuple(tracker.events),
            units=tuple(tracker.units),
            tracking_from=tracker.tracking_from,
        )


class BlockCap:
    """The block-length cap (paper section 5): once the open block holds ``max_block_tokens`` tokens
    only ``<|block_end|>`` may follow. Tokens count from the open ``<|block_start|>`` (one in the
    prompt too); the embedded engine and the vLLM logits processor both ask this object."""

    def __init__(self, specials: SpecialTokenIds, max_block_tokens: int | None) -> None:
        check_block_cap(max_block_tokens)
        self.start, self.end = specials.block_start, specials.block_end
        self.max_block_tokens = max_block_tokens
        self.open = False
        self.length = 0

    def feed(self, token_ids: Iterable[int]) -> None:
        for token in token_ids:
            if token == self.start:
                self.open, self.length = True, 0
            elif token == self.end:
                self.open = False
            elif self.open:
                self.length += 1

    @property
    def must_end(self) -> bool:
        """Whether the next token must be ``<|block_end|>``."""
        cap = self.max_block_tokens
        return cap is not None and self.open and self.length >= cap


# ----------------------------------------------------------------------------------------------
# Whole sequences
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Visibility:
    """The visibility decision for one sequence, laid out for a single forward pass (see :class:`RowLayout`).

    ``token_ids``/``position_ids``/``invisible_from`` are per row. ``source`` maps each row to the
    index of the original token it carries. ``output_rows[t]`` is the row whose output predicts
    token ``t + 1``, i.e. where to read the logits of original token ``t``.
    """

    token_ids: np.ndarray
    position_ids: np.ndarray
    invisible_from: np.ndarray
    source: np.ndarray
    output_rows: np.ndarray
    events: tuple[EvictionEvent, ...]
    units: tuple[UnitSpan, ...]
    tracking_from: int | None

    def __len__(self) -> int:
        return len(self.token_ids)

    def dense(self, window: int | None = None) -> torch.Tensor:
        """The (L, L) boolean mask of this sequence; True where the query row sees the key
        (``window``: a sliding-window layer's, :func:`window_mask`)."""
        return window_mask(dense_mask(torch.from_numpy(self.invisible_from)[None])[0, 0], window)

    def live_kv(self) -> np.ndarray:
        """Keys visible to each row (the mask's row sums: the KV an engine holds), without the mask.

        By the rule, key ``k`` is visible to rows ``k .. invisible_from[k] - 1``: one interval each.
        """
        n = len(self)
        delta = np.zeros(n + 1, dtype=np.int64)
        np.add.at(delta, np.arange(n), 1)
        np.add.at(delta, np.minimum(self.invisible_from, n), -1)
        return np.cumsum(delta)[:n]


def compute_visibility(
    token_ids: Sequence[int] | np.ndarray,
    specials: SpecialTokenIds,
    config: MaskConfig = MEMENTO,
    assistant_prefix: Sequence[int] | None = None,
    *,
    stop_tracking_on_error: bool = False,
) -> Visibility:
    """Lay a whole sequence out as one forward pass (the rows an engine would feed, at once).

    Malformed structure raises :class:`MementoFormatError`, unless ``stop_tracking_on_error``: then
    the evictions decided before the defect stand and nothing from the defect on is tracked. An
    engine that lets a sequence with broken structure go on follows this rule.
    """
    tracker = SequenceTracker(specials, config, assistant_prefix, stop_on_format_error=not stop_tracking_on_error)
    layout = RowLayout(tracker)
    layout.feed(token_ids)
    return layout.visibility()


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------


def visible(q_idx: torch.Tensor, kv_idx: torch.Tensor, invisible_from_kv: torch.Tensor) -> torch.Tensor:
    """THE rule: a query sees a key at or before it that has not yet become invisible."""
    return (kv_idx <= q_idx) & (q_idx < invisible_from_kv)


def dense_mask(invisible_from: torch.Tensor) -> torch.Tensor:
    """Boolean mask (B, 1, L, L), True where query row q sees key column kv.

    :func:`visible` vectorised: ``q < invisible_from[kv]`` as one broadcast comparison, then
    ``tril_`` in place for ``kv <= q`` (one full-size allocation instead of three; the property
    tests check it against :func:`visible` through :func:`make_mask_mod`).
    """
    if invisible_from.dim() != 2:
        raise ValueError(f"invisible_from must be (batch, length), got {tuple(invisible_from.shape)}")
    length = invisible_from.shape[1]
    q_idx = torch.arange(length, device=invisible_from.device)
    return (q_idx[None, :, None] < invisible_from[:, None, :]).tril_()[:, None]


WINDOW_ROWS_PER_CHUNK = 1024
"""Query rows whose window is counted at once (bounds the float32 counts to chunk x keys)."""


def window_mask(mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """The sliding-window rule on top of the memento rule: of the keys ``mask`` lets a query row see,
    a sliding layer with ``window`` W sees the last W (in row order); ``None`` is a full layer.

    ``mask`` is boolean (..., Q, K) with the key columns in row order (a dense mask, or an engine's
    gathered live keys followed by the new rows); the result has the same shape.

    Why the last W *visible* keys rather than the keys within W logical positions:

    * It is what an engine that physically removes evicted KV computes with its attention kernels
      unchanged: after compaction a sequence's cache holds exactly the keys its next query sees, in
      order, and a paged kernel's window counts cache entries (vLLM's, and the release's overlay of
      it). A model trained under this rule is served exactly by stock kernels; under the logical
      reading every kernel would need a per-token position window.
    * The mementos stay in reach of the sliding layers once their block is gone: evicting a block
      brings earlier mementos back inside the window, as the paper's "the memento replaces the
      block" intends. Under the logical reading a memento more than W positions back would be out
      of reach of three quarters of Olmo 3's layers while its KV is still kept for the others.
    * With no eviction (vanilla, or before the first ``<|summary_end|>``) the visible keys are every
      earlier token and this is transformers' window (``q - W < kv <= q``) exactly.

    The price: a sliding layer may meet relative RoPE distances beyond W (the visible keys span
    more than W positions once blocks are gone), which pretraining never showed it; and a key out
    of the window can come back when later tokens are evicted, so an engine may free a token for
    the sliding layers only once W keys after it can never be evicted (:meth:`RowLayout.window_floor`;
    with any full-attention layer in the model nothing is freed early: those layers keep every
    visible key anyway).
    """
    if window is None:
        return mask
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"a sliding window must be a positive number of keys (None: full attention), got {window!r}")
    if mask.shape[-1] <= window:
        return mask  # no row can see more than W keys
    out = torch.empty_like(mask)
    rows = mask.shape[-2]
    for start in range(0, rows, WINDOW_ROWS_PER_CHUNK):
        part = mask[..., start : start + WINDOW_ROWS_PER_CHUNK, :]
        # A visible key is among the row's last W iff more than (total - W) visible keys lie at or
        # before it. Counts in float32 (exact below 2**24 keys): twice as fast as int32 on CPU.
        upto = part.cumsum(-1, dtype=torch.float32)
        out[..., start : start + WINDOW_ROWS_PER_CHUNK, :] = part & (upto > upto[..., -1:] - window)
    return out


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The boolean mask as an additive float mask: 0 where visible, the dtype's minimum elsewhere.

    The finite minimum (as transformers uses) rather than -inf keeps fully masked rows from
    producing NaN. Attention implementations that add the mask to the scores (transformers'
    ``eager``) need this form: a boolean mask added as 0/1 would mask nothing.
    """
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    lowest = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
    return torch.where(mask, zero, lowest)


def make_mask_mod(invisible_from: torch.Tensor) -> Callable[..., torch.Tensor]:
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` applying the same rule."""
    if invisible_from.dim() != 2:
        raise ValueError(f"invisible_from must be (batch, length), got {tuple(invisible_from.shape)}")

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return visible(q_idx, kv_idx, invisible_from[b, kv_idx])

    return mask_mod


def make_block_mask(invisible_from: torch.Tensor, block_size: int = 128):
    """A FlexAttention ``BlockMask`` for ``flex_attention(..., block_mask=...)``, built per tile.

    ``create_block_mask`` would evaluate the ``mask_mod`` on every (q, kv) pair (eagerly that
    materialises the full B x L x L mask: 8 s and 10 GiB for 16 x 8K on CPU). The rule lets us
    decide whole tiles from ``invisible_from`` alone: query rows ``[q0, q1]`` see key ``k`` for
    some row iff ``max(k, q0) <= q1`` and ``max(k, q0) < invisible_from[k]``, and for every row
    iff ``k <= q0`` and ``q1 < invisible_from[k]``. Work is O(B x L x L / block_size); the
    partially visible tiles are still resolved by :func:`make_mask_mod` inside the kernel.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if invisible_from.dim() != 2:
        raise ValueError(f"invisible_from must be (batch, length), got {tuple(invisible_from.shape)}")
    batch, length = invisible_from.shape
    device = invisible_from.device
    n_blocks = -(-length // block_size)
    padded = n_blocks * block_size
    key = torch.arange(padded, device=device)
    inv = torch.nn.functional.pad(invisible_from, (0, padded - length), value=0)  # pad keys: never seen
    q0 = torch.arange(n_blocks, device=device) * block_size
    q1 = (q0 + block_size - 1).clamp(max=length - 1)
    rows_complete = (q0 + block_size) <= length  # a tile with rows past the end is never full
    first_seer = torch.maximum(key[None, :], q0[:, None])  # (nQ, L'): first row that could see k
    some_row = (first_seer <= q1[:, None])[None] & (first_seer[None] < inv[:, None, :])
    every_row = ((key[None, :] <= q0[:, None]) & rows_complete[:, None])[None] & (q1[None, :, None] < inv[:, None, :])
    full = every_row.view(batch, n_blocks, n_blocks, block_size).all(-1)
    partial = some_row.view(batch, n_blocks, n_blocks, block_size).any(-1) & ~full

    def counts_and_order(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flags = flags[:, None].to(torch.int8)  # (B, 1, nQ, nKV): the same for every head
        order = torch.argsort(flags, dim=-1, descending=True, stable=True)
        return flags.sum(-1, dtype=torch.int32), order.to(torch.int32)

    kv_num, kv_idx = counts_and_order(partial)
    full_num, full_idx = counts_and_order(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=make_mask_mod(invisible_from),
        seq_lengths=(length, length),
    )


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskBatch:
    """Padded model inputs for a batch, with the visibility decision for every row.

    Padding rows get ``invisible_from = row + 1``: each sees only itself and nothing sees it, so
    the same rule covers padding and no softmax row is empty.
    """

    input_ids: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L), 1 real, 0 padding
    invisible_from: torch.Tensor  # (B, L)
    output_rows: list[np.ndarray]  # per sample, in padded row coordinates
    offsets: list[int]  # per sample, the padded row of its row 0

    def dense(self, window: int | None = None) -> torch.Tensor:
        """(B, 1, L, L) boolean mask, True = attend: for SDPA (``attn_implementation="sdpa"``).

        ``window``: the mask of a sliding-window layer (:func:`window_mask`). transformers'
        ``eager`` attention adds the mask to the scores, so it needs :meth:`additive`; a boolean
        mask there silently masks nothing.
        """
        return window_mask(dense_mask(self.invisible_from), window)

    def additive(self, dtype: torch.dtype = torch.float32, window: int | None = None) -> torch.Tensor:
        return additive_mask(self.dense(window), dtype)

    def mask_mod(self) -> Callable[..., torch.Tensor]:
        return make_mask_mod(self.invisible_from)


def collate_visibility(
    items: Sequence[Visibility],
    *,
    padding_side: str = "right",
    pad_token_id: int = 0,
    pad_to_multiple_of: int | None = None,
) -> MaskBatch:
    """Pad per-sequence decisions into one batch (left or right padding)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    if not items:
        raise ValueError("cannot collate an empty batch")
    length = max(len(v) for v in items)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(items)
    rows = np.arange(length, dtype=np.int64)
    input_ids = np.full((batch, length), pad_token_id, dtype=np.int64)
    position_ids = np.zeros((batch, length), dtype=np.int64)
    attention = np.zeros((batch, length), dtype=np.int64)
    invisible = np.tile(rows + 1, (batch, 1))
    output_rows, offsets = [], []
    for b, vis in enumerate(items):
        n = len(vis)
        offset = length - n if padding_side == "left" else 0
        sl = slice(offset, offset + n)
        input_ids[b, sl] = vis.token_ids
        position_ids[b, sl] = vis.position_ids
        attention[b, sl] = 1
        inv = np.where(vis.invisible_from == NEVER, NEVER, vis.invisible_from + offset)
        if offset + n < length:
            # right padding: hide the sample from the padding rows after it, so that each padding
            # row sees only itself (no real row lies beyond the sample, so none is affected)
            inv = np.minimum(inv, offset + n)
        invisible[b, sl] = inv
        output_rows.append(vis.output_rows + offset)
        offsets.append(offset)
    return MaskBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        attention_mask=torch.from_numpy(attention),
        invisible_from=torch.from_numpy(invisible),
        output_rows=output_rows,
        offsets=offsets,
    )


def build_batch(
    sequences: Sequence[Sequence[int] | np.ndarray],
    specials: SpecialTokenIds,
    config: MaskConfig = MEMENTO,
    *,
    assistant_prefix: Sequence[int] | None = None,
    padding_side: str = "right",
    pad_token_id: int = 0,
    pad_to_multiple_of: int | None = None,
) -> MaskBatch:
    """Token id sequences -> padded inputs and visibility, ready for a dense mask or mask_mod."""
    items = [compute_visibility(seq, specials, config, assistant_prefix) for seq in sequences]
    return collate_visibility(
        items,
        padding_side=padding_side,
        pad_token_id=pad_token_id,
        pad_to_multiple_of=pad_to_multiple_of,
    )
