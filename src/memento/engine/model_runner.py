"""The model runner: one batched forward pass of an HF causal LM over the KV pool.

The HF model does the maths; the runner decides what it sees. It hands the model a stand-in for
transformers' cache (:class:`PoolCache`): when an attention layer offers its new keys and values
(RoPE already applied at the rows' logical positions), they are written into the rows' pool slots,
and the layer gets back every key its sequence still has, gathered by slot table. The 4D boolean
mask over those keys comes from :func:`memento.masking.visible`, the same rule training uses.

Batches are left-padded, so the last query row of every sequence is the last column and
``logits_to_keep=1`` computes the LM head only where a token is sampled.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from memento.engine.kv_pool import KVPool
from memento.engine.sequence import Sequence
from memento.masking import NEVER, additive_mask, visible

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama", "mistral")
"""Architectures whose attention layers write their KV through ``cache.update`` (tested here)."""


def _long_tensor(rows: list[list[int]]) -> torch.Tensor:
    """An int64 tensor from equal-length lists (through NumPy: ~8x faster than torch.tensor on lists)."""
    return torch.from_numpy(np.array(rows, dtype=np.int64))


class PoolCache:
    """Duck-typed transformers cache for one forward: write the new KV to slots, return the gathered KV."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.write_slots: torch.Tensor | None = None  # (B*Q,) slot of every query row (0 = scratch)
        self.read_slots: torch.Tensor | None = None  # (B, K) slot of every key (0 = scratch)

    def bind(self, write_slots: torch.Tensor, read_slots: torch.Tensor) -> None:
        self.write_slots = write_slots.reshape(-1)
        self.read_slots = read_slots

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """(B, kv_heads, Q, D) new keys/values in; (B, kv_heads, K, D) keys/values to attend to out."""
        assert self.write_slots is not None and self.read_slots is not None, "PoolCache used before bind()"
        keys, values = self.pool.keys[layer_idx], self.pool.values[layer_idx]
        b, h, q, d = key_states.shape
        keys.index_copy_(0, self.write_slots, key_states.transpose(1, 2).reshape(b * q, h, d).to(keys.dtype))
        values.index_copy_(0, self.write_slots, value_states.transpose(1, 2).reshape(b * q, h, d).to(values.dtype))
        flat = self.read_slots.reshape(-1)
        k = self.read_slots.shape[1]
        gathered_keys = keys.index_select(0, flat).view(b, k, h, d).transpose(1, 2)
        gathered_values = values.index_select(0, flat).view(b, k, h, d).transpose(1, 2)
        return gathered_keys, gathered_values

    def get_seq_length(self, layer_idx: int = 0) -> int:  # only asked for when position_ids are missing
        raise NotImplementedError("the engine always passes position_ids")


@dataclass
class StepResult:
    """What a forward pass produced for each scheduled sequence."""

    logits: torch.Tensor  # (B, vocab) at each sequence's last scheduled row, float32
    live_keys: list[int]  # keys that last row attended to


class ModelRunner:
    """Runs scheduled chunks of rows through the model with the pool as its KV cache."""

    def __init__(self, model: Any, pool: KVPool, attn_implementation: str) -> None:
        model_type = getattr(model.config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported architecture {model_type!r} ({type(model).__name__}): the engine supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.model = model
        self.pool = pool
        self.cache = PoolCache(pool)
        self.attn_implementation = attn_implementation
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @torch.inference_mode()
    def run(self, work: Seq[tuple[Sequence, range, list[int]]]) -> StepResult:
        """Forward ``rows`` of each sequence (their KV going to ``slots``) and return last-row logits."""
        q_len = max(len(rows) for _, rows, _ in work)
        k_len = max(seq.num_live + len(rows) for seq, rows, _ in work)
        # Plain lists first, one tensor per array: this runs every step, for every sequence.
        input_ids, position_ids, query_rows, write_slots = [], [], [], []
        key_rows, key_invisible, read_slots = [], [], []
        for seq, rows, slots in work:
            pad = [0] * (q_len - len(rows))  # left padding: the last row is always the last column
            input_ids.append(pad + [seq.row_token[r] for r in rows])
            position_ids.append(pad + [seq.row_position[r] for r in rows])
            query_rows.append([-1] * len(pad) + list(rows))
            write_slots.append(pad + list(slots))
            keys = seq.live_rows + list(rows)
            tail = k_len - len(keys)
            key_rows.append(keys + [NEVER] * tail)  # padding keys: never at or before a query
            key_invisible.append([seq.row_invisible_from[r] for r in keys] + [NEVER] * tail)
            read_slots.append([seq.row_slot[r] for r in seq.live_rows] + list(slots) + [0] * tail)
        input_ids_t = _long_tensor(input_ids)
        position_ids_t = _long_tensor(position_ids)
        query_rows_t = _long_tensor(query_rows)
        key_rows_t = _long_tensor(key_rows)
        key_invisible_t = _long_tensor(key_invisible)
        mask = visible(query_rows_t[:, :, None], key_rows_t[:, None, :], key_invisible_t[:, None, :])
        mask |= (query_rows_t < 0)[:, :, None]  # padding query rows see everything: finite, then discarded
        live_keys = mask[:, -1, :].sum(dim=-1).tolist()
        mask = mask[:, None].to(self.device)
        attention_mask = additive_mask(mask, self.dtype) if self.attn_implementation == "eager" else mask
        self.cache.bind(_long_tensor(write_slots).to(self.device), _long_tensor(read_slots).to(self.device))
        out = self.model(
            input_ids=input_ids_t.to(self.device),
            position_ids=position_ids_t.to(self.device),
            attention_mask=attention_mask,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kwarg: self.cache},
        )
        return StepResult(logits=out.logits[:, -1, :].float(), live_keys=[int(n) for n in live_keys])
