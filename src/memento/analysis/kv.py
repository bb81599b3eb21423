"""Keys and values as a probe sees them: the KV cache entries of chosen tokens, one layer at a time.

A probe of the KV channel must read exactly what later tokens read: the cache entries (keys after
RoPE, values) that the engine keeps once a block is evicted. Those are computed by one forward pass
under the mask from masking.py (the same teacher-forced layout the reference generator uses), with
the cache switched on; a token's entries are read from the *last* row that carries it, because in
restart mode a memento is fed twice and later tokens attend to its second, block-free copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from memento.format import SpecialTokenIds
from memento.masking import MaskConfig, Visibility, collate_visibility, compute_visibility
from memento.modeling import attention_inputs, check_attention_implementation, layer_windows, to_device


def kv_rows(vis: Visibility) -> np.ndarray:
    """For each original token, the row whose keys and values later tokens attend to (its last copy)."""
    n_tokens = int(vis.source.max()) + 1
    rows = np.full(n_tokens, -1, dtype=np.int64)
    # the largest row per token; a plain ``rows[vis.source] = ...`` with repeated indices leaves the
    # winner unspecified (numpy guarantees no order for advanced assignment)
    np.maximum.at(rows, vis.source, np.arange(len(vis.source)))
    return rows


def _layer_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of one layer, each (batch, kv_heads, rows, head_dim), from a transformers cache."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache[layer][0], cache[layer][1]  # legacy tuple-of-tuples cache


def _needed(sequence: Sequence[int], positions: Sequence[int], specials: SpecialTokenIds) -> list[int]:
    """The prefix of ``sequence`` that decides the KV at ``positions``: up to the first ``<|summary_end|>``
    at or after the last position (where restart mode lays down a memento's recomputed copy). The
    model is causal, so nothing later changes those entries; cutting saves most of a long trace."""
    ids = [int(t) for t in sequence]
    last = max(positions)
    for end in range(last, len(ids)):
        if ids[end] == specials.summary_end:
            return ids[: end + 1]
    return ids


@torch.no_grad()
def kv_features(
    model: Any,
    sequences: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    specials: SpecialTokenIds,
    config: MaskConfig,
    *,
    layers: Sequence[int] | None = None,
    assistant_prefix: Sequence[int] | None = None,
    pad_token_id: int = 0,
    batch_size: int = 64,
) -> dict[int, np.ndarray]:
    """Per layer, an array (N, P * 2 * kv_heads * head_dim): the keys then values of the tokens at
    ``positions[i]`` (P of them, the same count for every sequence) of ``sequences[i]``, as cached
    by a teacher-forced pass under ``config``. ``layers`` defaults to all of them."""
    if len(sequences) != len(positions):
        raise ValueError(f"{len(sequences)} sequences but {len(positions)} position lists")
    widths = {len(p) for p in positions}
    if len(widths) > 1:
        raise ValueError(f"every sequence needs the same number of positions, got {sorted(widths)}")
    impl = check_attention_implementation(model)
    windows = layer_windows(model)
    n_layers = int(model.config.num_hidden_layers)
    chosen = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    bad = [x for x in chosen if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {n_layers}")
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    out: dict[int, list[np.ndarray]] = {layer: [] for layer in chosen}
    for start in range(0, len(sequences), batch_size):
        chunk = range(start, min(start + batch_size, len(sequences)))
        items = [
            compute_visibility(_needed(sequences[i], positions[i], specials), specials, config, assistant_prefix)
            for i in chunk
        ]
        batch = collate_visibility(items, padding_side="right", pad_token_id=pad_token_id)
        inputs = to_device(attention_inputs(batch, impl, dtype, windows), device)
        outputs = model(**inputs, use_cache=True)
        cache = outputs["cache"] if "cache" in outputs else outputs["past_key_values"]  # transformers >= 5.2x: cache
        picks = []
        for vis, i in zip(items, chunk, strict=True):
            rows = kv_rows(vis)[np.asarray(positions[i], dtype=np.int64)]
            if (rows < 0).any():
                raise ValueError(f"sequence {i}: a position has no row (past the end?)")
            picks.append(torch.as_tensor(rows))
        index = torch.stack(picks).to(device)  # (b, P)
        for layer in chosen:
            keys, values = _layer_kv(cache, layer)
            parts = []
            for tensor in (keys, values):
                b, h, _, d = tensor.shape
                gathered = tensor.gather(2, index[:, None, :, None].expand(b, h, index.shape[1], d))
                parts.append(gathered.permute(0, 2, 1, 3).reshape(b, index.shape[1], h * d))
            features = torch.cat(parts, dim=-1).reshape(len(chunk), -1)  # per token: keys then values
            out[layer].append(features.float().cpu().numpy())
    return {layer: np.concatenate(arrays) for layer, arrays in out.items()}
