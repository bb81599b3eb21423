"""The restart ablation without the format confound: teacher-forced loss per block, in-place vs restart.

In *in-place* eviction (memento mode) a memento's KV was computed while its block was visible; in
*restart* mode (masking.py's ``restart``) each memento is recomputed without its block, so only its
text survives. Free-running generation compares the two badly: a restart run that breaks the
format scores 0 whatever the KV carried. Here the same reference trace is teacher-forced under both
settings (the same tokens; only the mementos' KV differs) and the loss of every later token is read
off, grouped by how many mementos have closed before it. Tokens before the first memento closes see
exactly the same context in both modes, so their losses agree (a built-in check); a higher loss
after memento k under restart is information the KV carried and the text did not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from memento.format import SpecialTokenIds
from memento.masking import MaskConfig
from memento.reference import teacher_forced_logits

IN_PLACE = MaskConfig.chat(keep_last_n=0)
RESTART = MaskConfig.chat(keep_last_n=0, restart=True)


def token_losses(
    model: Any,
    sequences: Sequence[Sequence[int]],
    specials: SpecialTokenIds,
    config: MaskConfig,
    *,
    assistant_prefix: Sequence[int] | None = None,
    pad_token_id: int = 0,
) -> list[np.ndarray]:
    """Per sequence, the NLL of tokens 1..T-1 given everything before them under ``config`` (float64)."""
    logits = teacher_forced_logits(
        model, sequences, specials, config, assistant_prefix=assistant_prefix, pad_token_id=pad_token_id
    )
    out = []
    for seq, seq_logits in zip(sequences, logits, strict=True):
        targets = torch.as_tensor([int(t) for t in seq[1:]], dtype=torch.long)
        logp = torch.log_softmax(seq_logits[:-1].double(), dim=-1)
        out.append(-logp.gather(-1, targets[:, None])[:, 0].numpy())
    return out


def mementos_closed_before(sequence: Sequence[int], specials: SpecialTokenIds, start: int) -> np.ndarray:
    """For tokens 1..T-1: how many ``<|summary_end|>`` at or after ``start`` come before each token."""
    ids = np.asarray(sequence, dtype=np.int64)
    closes = (ids == specials.summary_end) & (np.arange(len(ids)) >= start)
    before = np.concatenate([[0], np.cumsum(closes)[:-1]])  # closes strictly before each position
    return before[1:]


@dataclass
class BlockLossComparison:
    """Mean teacher-forced NLL per number of closed mementos, in-place vs restart."""

    in_place: list[float] = field(default_factory=list)
    restart: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    before_first_max_gap: float = 0.0  # |in-place - restart| on tokens before any memento closed

    def rows(self) -> list[dict[str, float]]:
        return [
            {"mementos_closed": k, "tokens": n, "in_place": a, "restart": b, "restart_minus_in_place": b - a}
            for k, (a, b, n) in enumerate(zip(self.in_place, self.restart, self.tokens, strict=True))
        ]


def compare_restart(
    model: Any,
    sequences: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    specials: SpecialTokenIds,
    *,
    assistant_prefix: Sequence[int] | None = None,
    pad_token_id: int = 0,
) -> BlockLossComparison:
    """Teacher-force ``sequences`` (prompt + reference completion) in both modes; group the
    completion tokens' losses by the number of mementos closed before them."""
    kwargs = {"assistant_prefix": assistant_prefix, "pad_token_id": pad_token_id}
    in_place = token_losses(model, sequences, specials, IN_PLACE, **kwargs)
    restart = token_losses(model, sequences, specials, RESTART, **kwargs)
    sums: dict[int, list[float]] = {}
    gap = 0.0
    for seq, start, a, b in zip(sequences, prompt_lengths, in_place, restart, strict=True):
        closed = mementos_closed_before(seq, specials, start)
        scored = np.arange(1, len(seq)) >= start  # completion tokens only
        first = scored & (closed == 0)
        if first.any():
            gap = max(gap, float(np.abs(a[first] - b[first]).max()))
        for k in np.unique(closed[scored]):
            pick = scored & (closed == k)
            entry = sums.setdefault(int(k), [0.0, 0.0, 0])
            entry[0] += float(a[pick].sum())
            entry[1] += float(b[pick].sum())
            entry[2] += int(pick.sum())
    result = BlockLossComparison(before_first_max_gap=gap)
    for k in sorted(sums):
        total_a, total_b, n = sums[k]
        result.in_place.append(total_a / n)
        result.restart.append(total_b / n)
        result.tokens.append(n)
    return result
