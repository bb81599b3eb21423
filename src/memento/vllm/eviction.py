"""Per-request eviction bookkeeping for the vLLM backend: which tokens have no KV any more, where a
prefill chunk must stop, and what the worker must move when a block goes.

Nothing here imports vLLM: the scheduler (:mod:`memento.vllm.scheduler`) holds one
:class:`RequestEvictions` per request and turns its answers into vLLM operations, and the unit
tests drive it directly. The decisions themselves come from :class:`memento.masking.SequenceTracker`
(which tokens go and when, what a restart recomputes and where it rewinds, the format-error policy,
each eviction counted once); this module only translates them into physical layout.

vLLM counts a request's tokens logically (``num_computed_tokens`` is an index into prompt +
output), and so do RoPE positions. The KV lives in the request's pages at *physical* indices:
a token's physical index is its logical index minus the evicted tokens before it. Both views meet
in :attr:`RequestEvictions.shift`, the number of evicted tokens, which is the same for every token
a step computes because evictions only happen between steps:

* an eviction event fires "before token ``at`` is fed" (masking.py), so it is applied exactly when
  ``num_computed_tokens == at``: after the step that computed token ``at - 1``, before the step that
  feeds token ``at``;
* a prefill that crosses an event (a prompt holding closed blocks, or the recompute after a
  preemption) is cut into chunks that end at each ``at`` (:meth:`RequestEvictions.next_stop`), so
  plain causal attention inside a chunk is exactly the memento mask.

Within the request's pages the survivors are compacted at token granularity: the tokens after the
evicted span slide down over it (:class:`Compaction`), and pages past the new end are freed.
Restart mode evicts the block *and* its memento and rewinds ``num_computed_tokens`` to the memento's
first token, so the next step recomputes the memento without its block (as the paper's engine does).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from memento.masking import EvictionCount, EvictionEvent, SequenceTracker


@dataclass(frozen=True)
class Compaction:
    """KV work for one request, done by the worker before the next forward pass.

    ``moves`` are ``(src, dst, length)`` runs of the request's physical token indices: the tokens
    ``src..src+length-1`` go to ``dst..dst+length-1`` (``dst < src``; runs may overlap, so the
    worker reads every source before writing). Afterwards the request holds ``num_tokens`` physical
    tokens and every page past them is returned to the pool.
    """

    moves: tuple[tuple[int, int, int], ...]
    num_tokens: int

    @property
    def moved_tokens(self) -> int:
        return sum(length for _, _, length in self.moves)

    def then(self, later: Compaction) -> Compaction:
        """This compaction followed by ``later`` (two events due at the same step)."""
        return Compaction(self.moves + later.moves, later.num_tokens)


@dataclass(frozen=True)
class Applied:
    """What applying the due events asks of the engine: compact, and in restart mode rewind."""

    compaction: Compaction
    rewind_to: int | None = None
    """Set ``num_computed_tokens`` to this (restart: recompute the memento without its block)."""


class RequestEvictions:
    """The eviction state of one request (its tracker, pending events and evicted spans).

    ``feed`` takes tokens as they become known (the prompt at admission, then each sampled token);
    events wait in :attr:`pending` until :meth:`apply_due` is called with the request's computed
    count equal to their ``at``. Malformed structure raises MementoFormatError, or stops tracking,
    as the tracker's format-error policy says.
    """

    def __init__(self, tracker: SequenceTracker) -> None:
        self.tracker = tracker
        self.applied = EvictionCount()  # events applied, each counted once (a preemption replays them)
        self.reset(())

    # -- tokens ------------------------------------------------------------------------------

    def reset(self, token_ids: Iterable[int]) -> None:
        """Forget every eviction (the request's KV is gone: a preemption) and feed ``token_ids`` again.

        The recompute then replays every event at its ``at``, so the kept mementos are rebuilt with
        their blocks visible, exactly as first computed.
        """
        self.tracker.reset()
        self.pending: deque[EvictionEvent] = deque()
        self._starts: list[int] = []  # evicted logical spans [start, stop), sorted and disjoint
        self._stops: list[int] = []
        self._cumulative: list[int] = []  # evicted tokens up to and including span i
        self.feed(token_ids)

    def feed(self, token_ids: Iterable[int]) -> None:
        """Track new tokens (their events wait for :meth:`apply_due`)."""
        ids = list(token_ids)
        if ids:
            self.pending.extend(self.tracker.feed(ids))

    # -- layout ------------------------------------------------------------------------------

    @property
    def shift(self) -> int:
        """Evicted tokens so far: logical count minus physical count for everything computed later."""
        return self._cumulative[-1] if self._cumulative else 0

    def evicted_before(self, position: int) -> int:
        """Evicted tokens at logical indices below ``position``."""
        i = bisect.bisect_right(self._starts, position) - 1
        if i < 0:
            return 0
        before = self._cumulative[i - 1] if i > 0 else 0
        return before + min(position, self._stops[i]) - self._starts[i]

    def physical(self, position: int) -> int:
        """Physical index of the first surviving token at or after logical ``position``."""
        return position - self.evicted_before(position)

    def is_evicted(self, position: int) -> bool:
        i = bisect.bisect_right(self._starts, position) - 1
        return i >= 0 and position < self._stops[i]

    def final_shift(self) -> int:
        """Evicted tokens once every known event has been applied (sizes a request after a recompute)."""
        return self.shift + sum(len(ev.dropped) for ev in self.pending)

    # -- scheduling --------------------------------------------------------------------------

    def next_stop(self, num_computed: int) -> int | None:
        """The position a chunk starting at ``num_computed`` must end at (exclusive), if any."""
        for event in self.pending:
            if event.at > num_computed:
                return event.at
        return None

    def due(self, num_computed: int) -> bool:
        return bool(self.pending) and self.pending[0].at <= num_computed

    def apply_due(self, num_computed: int) -> Applied | None:
        """Apply every pending event with ``at == num_computed``; None when none is due.

        ``num_computed`` past a pending event means a chunk ran over an eviction point: the state is
        no longer the mask's, so this raises rather than go on silently wrong.
        """
        if not self.due(num_computed):
            return None
        compaction: Compaction | None = None
        rewind_to: int | None = None
        while self.pending and self.pending[0].at <= num_computed:
            event = self.pending.popleft()
            if event.at != num_computed or rewind_to is not None:
                raise RuntimeError(
                    f"memento eviction missed: event at token {event.at} applied with {num_computed} computed"
                )
            step, rewind_to = self._apply(event, num_computed)
            compaction = step if compaction is None else compaction.then(step)
        assert compaction is not None
        return Applied(compaction, rewind_to)

    def _apply(self, event: EvictionEvent, num_computed: int) -> tuple[Compaction, int | None]:
        length = num_computed - self.shift  # physical tokens before the event
        span = event.dropped
        start, stop = self.physical(span.start), self.physical(span.stop)
        if event.rewind_to is not None:
            # Restart: drop everything from the block on (the memento included) and rewind to the
            # memento, whose KV the next step recomputes at its logical positions without the block.
            compaction = Compaction(moves=(), num_tokens=start)
        else:
            moves = ((stop, start, length - stop),) if length > stop else ()
            compaction = Compaction(moves=moves, num_tokens=length - (stop - start))
        self._record_span(span)
        self.applied.add((event,))
        return compaction, event.rewind_to

    def _record_span(self, span: range) -> None:
        if not span:
            return
        i = bisect.bisect_left(self._starts, span.start)
        if (i > 0 and self._stops[i - 1] > span.start) or (i < len(self._starts) and self._starts[i] < span.stop):
            raise RuntimeError(f"memento eviction of tokens {span.start}..{span.stop - 1} overlaps an earlier one")
        self._starts.insert(i, span.start)
        self._stops.insert(i, span.stop)
        self._cumulative = []
        total = 0
        for s, e in zip(self._starts, self._stops, strict=True):
            total += e - s
            self._cumulative.append(total)
