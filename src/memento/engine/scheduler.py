"""Continuous batching under a KV budget: who runs this step, how many rows, and who is preempted.

Each step is either a *prefill* step (sequences with more than one pending row: new prompts,
chunks of a long prompt, re-prefills after preemption, restart-mode recomputes) or a *decode* step
(every running sequence feeds its one new token). Prefill goes first, as in nano-vllm.

A memento sequence's future size is unknown (its KV shrinks at every ``<|summary_end|>``), so the
scheduler does not reserve for it. When a step cannot get the slots it needs, the newest running
sequence is preempted (its slots freed; it waits to be re-prefilled from its tokens, which rebuilds
its evicted state exactly). A sequence that alone needs more slots than the pool has is finished
with ``finish_reason="kv_budget"``: never a deadlock, never a crash.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from memento.engine.kv_pool import KVPool
from memento.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledStep:
    """The sequences to run and how many pending rows of each; ``kind`` is "prefill" or "decode"."""

    kind: str
    work: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    aborted: list[Sequence] = field(default_factory=list)


class Scheduler:
    """Waiting queue + running list over one :class:`KVPool`."""

    def __init__(self, pool: KVPool, max_num_seqs: int, max_num_batched_tokens: int, watermark: int) -> None:
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark = watermark
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, sequences: list[Sequence]) -> int:
        """Take sequences out wherever they are (waiting or running) and free their slots; returns slots freed."""
        doomed = {id(s) for s in sequences}
        freed = 0
        for seq in sequences:
            slots = seq.release_all()
            freed += len(slots)
            self.pool.free(slots)
        self.waiting = deque(s for s in self.waiting if id(s) not in doomed)
        self.running = [s for s in self.running if id(s) not in doomed]
        return freed

    def remove_finished(self) -> list[Sequence]:
        """Drop finished sequences from the running list, freeing their slots."""
        done = [s for s in self.running if s.finished]
        for seq in done:
            self.pool.free(seq.release_all())
        self.running = [s for s in self.running if not s.finished]
        return done

    def _preempt(self, seq: Sequence, step: ScheduledStep) -> None:
        self.pool.free(seq.release_all())
        seq.reset_rows()
        seq.stats.preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        step.preempted.append(seq)

    def _abort(self, seq: Sequence, step: ScheduledStep) -> None:
        self.pool.free(seq.release_all())
        seq.finish(
            "kv_budget",
            f"the sequence needs more than the whole KV pool ({self.pool.capacity} token slots): "
            f"{seq.num_live} live tokens and {seq.num_pending} pending rows",
        )
        self.running.remove(seq)
        step.aborted.append(seq)

    def schedule(self) -> ScheduledStep:
        """Pick this step's work (an empty ``work`` with nothing left means the engine is idle)."""
        step = self._schedule_prefill()
        return step if step.work else self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledStep:
        """Chunks of multi-row work for running sequences, then new admissions, within the budgets.

        No preemption here: if nothing fits, the decode step below moves every running sequence by
        one row (preempting if it must), so progress never depends on a prefill fitting.
        """
        step = ScheduledStep("prefill")
        budget = self.max_num_batched_tokens
        free = self.pool.num_free
        for seq in self.running:
            if seq.num_pending <= 1 or budget <= 0:
                continue
            chunk = min(seq.num_pending, budget, free)
            if chunk < 1:
                break
            step.work.append((seq, chunk))
            budget -= chunk
            free -= chunk
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.running:  # leave room for the running sequences to grow
                chunk = min(seq.num_pending, budget)
                if free - self.watermark < chunk:
                    break
            else:  # alone: take what there is, so a long (re-)prefill can always start
                chunk = min(seq.num_pending, budget, free)
                if chunk < 1:
                    break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            step.work.append((seq, chunk))
            budget -= chunk
            free -= chunk
        return step

    def _schedule_decode(self) -> ScheduledStep:
        """One row for every running sequence; preempt the newest while the pool is short."""
        step = ScheduledStep("decode")
        while len(self.running) > 1 and self.pool.num_free < len(self.running):
            self._preempt(self.running[-1], step)
        if self.running and self.pool.num_free < 1:  # the one sequence left fills the pool by itself
            self._abort(self.running[0], step)
        step.work = [(seq, 1) for seq in self.running]
        return step
