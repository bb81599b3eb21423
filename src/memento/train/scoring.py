"""Per-token log-probs of completions under the memento mask: what the RL trainer scores.

A rollout sampled with KV eviction saw, at each token, only what :mod:`memento.masking` leaves
visible, at logical positions that count every token ever generated. Scoring it with a plain causal
mask (TRL's stock path) would compute the probability of each token under a context the sampler
never had, and every importance ratio would be off. Here each sequence is laid out by
:func:`memento.masking.compute_visibility` (tolerant of a format error, as the engine is when it
stops a rollout at the defect), rows are right-padded so no row's positions shift, and the dense
mask and logical position ids go to the model in one forward pass. In memento mode rows are tokens;
restart mode's extra rows are handled by the layout's ``output_rows``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from memento.format import SpecialTokenIds
from memento.masking import MaskConfig, collate_visibility, compute_visibility
from memento.modeling import model_inputs


def _unwrap(model: Any) -> Any:
    """The model under a DDP / accelerate wrapper (for its config and dtype; calls go to the wrapper)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def completion_logprobs(
    model: Any,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    specials: SpecialTokenIds,
    mask: MaskConfig,
    assistant_prefix: Sequence[int] | None = None,
    pad_token_id: int = 0,
    temperature: float = 1.0,
    compute_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (batch, longest completion) of each completion token given everything before it
    under the mask, right-padded with 0; and the per-token entropies if asked for.

    Gradients flow when called outside ``torch.no_grad``. ``temperature`` divides the logits (the
    policy the sampler drew from); the log-softmax is taken in float32.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        raise ValueError("nothing to score")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the first completion token is predicted from it)")
    items = [
        compute_visibility(
            [int(t) for t in p] + [int(t) for t in c], specials, mask, assistant_prefix, stop_tracking_on_error=True
        )
        for p, c in zip(prompts, completions, strict=True)
    ]
    batch = collate_visibility(items, padding_side="right", pad_token_id=pad_token_id)
    inner = _unwrap(model)
    inputs = model_inputs(inner, batch)
    # Only the rows that predict completion tokens need logits: from the earliest such row on.
    first = min(int(rows[len(p) - 1]) for rows, p in zip(batch.output_rows, prompts, strict=True))
    length = batch.input_ids.shape[1]
    logits = model(**inputs, logits_to_keep=length - first).logits
    per_row_logps, per_row_entropy = [], []
    for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        rows = torch.as_tensor(batch.output_rows[b][len(p) - 1 : len(p) - 1 + len(c)] - first, device=logits.device)
        row_logits = logits[b, rows].float() / temperature
        logp = torch.log_softmax(row_logits, dim=-1)
        targets = torch.as_tensor([int(t) for t in c], dtype=torch.long, device=logits.device)
        per_row_logps.append(logp.gather(-1, targets[:, None])[:, 0])
        if compute_entropy:
            per_row_entropy.append(-(logp.exp() * logp).sum(-1))
    logps = pad_sequence(per_row_logps, batch_first=True, padding_value=0.0)
    entropy = pad_sequence(per_row_entropy, batch_first=True, padding_value=0.0) if compute_entropy else None
    return logps, entropy
