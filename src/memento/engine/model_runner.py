"""The model runner: one batched forward pass of an HF causal LM over the KV pool.

The HF model does the maths; the runner decides what it sees. It hands the model a stand-in for
transformers' cache (:class:`PoolCache`): when an attention layer offers its new keys and values
(RoPE already applied at the rows' logical positions), they are written into the rows' pool slots,
and the layer gets back every key its sequence still has, gathered by slot table. The 4D boolean
mask over those keys comes from :func:`memento.masking.visible`, the same rule training uses, and
sliding-window layers get it through :func:`memento.masking.window_mask` (one mask per layer type,
:func:`memento.modeling.layer_masks`, as training builds them). Every layer keeps every live token's
KV: a token leaves the pool when the memento rule evicts it, or, when every layer slides, once it
has left every window for good (:attr:`ModelRunner.freeing_window`).

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
from memento.masking import NEVER, visible
from memento.modeling import layer_masks, layer_windows

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama", "mistral", "phi3", "olmo3")
"""Architectures whose attention layers write their KV through ``cache.update`` (tested here; the
paper's families are Qwen3, Phi-4 = ``phi3`` and Olmo 3 = ``olmo3``)."""


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
    tail_logits: torch.Tensor | None = None
    """(B, keep, vocab) at the last ``keep`` query columns (rows are left-padded, so a sequence's
    ``len(rows)`` rows are its last columns), when :meth:`ModelRunner.run` was asked for them."""


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
        self.windows = layer_windows(model)
        windows = set(self.windows.values())
        self.freeing_window: int | None = None if None in windows else max(windows)
        """When every layer slides: the widest window, past which a token can be freed for good
        (:meth:`memento.masking.RowLayout.window_floor`); None when a full-attention layer keeps every
        visible key (Qwen3, Phi-4 without a window, Olmo 3's full layers)."""
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @torch.inference_mode()
    def run(self, work: Seq[tuple[Sequence, range, list[int]]], keep: int = 1) -> StepResult:
        """Forward ``rows`` of each sequence (their KV going to ``slots``) and return last-row logits;
        with ``keep`` > 1 also the logits of the last ``keep`` columns (prompt logprobs)."""
        q_len = max(len(rows) for _, rows, _ in work)
        k_len = max(seq.num_live + len(rows) for seq, rows, _ in work)
        batch = len(work)
        # NumPy arrays filled a sequence at a time (slices, no per-key Python): this runs every step.
        input_ids = np.zeros((batch, q_len), dtype=np.int64)
        position_ids = np.zeros((batch, q_len), dtype=np.int64)
        query_rows = np.full((batch, q_len), -1, dtype=np.int64)  # -1: left padding, discarded
        write_slots = np.zeros((batch, q_len), dtype=np.int64)  # padding rows write to scratch slot 0
        key_rows = np.full((batch, k_len), NEVER, dtype=np.int64)  # padding keys: never at or before a query
        key_invisible = np.full((batch, k_len), NEVER, dtype=np.int64)
        read_slots = np.zeros((batch, k_len), dtype=np.int64)
        for b, (seq, rows, slots) in enumerate(work):
            first, q, live = q_len - len(rows), len(rows), seq.num_live
            row_token, row_position, row_invisible_from = seq.layout.columns()
            input_ids[b, first:] = row_token[rows.start : rows.stop]
            position_ids[b, first:] = row_position[rows.start : rows.stop]
            query_rows[b, first:] = rows
            write_slots[b, first:] = slots
            key_rows[b, :live] = seq.live_rows
            key_rows[b, live : live + q] = rows
            read_slots[b, :live] = seq.live_slots
            read_slots[b, live : live + q] = slots
            key_invisible[b, live : live + q] = row_invisible_from[rows.start : rows.stop]
            # Only rows an eviction touched have a finite invisible_from: the layout's doomed runs
            # (consecutive rows, so consecutive among the live keys; those computed are all live).
            for run in seq.layout.doomed:
                stop = min(run.stop, seq.computed)
                if run.start < stop:
                    at = int(np.searchsorted(seq.live_rows, run.start))
                    key_invisible[b, at : at + stop - run.start] = row_invisible_from[run.start]
        input_ids_t = torch.from_numpy(input_ids)
        position_ids_t = torch.from_numpy(position_ids)
        query_rows_t = torch.from_numpy(query_rows)
        key_rows_t = torch.from_numpy(key_rows)
        key_invisible_t = torch.from_numpy(key_invisible)
        mask = visible(query_rows_t[:, :, None], key_rows_t[:, None, :], key_invisible_t[:, None, :])
        mask |= (query_rows_t < 0)[:, :, None]  # padding query rows see everything: finite, then discarded
        live_keys = mask[:, -1, :].sum(dim=-1).tolist()
        masks = layer_masks(mask[:, None], self.windows, self.attn_implementation, self.dtype)
        if isinstance(masks, dict):
            attention_mask = {kind: m.to(self.device) for kind, m in masks.items()}
        else:
            attention_mask = masks.to(self.device)
        self.cache.bind(torch.from_numpy(write_slots).to(self.device), torch.from_numpy(read_slots).to(self.device))
        out = self.model(
            input_ids=input_ids_t.to(self.device),
            position_ids=position_ids_t.to(self.device),
            attention_mask=attention_mask,
            use_cache=True,
            logits_to_keep=min(max(keep, 1), q_len),
            **{self.cache_kwarg: self.cache},
        )
        tail = out.logits.float() if keep > 1 else None
        return StepResult(logits=out.logits[:, -1, :].float(), live_keys=[int(n) for n in live_keys], tail_logits=tail)
