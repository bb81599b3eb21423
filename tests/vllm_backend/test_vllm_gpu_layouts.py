"""The GPU worker's parts that can run without a GPU (issue 22).

* The token mover against every KV-cache layout vLLM 0.32 can build. The per-layer views come
  from vLLM's own code (``compute_layout_strides`` and ``create_kv_cache_views``, as
  ``allocate_kv_cache`` calls them), on CPU tensors of the GPU backends' shape
  ``[pages, kv_heads, block_size, k + v]``: layer-outermost and block-outermost, several layers
  in one buffer. The expected result is computed on a plain dense copy of the logical cache.
* The runner's input preparation: the physical slot positions, the device sequence lengths and the
  host copy attention backends plan with.

The whole GPU path (kernels, CUDA graphs, FlashAttention / FlashInfer) runs only on a GPU:
``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheTensor, compute_layout_strides, create_kv_cache_views
from vllm.v1.kv_cache_layout import KVCacheLayout

from memento.vllm.gpu_worker import MementoGPUModelRunner, MementoGPUWorker
from memento.vllm.kv_layout import StridedPageMover
from memento.vllm.runner import MementoRunnerMixin
from memento.vllm.worker import MementoCPUWorker, MementoWorker

BLOCK = 4


def layer_views(layout: KVCacheLayout, dtype: torch.dtype, *, layers: int = 3, pages: int = 6, heads: int = 2):
    """Per-layer cache views built the way vLLM 0.32 builds them for ``layout`` (and their buffer)."""
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=heads, head_size=8, dtype=dtype)
    # kv_cache_utils packs one page of every layer per block when blocks are outermost.
    packed = spec.page_size_bytes * layers if layout.is_block_outermost else None
    layer_stride, block_stride, *_ = compute_layout_strides(
        spec, pages, layers, layout, fixed_strides=(None, packed, None, None, None)
    )
    size = spec.page_size_bytes * pages * layers
    tensor = KVCacheTensor(
        size=size, layers=[f"layer.{i}" for i in range(layers)], layer_stride=layer_stride, block_stride=block_stride
    )
    raw = torch.zeros(size, dtype=torch.int8)
    return create_kv_cache_views(raw, spec, pages, layout, tensor), raw


def apply_to_dense(dense: torch.Tensor, src: list[int], dst: list[int]) -> None:
    """The reference: [layers, pages, heads, block, content], every source read first."""
    values = torch.stack([dense[:, s // BLOCK, :, s % BLOCK] for s in src])
    for i, d in enumerate(dst):
        dense[:, d // BLOCK, :, d % BLOCK] = values[i]


def compaction(pages: list[int], moves: list[tuple[int, int, int]]) -> tuple[list[int], list[int]]:
    """Slots of (src, dst, length) runs of one request's physical tokens through its page list."""
    src = [pages[t // BLOCK] * BLOCK + t % BLOCK for s, _, n in moves for t in range(s, s + n)]
    dst = [pages[t // BLOCK] * BLOCK + t % BLOCK for _, d, n in moves for t in range(d, d + n)]
    return src, dst


def test_the_layouts_really_differ() -> None:
    strides = {layout: layer_views(layout, torch.float32)[0][1].stride() for layout in KVCacheLayout}
    assert len(set(strides.values())) == len(KVCacheLayout)  # otherwise the test below proves little
    assert not layer_views(KVCacheLayout.BLHNC, torch.float32)[0][0].is_contiguous()


@pytest.mark.parametrize("layout", list(KVCacheLayout), ids=lambda layout: layout.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_the_mover_is_right_for_every_vllm_layout(layout: KVCacheLayout, dtype: torch.dtype) -> None:
    views, raw = layer_views(layout, dtype)
    generator = torch.Generator().manual_seed(0)
    for view in views:
        view.copy_(torch.randn(view.shape, generator=generator).to(dtype))
    dense = torch.stack([v.clone() for v in views])
    before = raw.clone()
    # A request on pages 4, 1, 5 (out of order), 12 tokens: an evicted span of 3 at 2..4 slides the
    # 7 tokens after it down (overlapping runs, across page boundaries), as the scheduler plans it.
    src, dst = compaction([4, 1, 5], [(5, 2, 7)])
    assert set(src) & set(dst)  # overlapping: a source is overwritten by an earlier move
    # And moves in any order: a swap of two slots and a rotation, which token-by-token copying breaks.
    src, dst = [*src, 0, 1, 8, 9, 10], [*dst, 1, 0, 9, 10, 8]  # pages 0 and 2: not the request's
    assert len(set(dst)) == len(dst)
    StridedPageMover(BLOCK).move(views, src, dst)
    apply_to_dense(dense, src, dst)
    for got, want in zip(views, dense, strict=True):
        assert torch.equal(got, want)
    # Only the destinations changed: the other pages of every layer are byte for byte as before.
    touched = {d // BLOCK for d in dst}
    for page in set(range(6)) - touched:
        for view, old in zip(views, layer_views_like(before, layout, dtype), strict=True):
            assert torch.equal(view[page], old[page])


def layer_views_like(raw: torch.Tensor, layout: KVCacheLayout, dtype: torch.dtype) -> list[torch.Tensor]:
    """The same views over a copy of the buffer (to read the bytes as they were)."""
    views, fresh = layer_views(layout, dtype)
    fresh.copy_(raw)
    return views


def test_the_mover_checks_its_input() -> None:
    views, _ = layer_views(KVCacheLayout.LBHNC, torch.float32)
    mover = StridedPageMover(BLOCK)
    with pytest.raises(ValueError, match="2 sources for 1 destinations"):
        mover.move(views, [1, 2], [0])
    with pytest.raises(ValueError, match="cache view"):
        StridedPageMover(8).move(views, [1], [0])
    mover.move(views, [], [])  # nothing to do


class _FakeBlockTable:
    def __init__(self) -> None:
        self.calls: list[tuple[int, list[int], list[int]]] = []

    def compute_slot_mapping(self, num_reqs: int, query_start: torch.Tensor, positions: torch.Tensor) -> None:
        self.calls.append((num_reqs, query_start.tolist(), positions.tolist()))


class _Batch:
    def __init__(self, ids: list[str]) -> None:
        self.req_ids = ids
        self.num_reqs = len(ids)
        self.block_table = _FakeBlockTable()


class _Buffer:
    def __init__(self, values: list[int]) -> None:
        self.gpu = torch.tensor(values, dtype=torch.int32)


class _Runner(MementoRunnerMixin):
    """Just the state ``_to_physical`` reads, as vLLM's GPU runner holds it after ``_prepare_inputs``."""

    def __init__(self, shifts: dict[str, int]) -> None:
        self._memento_shifts = shifts
        self.input_batch = _Batch(["a", "b", "c"])
        # a: 2 tokens at logical 10, 11; b: 1 token at 40; c: 3 tokens at 7, 8, 9.
        self.positions = torch.tensor([10, 11, 40, 7, 8, 9, 0, 0], dtype=torch.int64)
        self.seq_lens = torch.tensor([12, 41, 10, 0], dtype=torch.int32)
        self.optimistic_seq_lens_cpu = self.seq_lens.clone()
        self.query_start_loc = _Buffer([0, 2, 3, 6, 6])


def test_the_runner_makes_slots_and_lengths_physical_and_keeps_positions_logical() -> None:
    runner = _Runner({"a": 5, "c": 3})
    runner._to_physical(np.array([2, 1, 3], dtype=np.int32))
    ((num_reqs, query_start, physical),) = runner.input_batch.block_table.calls
    assert (num_reqs, query_start) == (3, [0, 2, 3, 6])
    assert physical == [5, 6, 40, 4, 5, 6]  # slots from physical indices
    assert runner.positions[:6].tolist() == [10, 11, 40, 7, 8, 9]  # RoPE still sees logical positions
    assert runner.seq_lens.tolist() == [7, 41, 7, 0]  # what kernels read
    assert runner.optimistic_seq_lens_cpu.tolist() == [7, 41, 7, 0]  # what backends plan with (FlashInfer)


def test_the_runner_leaves_a_step_without_evictions_alone() -> None:
    runner = _Runner({"a": 0})
    runner._to_physical(np.array([2, 1, 3], dtype=np.int32))
    assert runner.input_batch.block_table.calls == []
    assert runner.seq_lens.tolist() == [12, 41, 10, 0]


def test_the_platform_picks_the_worker() -> None:
    from vllm.platforms import current_platform

    assert MementoWorker is (MementoCPUWorker if current_platform.is_cpu() else MementoGPUWorker)
    assert issubclass(MementoGPUModelRunner, MementoRunnerMixin)
