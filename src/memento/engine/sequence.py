"""One sequence in the engine: its tokens, which of its rows hold KV slots, and its accounting.

A *token* has a logical index in the full sequence (prompt + output, evicted tokens included): that
index is its RoPE position. A *row* is one forward-pass input. Which rows there are and when each
becomes invisible is :class:`memento.masking.RowLayout`'s decision (restart mode feeds a memento
twice); this module only maps computed rows to KV slots and hands back the slots of the rows the
layout declares dead (:meth:`memento.masking.RowLayout.take_dead`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import torch

from memento.arrays import GrowingTable
from memento.engine.sampling import SamplingParams
from memento.masking import NEVER, BlockCap, RowLayout


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
        layout: RowLayout,
        block_cap: BlockCap,
        forced_tokens: list[int] | None = None,
    ) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.sample_index = sample_index
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.params = params
        self.forced_tokens = forced_tokens
        self.layout = layout
        self.block_cap = block_cap  # fed every token, the prompt's too (a prompt may open a block)
        self.generator: torch.Generator | None = None  # this sample's own RNG (set by the engine)
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.stop_reason: int | str | None = None
        self.output_ids: list[int] = []
        self.logprobs: list[float | None] = []
        self.top_logprobs: list[dict[int, float] | None] = []
        self.cap_forced: list[int] = []  # indices into output_ids of tokens the block cap forced
        self.kept_logits: list = []
        self.prompt_logprobs: list[float | None] | None = None
        self.prompt_top_logprobs: list[dict[int, float] | None] | None = None
        if params.prompt_logprobs is not None and sample_index == 0:  # the samples share one prompt
            self.prompt_logprobs = [None] * len(self.prompt_ids)
            self.prompt_top_logprobs = [None] * len(self.prompt_ids)
        self.stats = KVStats()
        self.block_cap.feed(self.prompt_ids)
        self.reset_rows()

    # -- rows --------------------------------------------------------------------------------

    def reset_rows(self) -> None:
        """Forget all KV (the slots must already be freed) and lay the rows out again from the tokens.

        Used at creation and after a preemption: every row becomes pending again, so recomputing
        rebuilds exactly the state that was evicted (mementos are recomputed with their blocks
        visible, then the blocks go away again). Evictions are still counted once.
        """
        self.layout.reset()
        self.computed = 0  # rows [0, computed) have had their KV computed
        # Computed rows that still hold a slot (ascending) and their slots: the runner reads both
        # columns whole at every step of every sequence.
        self._live = GrowingTable(2)
        self._feed(self.all_token_ids())

    def all_token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        return self.layout.num_rows - self.computed

    def _feed(self, token_ids: list[int]) -> None:
        """Give tokens their rows (raises MementoFormatError when the structure breaks and the
        layout's policy is to stop); every eviction they cause is counted once."""
        events = self.layout.feed(token_ids)
        count = self.layout.tracker.count
        count.add(events)
        self.stats.evictions, self.stats.evicted_tokens = count.evictions, count.evicted_tokens

    def append_output(self, token: int) -> None:
        """Record a generated token (the caller decides whether to feed it on)."""
        self.output_ids.append(int(token))
        self.block_cap.feed((int(token),))

    def feed_last_output(self) -> None:
        """Give the newest output token its row(s); raises MementoFormatError on malformed structure."""
        self._feed(self.output_ids[-1:])

    # -- prompt logprobs ---------------------------------------------------------------------

    def scores_prompt_rows(self, rows: range) -> bool:
        """Whether ``rows`` hold the output of a prompt token that predicts the next prompt token."""
        if self.prompt_logprobs is None or len(self.prompt_ids) < 2:
            return False
        return rows.start <= int(self.layout.row_of_token[len(self.prompt_ids) - 2])

    def score_prompt(self, rows: range, logits: torch.Tensor) -> None:
        """Record the prompt logprobs that ``rows``' logits (len(rows) x vocab) give.

        Token ``t + 1`` is predicted at ``row_of_token[t]`` (in restart mode, rows of recomputed
        mementos predict nothing of the prompt). A recomputation after preemption writes the same
        values again.
        """
        assert self.prompt_logprobs is not None and self.prompt_top_logprobs is not None
        predictors = np.asarray(self.layout.row_of_token[: len(self.prompt_ids) - 1])
        tokens = np.nonzero((predictors >= rows.start) & (predictors < rows.stop))[0]
        if tokens.size == 0:
            return
        logprobs = torch.log_softmax(logits[torch.from_numpy(predictors[tokens] - rows.start)].float(), dim=-1)
        targets = torch.as_tensor([self.prompt_ids[t + 1] for t in tokens.tolist()])
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        k = self.params.prompt_logprobs or 0
        top = torch.topk(logprobs, k) if k > 0 else None
        for i, t in enumerate(tokens.tolist()):
            self.prompt_logprobs[t + 1] = chosen[i]
            alternatives = dict(zip(top.indices[i].tolist(), top.values[i].tolist(), strict=True)) if top else {}
            alternatives[self.prompt_ids[t + 1]] = chosen[i]
            self.prompt_top_logprobs[t + 1] = alternatives

    # -- slots -------------------------------------------------------------------------------

    def pending_rows(self, count: int) -> range:
        return range(self.computed, self.computed + count)

    def mark_computed(self, rows: range, slots: list[int]) -> None:
        """The rows' KV now lives in ``slots``."""
        assert rows.start == self.computed and len(rows) == len(slots)
        if len(rows) == 1:  # a decode step
            self._live.append_row(rows.start, slots[0])
        else:
            self._live.append(np.arange(rows.start, rows.stop), np.asarray(slots, dtype=np.int64))
        self.computed = rows.stop

    @property
    def live_rows(self) -> np.ndarray:
        """The computed rows that still hold a KV slot, ascending (a view: copy before keeping)."""
        return self._live.column(0)

    @property
    def live_slots(self) -> np.ndarray:
        """The slot of each of :attr:`live_rows` (a view)."""
        return self._live.column(1)

    @property
    def num_live(self) -> int:
        return self._live.size

    def release_dead(self) -> list[int]:
        """Drop (and return the slots of) live rows no pending or future row can see."""
        dead = self.layout.take_dead(self.computed)
        if not dead:
            return []
        gone = np.zeros(self.num_live, dtype=bool)
        for run in dead:  # a run is consecutive rows, so consecutive among the live ones
            lo, hi = np.searchsorted(self.live_rows, (run.start, run.stop))
            gone[lo:hi] = True
        slots = self.live_slots[gone].tolist()
        self._live.keep(~gone)
        return slots

    def release_out_of_window(self, window: int) -> list[int]:
        """Drop (and return the slots of) live rows that have left a sliding window of ``window`` keys
        for good (:meth:`memento.masking.RowLayout.window_floor`): for a model whose every layer slides.

        Rows an eviction already doomed stay until :meth:`release_dead` takes their whole run (the
        runner reads a doomed run as consecutive live keys)."""
        count = int(np.searchsorted(self.live_rows, self.layout.window_floor(self.live_rows, window)))
        if count == 0:
            return []
        gone = np.zeros(self.num_live, dtype=bool)
        gone[:count] = self.layout.columns()[2][self.live_rows[:count]] == NEVER
        slots = self.live_slots[gone].tolist()
        self._live.keep(~gone)
        return slots

    def release_all(self) -> list[int]:
        """Every slot this sequence holds (for preemption or when it finishes)."""
        slots = self.live_slots.tolist()
        self._live.size = 0
        return slots

    # -- state -------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str, error: str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.error = error
