"""One sequence in the engine: its tokens, its rows, which rows hold KV slots, and its accounting.

A *token* has a logical index in the full sequence (prompt + output, evicted tokens included): that
index is its RoPE position. A *row* is one forward-pass input: normally one row per token, but in
restart mode a memento is fed a second time (at the same positions) before its ``<|summary_end|>``,
as in :func:`memento.masking.compute_visibility`'s restart layout. Every row has
``invisible_from``: the first row that no longer sees it. The one rule of :mod:`memento.masking`
decides visibility: row ``q`` sees row ``k`` iff ``k <= q < invisible_from[k]``.

The :class:`~memento.masking.MementoTracker` watches the tokens as they arrive and its eviction
events set ``invisible_from``. A row whose ``invisible_from`` is at or before the first row not yet
computed can never be seen again: its KV slot goes back to the pool at once.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from memento.engine.sampling import SamplingParams
from memento.format import MementoFormatError
from memento.masking import NEVER, MementoTracker


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class KVStats:
    """Per-sequence KV accounting (tokens, not bytes)."""

    live_kv: list[int] = field(default_factory=list)
    """Keys the newest token attended to, at each step that produced a token."""
    evictions: int = 0
    evicted_tokens: int = 0
    preemptions: int = 0

    @property
    def peak(self) -> int:
        return max(self.live_kv, default=0)

    @property
    def auc(self) -> int:
        """Sum of live KV over the steps (token-steps)."""
        return sum(self.live_kv)


class Sequence:
    """A prompt being continued: tokens, rows, slots. The scheduler and runner move it along."""

    def __init__(
        self,
        seq_id: int,
        request_id: str,
        sample_index: int,
        prompt_ids: list[int],
        params: SamplingParams,
        make_tracker: Callable[[], MementoTracker],
        forced_tokens: list[int] | None = None,
        stop_on_format_error: bool = True,
    ) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.sample_index = sample_index
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.params = params
        self.forced_tokens = forced_tokens
        self.stop_on_format_error = stop_on_format_error
        self.structure_error: MementoFormatError | None = None  # tracking stopped here (if tolerated)
        self.generator: torch.Generator | None = None  # this sample's own RNG (set by the engine)
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.stop_reason: int | str | None = None
        self.output_ids: list[int] = []
        self.logprobs: list[float | None] = []
        self.top_logprobs: list[dict[int, float] | None] = []
        self.kept_logits: list = []
        self.stats = KVStats()
        self.block_tokens = 0  # tokens since the open <|block_start|> of the output (block-length cap)
        self.block_open = False
        self._make_tracker = make_tracker
        self._events_seen = 0
        self.reset_rows()

    # -- rows --------------------------------------------------------------------------------

    def reset_rows(self) -> None:
        """Forget all KV (the slots must already be freed) and lay the rows out again from the tokens.

        Used at creation and after a preemption: every row becomes pending again, so recomputing
        rebuilds exactly the state that was evicted (mementos are recomputed with their blocks
        visible, then the blocks go away again).
        """
        self.tracker = self._make_tracker()
        self.structure_error = None
        self.row_token: list[int] = []
        self.row_position: list[int] = []
        self.row_invisible_from: list[int] = []
        self.row_of_token: list[int] = []
        self.computed = 0  # rows [0, computed) have had their KV computed
        # Computed rows that still hold a slot (ascending) and their slots: NumPy buffers grown by
        # doubling, because the runner reads them whole at every step of every sequence.
        self._live_rows = np.zeros(64, dtype=np.int64)
        self._live_slots = np.zeros(64, dtype=np.int64)
        self._num_live = 0
        self.doomed: list[int] = []  # rows given an invisible_from and not yet released
        for token in self.all_token_ids():
            self._add_row_for_token(token)

    def all_token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        return len(self.row_token) - self.computed

    def _add_row_for_token(self, token: int) -> None:
        """Feed the tracker (may raise MementoFormatError), apply its events, append the token's row.

        With ``stop_on_format_error=False`` a defect ends tracking instead: the evictions decided
        before it stand, later tokens are plain rows (``compute_visibility(stop_tracking_on_error=True)``).
        """
        index = len(self.row_of_token)
        events = []
        if self.structure_error is None:
            try:
                events = self.tracker.feed(token)
            except MementoFormatError as err:
                if self.stop_on_format_error:
                    raise
                self.structure_error = err
        for event in events:
            first_new_row = len(self.row_token)
            for t in event.recompute:  # restart: the memento again, at its own positions
                self._append_row(self.row_token[self.row_of_token[t]], t)
            for t in event.evicted:
                row = self.row_of_token[t]
                self.row_invisible_from[row] = min(self.row_invisible_from[row], first_new_row)
                self.doomed.append(row)
        if len(self.tracker.events) > self._events_seen:  # count each eviction once, even after preemption
            for event in self.tracker.events[self._events_seen :]:
                self.stats.evictions += 1
                self.stats.evicted_tokens += len(event.evicted)
            self._events_seen = len(self.tracker.events)
        self.row_of_token.append(len(self.row_token))
        self._append_row(token, index)

    def _append_row(self, token: int, position: int) -> None:
        self.row_token.append(int(token))
        self.row_position.append(position)
        self.row_invisible_from.append(NEVER)

    def append_output(self, token: int) -> None:
        """Record a generated token (the caller decides whether to feed it on)."""
        self.output_ids.append(int(token))

    def feed_last_output(self) -> None:
        """Give the newest output token its row(s); raises MementoFormatError on malformed structure."""
        self._add_row_for_token(self.output_ids[-1])

    # -- slots -------------------------------------------------------------------------------

    def pending_rows(self, count: int) -> range:
        return range(self.computed, self.computed + count)

    def mark_computed(self, rows: range, slots: list[int]) -> None:
        """The rows' KV now lives in ``slots``."""
        assert rows.start == self.computed and len(rows) == len(slots)
        n, grow = self._num_live, len(rows)
        if n + grow > len(self._live_rows):
            size = max(2 * len(self._live_rows), n + grow)
            self._live_rows = np.resize(self._live_rows, size)
            self._live_slots = np.resize(self._live_slots, size)
        self._live_rows[n : n + grow] = np.arange(rows.start, rows.stop)
        self._live_slots[n : n + grow] = slots
        self._num_live = n + grow
        self.computed = rows.stop

    @property
    def live_rows(self) -> np.ndarray:
        """The computed rows that still hold a KV slot, ascending (a view: copy before keeping)."""
        return self._live_rows[: self._num_live]

    @property
    def live_slots(self) -> np.ndarray:
        """The slot of each of :attr:`live_rows` (a view)."""
        return self._live_slots[: self._num_live]

    @property
    def num_live(self) -> int:
        return self._num_live

    def release_dead(self) -> list[int]:
        """Drop (and return the slots of) live rows no pending or future row can see."""
        if not self.doomed:  # only rows an eviction event touched can die: no scan of the live rows
            return []
        horizon = self.computed
        dead = [r for r in self.doomed if r < horizon and self.row_invisible_from[r] <= horizon]
        if not dead:
            return []
        dead_set = set(dead)
        self.doomed = [r for r in self.doomed if r not in dead_set]
        keep = ~np.isin(self.live_rows, dead)
        slots = self.live_slots[~keep].tolist()
        n = int(keep.sum())
        self._live_rows[:n] = self.live_rows[keep]
        self._live_slots[:n] = self.live_slots[keep]
        self._num_live = n
        return slots

    def release_all(self) -> list[int]:
        """Every slot this sequence holds (for preemption or when it finishes)."""
        slots = self.live_slots.tolist()
        self._num_live = 0
        self.doomed = []
        return slots

    # -- state -------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str, error: str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.error = error
