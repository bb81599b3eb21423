"""The reference generator: obviously correct, deliberately slow.

At every step it re-runs a full forward pass over each whole sequence with the dense mask from
:mod:`memento.masking` and reads the next-token logits at the last token's output row. No KV
cache, no eviction bookkeeping: what a token may see is exactly what the mask says. It costs
O(T^2) per step, and it is the oracle the fast engine is tested against (same logits, same
greedy tokens), and the way this project measures accuracy before the engine exists.

Restart mode works too: its layout feeds each evicted memento a second time, recomputed without
its block, and the last token's output row is read as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from memento.format import MementoFormatError, SpecialTokenIds
from memento.masking import MEMENTO, MaskConfig, Visibility, collate_visibility, compute_visibility
from memento.modeling import model_inputs


@dataclass
class Generation:
    """One finished sequence: the generated ids, why it stopped, and its live KV per step."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "eos" | "length" | "format_error"
    error: str | None = None
    live_kv: list[int] = field(default_factory=list)
    """Keys the newest token could attend to at each step (the KV an engine keeps, in tokens)."""


@torch.no_grad()
def forward_logits(
    model: Any,
    items: Sequence[Visibility],
    *,
    pad_token_id: int = 0,
) -> list[torch.Tensor]:
    """Logits (T, vocab) of each sequence's original tokens, from one masked forward pass."""
    batch = collate_visibility(items, padding_side="right", pad_token_id=pad_token_id)
    logits = model(**model_inputs(model, batch)).logits.float().cpu()
    return [logits[b, torch.as_tensor(rows)] for b, rows in enumerate(batch.output_rows)]


def teacher_forced_logits(
    model: Any,
    sequences: Sequence[Sequence[int]],
    specials: SpecialTokenIds,
    config: MaskConfig = MEMENTO,
    *,
    assistant_prefix: Sequence[int] | None = None,
    pad_token_id: int = 0,
) -> list[torch.Tensor]:
    """Logits at every position of given sequences under the mask: the engine's consistency oracle."""
    items = [compute_visibility(seq, specials, config, assistant_prefix) for seq in sequences]
    return forward_logits(model, items, pad_token_id=pad_token_id)


@torch.no_grad()
def reference_generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    specials: SpecialTokenIds,
    config: MaskConfig = MEMENTO,
    *,
    max_new_tokens: int = 512,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    assistant_prefix: Sequence[int] | None = None,
    batch_size: int = 32,
    stop_on_format_error: bool | None = None,
) -> list[Generation]:
    """Greedy decoding, a full masked forward pass per step (ties go to the lowest id).

    A sequence whose generated structure becomes malformed (e.g. a memento with no block) stops
    with ``finish_reason="format_error"`` and the defect in ``error``; the others go on. With
    ``stop_on_format_error=False`` (the default in vanilla mode, where structure plays no part) it
    goes on instead, and nothing from the defect on is tracked.
    """
    stop = config.stops_on_format_error(stop_on_format_error)
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    eos = {int(t) for t in eos_token_ids}
    results = [Generation(prompt_ids=[int(t) for t in p]) for p in prompts]
    for start in range(0, len(results), batch_size):
        _generate_chunk(
            model,
            results[start : start + batch_size],
            specials,
            config,
            max_new_tokens,
            eos,
            pad_token_id,
            assistant_prefix,
            stop,
        )
    return results


def _generate_chunk(
    model: Any,
    chunk: list[Generation],
    specials: SpecialTokenIds,
    config: MaskConfig,
    max_new_tokens: int,
    eos: set[int],
    pad_token_id: int,
    assistant_prefix: Sequence[int] | None,
    stop_on_format_error: bool = True,
) -> None:
    active = list(chunk)
    while active:
        items: list[Visibility] = []
        still: list[Generation] = []
        for gen in active:
            try:
                vis = compute_visibility(
                    gen.prompt_ids + gen.token_ids,
                    specials,
                    config,
                    assistant_prefix,
                    stop_tracking_on_error=not stop_on_format_error,
                )
            except MementoFormatError as err:
                gen.finish_reason, gen.error = "format_error", str(err)
                continue
            items.append(vis)
            still.append(gen)
        if not still:
            return
        last_logits = [logits[-1] for logits in forward_logits(model, items, pad_token_id=pad_token_id)]
        active = []
        for gen, vis, logits in zip(still, items, last_logits, strict=True):
            token = int(torch.argmax(logits))
            gen.live_kv.append(int(vis.live_kv()[vis.output_rows[-1]]))  # keys the newest token sees
            gen.token_ids.append(token)
            if token in eos:
                gen.finish_reason = "eos"
            elif len(gen.token_ids) >= max_new_tokens:
                gen.finish_reason = "length"
            else:
                active.append(gen)
