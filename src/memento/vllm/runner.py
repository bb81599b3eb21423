"""What every memento model runner adds to vLLM's v1 runner, whatever the device.

The scheduler (:mod:`memento.vllm.scheduler`) decides evictions and frees pages; the runner carries
them out on the KV tensors, through two methods vLLM's v1 runner calls every step:

* ``_update_states``: before vLLM appends this step's new pages, each compaction in the step's
  :class:`~memento.vllm.scheduler.StepPlan` slides the surviving tokens' K/V down over the evicted
  span, token by token inside the request's pages (a mover from :mod:`memento.vllm.kv_layout`
  that knows the device's page layout), and the request's page list is cut to what the scheduler
  kept;
* ``_prepare_inputs``: vLLM computes positions from the logical token counts, which is what RoPE
  needs; the runner then subtracts each request's shift (evicted-token count) to rebuild the slot
  mapping and the attention sequence lengths (on the device and the host copy that backends plan
  with) in physical terms. The attention kernels are unchanged: they never see evicted tokens.

:class:`MementoRunnerMixin` holds that logic once; :mod:`memento.vllm.worker` (CPU) and
:mod:`memento.vllm.gpu_worker` (CUDA) put it in front of vLLM's CPU and GPU runners and supply the
page-layout mover (:meth:`MementoRunnerMixin._make_mover`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from memento.vllm.config import PLAN_ATTR, kv_groups_problem
from memento.vllm.eviction import Compaction
from memento.vllm.kv_layout import Mover


class MementoRunnerMixin:
    """Physical KV compaction and logical positions on top of a vLLM v1 model runner."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._memento_shifts: dict[str, int] = {}
        self._mover: Mover | None = None
        self._block_size: int | None = None
        self.memento_compaction_seconds = 0.0
        self.memento_moved_tokens = 0

    # -- start-up ----------------------------------------------------------------------------

    def get_kv_cache_spec(self) -> dict[str, Any]:
        """Every layer's KV spec, sliding-window layers given full-length pages.

        vLLM would give sliding layers a manager that frees the pages that left the window. Under
        memento eviction keys come back into the window (evicting a block brings older mementos
        back: masking.window_mask), and the runner's page list would still point at the freed
        pages. So every layer keeps every live token, in one KV group, while each layer's attention
        still applies its own window to the compacted cache: the last W keys still there, which is
        the training mask's sliding rule (masking.window_mask). The backend's KV saving on a hybrid
        model is then the memento eviction alone.
        """
        from vllm.v1.core.kv_cache_utils import replace_as
        from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

        specs = super().get_kv_cache_spec()  # type: ignore[misc]
        return {
            name: replace_as(spec, FullAttentionSpec, drop=("extra_retained_tokens",))
            if type(spec) is SlidingWindowSpec
            else spec
            for name, spec in specs.items()
        }

    def initialize_kv_cache(self, kv_cache_config: Any, *args: Any, **kwargs: Any) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)  # type: ignore[misc]
        cache_dtype = self.cache_config.cache_dtype  # type: ignore[attr-defined]
        if cache_dtype != "auto":
            raise ValueError(
                f"memento's vLLM backend cannot start: kv_cache_dtype={cache_dtype!r} is not "
                "supported (token moves need the cache in the model's dtype): use kv_cache_dtype='auto'"
            )
        groups = self.kv_cache_config.kv_cache_groups  # type: ignore[attr-defined]
        problem = kv_groups_problem(groups)
        if problem:
            raise ValueError(f"memento's vLLM backend cannot start: {problem}")
        spec = groups[0].kv_cache_spec
        kernel = self._kernel_block_sizes[0]  # type: ignore[attr-defined]
        if kernel != spec.block_size:
            raise ValueError(
                f"memento's vLLM backend cannot start: the attention kernel splits {spec.block_size}-token pages into "
                f"{kernel}-token blocks; set block_size={kernel}"
            )
        self._block_size = spec.block_size
        self._mover = self._make_mover(spec)

    def _make_mover(self, spec: Any) -> Mover:
        """The token mover for this device's page layout (subclasses)."""
        raise NotImplementedError

    # -- every step --------------------------------------------------------------------------

    def _update_states(self, scheduler_output: Any) -> Any:
        plan = getattr(scheduler_output, PLAN_ATTR, None)
        self._memento_shifts = plan.shifts if plan is not None else {}
        if plan is not None and plan.compactions:
            start = time.perf_counter()
            for request_id, compaction in plan.compactions.items():
                self._compact(request_id, compaction)
            self.memento_compaction_seconds += time.perf_counter() - start
        return super()._update_states(scheduler_output)  # type: ignore[misc]

    def _compact(self, request_id: str, compaction: Compaction) -> None:
        state = self.requests.get(request_id)  # type: ignore[attr-defined]
        if state is None:  # finished meanwhile: nothing to keep
            return
        assert self._mover is not None and self._block_size is not None
        bs = self._block_size
        pages = state.block_ids[0]
        if compaction.moves:
            table = np.asarray(pages, dtype=np.int64)
            src = np.concatenate([np.arange(start, start + n) for start, _, n in compaction.moves])
            dst = np.concatenate([np.arange(to, to + n) for _, to, n in compaction.moves])
            self._mover.move(self._layer_caches(), _slots(table, src, bs), _slots(table, dst, bs))
            self.memento_moved_tokens += len(src)
        keep = -(-compaction.num_tokens // bs)
        if len(pages) > keep:
            del pages[keep:]  # the same pages the scheduler returned to the pool
            row = self.input_batch.req_id_to_index.get(request_id)  # type: ignore[attr-defined]
            if row is not None:
                table = self.input_batch.block_table[0]  # type: ignore[attr-defined]
                table.block_table.np[row, keep : table.num_blocks_per_row[row]] = 0
                table.num_blocks_per_row[row] = keep

    def _layer_caches(self) -> list[torch.Tensor]:
        """Each layer's cache once: layers may share one (KV sharing), and views of one buffer differ
        by offset and strides, so a view is the same cache only if all three agree."""
        unique: dict[tuple, torch.Tensor] = {}
        for cache in self.kv_caches:  # type: ignore[attr-defined]
            unique.setdefault((cache.data_ptr(), tuple(cache.shape), cache.stride()), cache)
        return list(unique.values())

    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> Any:
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)  # type: ignore[misc]
        if self._memento_shifts:
            self._to_physical(num_scheduled_tokens)
        return result

    def _to_physical(self, num_scheduled_tokens: np.ndarray) -> None:
        """Slots and attention lengths from physical indices (positions stay logical, for RoPE).

        ``seq_lens`` (on the device) is what kernels read; ``optimistic_seq_lens_cpu`` is the host
        copy that attention backends plan with (FlashInfer's page counts, every backend's
        ``max_seq_len``): both become physical. vLLM decided which samples to discard before this,
        on logical counts, as it should.
        """
        num_reqs = self.input_batch.num_reqs  # type: ignore[attr-defined]
        ids = self.input_batch.req_ids[:num_reqs]  # type: ignore[attr-defined]
        shifts = np.array([self._memento_shifts.get(rid, 0) for rid in ids], dtype=np.int64)
        if not shifts.any():
            return
        positions, seq_lens = self.positions, self.seq_lens  # type: ignore[attr-defined]
        total = int(num_scheduled_tokens[:num_reqs].sum())
        token_shift = torch.from_numpy(np.repeat(shifts, num_scheduled_tokens[:num_reqs]))
        physical = positions[:total] - token_shift.to(device=positions.device, dtype=positions.dtype)
        seq_lens[:num_reqs] -= torch.from_numpy(shifts).to(device=seq_lens.device, dtype=seq_lens.dtype)
        host = getattr(self, "optimistic_seq_lens_cpu", None)
        if host is not None and host.data_ptr() != seq_lens.data_ptr():
            host[:num_reqs] -= torch.from_numpy(shifts).to(host.dtype)
        query_start = self.query_start_loc.gpu[: num_reqs + 1]  # type: ignore[attr-defined]
        self.input_batch.block_table.compute_slot_mapping(num_reqs, query_start, physical)  # type: ignore[attr-defined]


def _slots(pages: np.ndarray, indices: np.ndarray, block_size: int) -> list[int]:
    """Cache slots of a request's physical token indices, through its page list."""
    return (pages[indices // block_size] * block_size + indices % block_size).tolist()
