"""The CPU worker of the vLLM backend, and the platform's worker: ``worker_cls="memento.vllm.worker.MementoWorker"``.

:class:`MementoWorker` is :class:`MementoCPUWorker` on vLLM's CPU build and
:class:`memento.vllm.gpu_worker.MementoGPUWorker` on CUDA, so one class name serves both. What the
runners add to vLLM's (compaction before each step, physical slots with logical positions) is in
:mod:`memento.vllm.runner`; the CPU runner brings the CPU kernels' packed page layout
(:class:`~memento.vllm.kv_layout.TokenMover`, probed at start-up) and a generator vLLM can rewind.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from vllm.platforms import current_platform
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from memento.vllm.config import check_worker_config
from memento.vllm.kv_layout import TokenMover, probe_tile_layout
from memento.vllm.runner import MementoRunnerMixin

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


class MementoCPUModelRunner(MementoRunnerMixin, CPUModelRunner):
    """vLLM's CPU model runner with physical KV compaction and logical positions."""

    def _make_mover(self, spec: Any) -> TokenMover:
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

        layout = probe_tile_layout(write, spec.block_size, spec.head_size, spec.num_kv_heads, spec.dtype)
        return TokenMover(layout, spec.block_size)

    def _layer_caches(self) -> list[torch.Tensor]:
        return list({t.data_ptr(): t for t in self.kv_caches}.values())  # layers may share a cache

    def _update_states(self, scheduler_output: Any):
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


class MementoCPUWorker(CPUWorker):
    """vLLM's CPU worker running :class:`MementoCPUModelRunner`."""

    def init_device(self) -> None:
        check_worker_config(self.vllm_config)
        super().init_device()  # builds vLLM's CPU runner; replaced by ours (same arguments)
        self.model_runner = MementoCPUModelRunner(self.vllm_config, torch.device("cpu"))


def _platform_worker() -> type:
    if current_platform.is_cpu():
        return MementoCPUWorker
    from memento.vllm.gpu_worker import MementoGPUWorker

    return MementoGPUWorker


MementoWorker = _platform_worker()
"""The memento worker for this platform (the class name ``engine_args`` and ``serve_args`` give vLLM)."""
