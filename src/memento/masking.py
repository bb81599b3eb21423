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

Unlike the release's engine, which evicts blocks found in the prompt only once generation starts,
the rule here holds inside the prompt too: a token after a prompt block's memento never sees it.
That keeps training, prefill and decode identical.
"""

from __future__ import annotations

import dataclasses
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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
    """Tokens ``start..stop-1`` become invisible before token ``at`` is fed to the model.

    In restart mode, tokens ``recompute_start..recompute_stop-1`` (the memento, a sub-range of the
    evicted one) must then be re-prefilled at their own logical positions before token ``at``.
    """

    at: int
    unit: int
    start: int
    stop: int
    recompute_start: int | None = None
    recompute_stop: int | None = None

    @property
    def evicted(self) -> range:
        return range(self.start, self.stop)

    @property
    def recompute(self) -> range:
        if self.recompute_start is None or self.recompute_stop is None:
            return range(0)
        return range(self.recompute_start, self.recompute_stop)


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

    def _evicted_range(self, span: UnitSpan) -> tuple[int, int]:
        assert span.block_end is not None
        if self.config.mask_delimiters:
            return span.block_start, span.block_end + 1
        return span.block_start + 1, span.block_end

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
            event = EvictionEvent(
                at=position,
                unit=victim,
                start=span.block_start,
                stop=position,
                recompute_start=span.summary_start,
                recompute_stop=position,
            )
        else:
            start, stop = self._evicted_range(span)
            event = EvictionEvent(at=position, unit=victim, start=start, stop=stop)
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
# Whole sequences
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Visibility:
    """The visibility decision for one sequence, laid out for a single forward pass.

    Rows are the tokens fed to the model. Without restart they are the sequence itself. In restart
    mode each evicted memento is fed twice: once as generated (its block visible) and once as
    recomputed (inserted just before its ``<|summary_end|>``, same logical positions, block
    invisible); later tokens see only the recomputed copy.

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

    def dense(self) -> torch.Tensor:
        """The (L, L) boolean mask of this sequence; True where the query row sees the key."""
        return dense_mask(torch.from_numpy(self.invisible_from)[None])[0, 0]


def compute_visibility(
    token_ids: Sequence[int] | np.ndarray,
    specials: SpecialTokenIds,
    config: MaskConfig = MEMENTO,
    assistant_prefix: Sequence[int] | None = None,
    *,
    stop_tracking_on_error: bool = False,
) -> Visibility:
    """Run the tracker over a whole sequence and lay the decision out as one forward pass.

    Malformed structure raises :class:`MementoFormatError`, unless ``stop_tracking_on_error``: then
    the evictions decided before the defect stand and nothing from the defect on is tracked (the
    rest of the sequence is appended as plain causal rows). An engine that lets a sequence with
    broken structure go on (e.g. in vanilla mode, where structure plays no part) follows this rule.
    """
    if stop_tracking_on_error:
        try:
            return compute_visibility(token_ids, specials, config, assistant_prefix)
        except MementoFormatError as err:
            ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
            head = compute_visibility(ids[: err.position], specials, config, assistant_prefix)
            return _append_untracked(head, ids[err.position :])
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    tracker = MementoTracker(specials, config, assistant_prefix)
    events = tracker.feed_many(ids)
    n = len(ids)
    copies = [ev for ev in events if ev.recompute_start is not None]
    if not copies:
        invisible_from = np.full(n, NEVER, dtype=np.int64)
        for ev in events:
            invisible_from[ev.start : ev.stop] = np.minimum(invisible_from[ev.start : ev.stop], ev.at)
        rows = np.arange(n, dtype=np.int64)
        return Visibility(
            token_ids=ids,
            position_ids=rows.copy(),
            invisible_from=invisible_from,
            source=rows.copy(),
            output_rows=rows,
            events=tuple(events),
            units=tuple(tracker.units),
            tracking_from=tracker.tracking_from,
        )
    return _restart_layout(ids, events, tracker)


def _append_untracked(head: Visibility, tail: np.ndarray) -> Visibility:
    """``head`` followed by ``tail`` as plain rows: logical positions go on, nothing becomes invisible."""
    first_row, first_token = len(head), len(head.output_rows)
    rows = np.arange(first_row, first_row + len(tail), dtype=np.int64)
    tokens = np.arange(first_token, first_token + len(tail), dtype=np.int64)
    return Visibility(
        token_ids=np.concatenate([head.token_ids, tail]),
        position_ids=np.concatenate([head.position_ids, tokens]),
        invisible_from=np.concatenate([head.invisible_from, np.full(len(tail), NEVER, dtype=np.int64)]),
        source=np.concatenate([head.source, tokens]),
        output_rows=np.concatenate([head.output_rows, rows]),
        events=head.events,
        units=head.units,
        tracking_from=head.tracking_from,
    )


def _restart_layout(ids: np.ndarray, events: list[EvictionEvent], tracker: MementoTracker) -> Visibility:
    """Insert each recomputed memento before its ``<|summary_end|>`` and apply the one rule."""
    n = len(ids)
    inserted_before = np.zeros(n + 1, dtype=np.int64)  # copies inserted before original index t
    for ev in events:
        inserted_before[ev.at] += len(ev.recompute)
    shift = np.cumsum(inserted_before)[:n]  # rows inserted at or before index t's slot
    row_of = np.arange(n, dtype=np.int64) + shift
    total = n + int(inserted_before.sum())
    token_rows = np.zeros(total, dtype=np.int64)
    position_rows = np.zeros(total, dtype=np.int64)
    source = np.zeros(total, dtype=np.int64)
    invisible_from = np.full(total, NEVER, dtype=np.int64)
    token_rows[row_of] = ids
    position_rows[row_of] = np.arange(n)
    source[row_of] = np.arange(n)
    for ev in events:
        recompute = ev.recompute
        first_copy = int(row_of[ev.at]) - len(recompute)
        copy_rows = np.arange(first_copy, first_copy + len(recompute))
        token_rows[copy_rows] = ids[recompute.start : recompute.stop]
        position_rows[copy_rows] = np.arange(recompute.start, recompute.stop)
        source[copy_rows] = np.arange(recompute.start, recompute.stop)
        victims = row_of[ev.start : ev.stop]
        invisible_from[victims] = np.minimum(invisible_from[victims], first_copy)
    return Visibility(
        token_ids=token_rows,
        position_ids=position_rows,
        invisible_from=invisible_from,
        source=source,
        output_rows=row_of,
        events=tuple(events),
        units=tuple(tracker.units),
        tracking_from=tracker.tracking_from,
    )


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

    def dense(self) -> torch.Tensor:
        """(B, 1, L, L) boolean mask, True = attend: for SDPA (``attn_implementation="sdpa"``).

        transformers' ``eager`` attention adds the mask to the scores, so it needs
        :meth:`additive`; a boolean mask there silently masks nothing.
        """
        return dense_mask(self.invisible_from)

    def additive(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return additive_mask(self.dense(), dtype)

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
