"""The worker half of the vLLM backend: ``worker_cls="memento.vllm.worker.MementoCPUWorker"``.

The scheduler (:mod:`memento.vllm.scheduler`) decides evictions and frees pages; the worker's model
runner carries them out on the KV tensors, through two methods vLLM's v1 runner calls every step:

* ``_update_states``: before vLLM appends this step's new pages, each compaction in the step's
  :class:`~memento.vllm.scheduler.StepPlan` slides the surviving tokens' K/V down over the evicted
  span, token by token inside the request's pages (:class:`~memento.vllm.kv_layout.TokenMover`,
  which learned the attention kernel's page layout at start-up), and the request's page list is cut
  to what the scheduler kept;
* ``_prepare_inputs``: vLLM computes positions from the logical token counts, which is what RoPE
  needs; the runner then subtracts each request's shift (evicted-token count) to rebuild the slot
  mapping and the attention sequence lengths in physical terms. The attention kernels are
  unchanged: they never see evicted tokens.

CPU only (vLLM's CPU build, the V1 model runner); a GPU worker would need the same two overrides
and a mover for its cache layout.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from memento.vllm.config import PLAN_ATTR, SCHEDULER_CLS, names_subclass
from memento.vllm.eviction import Compaction
from memento.vllm.kv_layout import TokenMover, probe_tile_layout

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's logger: its handlers and level apply


class RewindableCPUGenerator(torch.Generator):
    """A CPU generator that supports the rewind vLLM applies to a discarded sample.

    When a prefill chunk does not reach the end of the known tokens, vLLM samples anyway, discards
    the token and rewinds the request's generator with ``set_offset(get_offset() - 4)``: Philox
    offsets on a GPU; a CPU generator raises instead, which kills the engine. Chunks that end at
    eviction points (prompts holding closed blocks, recomputes after a preemption) make that common
    for seeded requests, so the runner swaps in this generator: it restores the state saved just
    before sampling, exactly undoing the discarded draw as the GPU rewind does.
    """

    saved: torch.Tensor | None = None

    def get_offset(self) -> int:
        return 0

    def set_offset(self, offset: int) -> None:
        if self.saved is not None:
            self.set_state(self.saved)
            self.saved = None


class MementoCPUModelRunner(CPUModelRunner):
    """vLLM's CPU model runner with physical KV compaction and logical positions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._memento_shifts: dict[str, int] = {}
        self._mover: TokenMover | None = None
        self._block_size: int | None = None
        self.memento_compaction_seconds = 0.0
        self.memento_moved_tokens = 0

    # -- start-up ----------------------------------------------------------------------------

    def get_kv_cache_spec(self) -> dict[str, Any]:
        """Every layer's KV spec, sliding-window layers given full-length pages.

        vLLM would give sliding layers a manager that frees the pages that left the window. Under
        memento eviction keys come back into the window (evicting a block brings older mementos
        back: masking.window_mask), and the worker's page list would still point at the freed
        pages. So every layer keeps every live token, in one KV group, while each layer's attention
        still applies its own window to the compacted cache: the last W keys still there, which is
        the training mask's sliding rule (masking.window_mask). The backend's KV saving on a hybrid
        model is then the memento eviction alone.
        """
        from vllm.v1.core.kv_cache_utils import replace_as
        from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

        specs = super().get_kv_cache_spec()
        return {
            name: replace_as(spec, FullAttentionSpec, drop=("extra_retained_tokens",))
            if type(spec) is SlidingWindowSpec
            else spec
            for name, spec in specs.items()
        }

    def initialize_kv_cache(self, kv_cache_config: Any, *args: Any, **kwargs: Any) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        if self.cache_config.cache_dtype != "auto":
            raise ValueError(
                f"memento's vLLM backend cannot start: kv_cache_dtype={self.cache_config.cache_dtype!r} is not "
                "supported (token moves need the cache in the model's dtype): use kv_cache_dtype='auto'"
            )
        (group,) = self.kv_cache_config.kv_cache_groups
        spec = group.kv_cache_spec
        kernel = self._kernel_block_sizes[0]
        if kernel != spec.block_size:
            raise ValueError(
                f"memento's vLLM backend cannot start: the attention kernel splits {spec.block_size}-token pages into "
                f"{kernel}-token blocks; set block_size={kernel}"
            )
        self._block_size = spec.block_size
        self._mover = TokenMover(self._probe_layout(spec), spec.block_size)

    def _probe_layout(self, spec: Any) -> torch.Tensor:
        """Learn where the CPU attention kernel puts each token's K/V inside a page."""
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        isa = _get_attn_isa(spec.dtype, spec.block_size, spec.head_size, self.cache_config.cache_dtype)

        def write(keys, values, cache, slots):
            pages, heads, block, _ = cache.shape
            view = cache.view(pages, heads, 2 * block, -1)
            key_cache, value_cache = view.chunk(2, dim=2)
            ops.cpu_attn_reshape_and_cache(
                keys, values, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto"
            )

        return probe_tile_layout(write, spec.block_size, spec.head_size, spec.num_kv_heads, spec.dtype)

    # -- every step --------------------------------------------------------------------------

    def _update_states(self, scheduler_output: Any):
        plan = getattr(scheduler_output, PLAN_ATTR, None)
        self._memento_shifts = plan.shifts if plan is not None else {}
        if plan is not None and plan.compactions:
            start = time.perf_counter()
            for request_id, compaction in plan.compactions.items():
                self._compact(request_id, compaction)
            self.memento_compaction_seconds += time.perf_counter() - start
        result = super()._update_states(scheduler_output)
        self._rewindable_generators()
        return result

    def _rewindable_generators(self) -> None:
        batch = self.input_batch
        for index, generator in list(batch.generators.items()):
            if type(generator) is torch.Generator and generator.device.type == "cpu":
                swapped = RewindableCPUGenerator()
                swapped.set_state(generator.get_state())
                batch.generators[index] = swapped
                self.requests[batch.req_ids[index]].generator = swapped

    def _sample(self, logits: Any, spec_decode_metadata: Any):
        num_reqs = self.input_batch.num_reqs
        for index in np.nonzero(self.discard_request_mask.np[:num_reqs])[0]:
            generator = self.input_batch.generators.get(int(index))
            if isinstance(generator, RewindableCPUGenerator):
                generator.saved = generator.get_state()
        return super()._sample(logits, spec_decode_metadata)

    def _compact(self, request_id: str, compaction: Compaction) -> None:
        state = self.requests.get(request_id)
        if state is None:  # finished meanwhile: nothing to keep
            return
        assert self._mover is not None and self._block_size is not None
        bs = self._block_size
        pages = state.block_ids[0]
        if compaction.moves:
            table = np.asarray(pages, dtype=np.int64)
            src = np.concatenate([np.arange(start, start + n) for start, _, n in compaction.moves])
            dst = np.concatenate([np.arange(to, to + n) for _, to, n in compaction.moves])
            caches = list({t.data_ptr(): t for t in self.kv_caches}.values())  # layers may share a cache
            self._mover.move(caches, _slots(table, src, bs), _slots(table, dst, bs))
            self.memento_moved_tokens += len(src)
        keep = -(-compaction.num_tokens // bs)
        if len(pages) > keep:
            del pages[keep:]  # the same pages the scheduler returned to the pool
            row = self.input_batch.req_id_to_index.get(request_id)
            if row is not None:
                table = self.input_batch.block_table[0]
                table.block_table.np[row, keep : table.num_blocks_per_row[row]] = 0
                table.num_blocks_per_row[row] = keep

    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        if self._memento_shifts:
            self._to_physical(num_scheduled_tokens)
        return result

    def _to_physical(self, num_scheduled_tokens: np.ndarray) -> None:
        """Slots and attention lengths from physical indices (positions stay logical, for RoPE)."""
        num_reqs = self.input_batch.num_reqs
        shifts = np.array(
            [self._memento_shifts.get(rid, 0) for rid in self.input_batch.req_ids[:num_reqs]], dtype=np.int64
        )
        if not shifts.any():
            return
        total = int(num_scheduled_tokens[:num_reqs].sum())
        token_shift = torch.from_numpy(np.repeat(shifts, num_scheduled_tokens[:num_reqs]))
        physical = self.positions[:total] - token_shift.to(self.positions.dtype)
        self.seq_lens[:num_reqs] -= torch.from_numpy(shifts).to(self.seq_lens.dtype)
        self.input_batch.block_table.compute_slot_mapping(num_reqs, self.query_start_loc.gpu[: num_reqs + 1], physical)


def _slots(pages: np.ndarray, indices: np.ndarray, block_size: int) -> list[int]:
    """Cache slots of a request's physical token indices, through its page list."""
    return (pages[indices // block_size] * block_size + indices % block_size).tolist()


class MementoCPUWorker(CPUWorker):
    """vLLM's CPU worker running :class:`MementoCPUModelRunner`."""

    def init_device(self) -> None:
        if self.vllm_config.use_v2_model_runner:
            raise ValueError("memento's vLLM backend runs on vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0")
        scheduler = self.vllm_config.scheduler_config.scheduler_cls
        if not names_subclass(scheduler, SCHEDULER_CLS):
            raise ValueError(
                f"memento's vLLM backend cannot start: scheduler_cls is {scheduler!r}; the memento worker needs "
                f"the memento scheduler (scheduler_cls={SCHEDULER_CLS!r}, or --scheduler-cls {SCHEDULER_CLS})"
            )
        super().init_device()  # builds vLLM's CPU runner; replaced by ours (same arguments)
        self.model_runner = MementoCPUModelRunner(self.vllm_config, torch.device("cpu"))
