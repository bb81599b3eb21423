"""The GPU worker of the vLLM backend (CUDA builds of vLLM 0.32, V1 model runner).

The same two overrides as on the CPU (:mod:`memento.vllm.runner`: compaction before each step,
physical slots and sequence lengths with logical positions) in front of vLLM's ``GPUModelRunner``.
Only the mover differs: the GPU attention backends give each layer a strided
``[pages, kv_heads, block_size, k + v]`` view whose physical order depends on ``KVCacheLayout``,
and :class:`~memento.vllm.kv_layout.StridedPageMover` copies tokens through that view, which is
right for every layout. Generators need no help here: CUDA generators rewind a discarded sample
themselves (Philox offsets), which the CPU runner has to emulate.

What is verified where (README, "The vLLM backend"): on these CPU machines the mover runs against
every layout vLLM 0.32 can build (CPU tensors with the GPU views' shapes and strides) and the
runner's input preparation against vLLM's own block table; the whole path runs on a GPU through
``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from memento.vllm.config import check_worker_config
from memento.vllm.kv_layout import StridedPageMover
from memento.vllm.runner import MementoRunnerMixin


class MementoGPUModelRunner(MementoRunnerMixin, GPUModelRunner):
    """vLLM's GPU model runner with physical KV compaction and logical positions."""

    def _make_mover(self, spec: Any) -> StridedPageMover:
        return StridedPageMover(spec.block_size)


class MementoGPUWorker(Worker):
    """vLLM's GPU worker running :class:`MementoGPUModelRunner`."""

    def init_device(self) -> None:
        check_worker_config(self.vllm_config)
        super().init_device()

    def _make_model_runner(self) -> GPUModelRunner:
        return MementoGPUModelRunner(self.vllm_config, self.device)
