"""Token-granular moves inside a paged KV cache, for each page layout vLLM 0.32 uses.

Two movers, one interface (:class:`Mover`):

* :class:`StridedPageMover`, for vLLM's GPU attention backends. Each layer's cache is a 4D view
  ``[pages, kv_heads, block_size, content]`` whose content holds a token's key and value side by
  side (``head_size + head_size_v`` elements), with any strides: the physical order depends on
  ``KVCacheLayout`` (layer-outermost ``LBHNC`` / ``LBNHC`` / ``LHBNC``, block-outermost ``BLHNC`` /
  ``BLNHC`` / ``BHLNC``, where one page of every layer sits together). A plain indexed copy on
  that view is right for every one of them, because indexing follows the view's strides.
* :class:`TokenMover`, for the CPU build, whose kernels pack a page's interior themselves.

vLLM's CPU attention stores a page as ``[num_kv_heads, block_size, 2 * head_dim]`` elements, but
how a token's keys and values are laid out inside a head's tile depends on the instruction set
(keys are stored transposed for the vector kernels and packed differently for AMX). Rather than
copy that knowledge here, :func:`probe_tile_layout` asks the backend's own write op where each
token's elements land: it writes known integers (exact in any float dtype) into a scratch page and
reads back, for every element of a tile, which token, which half (key or value) and which
dimension it holds. :class:`TokenMover` then moves whole tokens between (page, offset) slots with
two gathers, for every layer at once, whatever the layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch


class Mover(Protocol):
    """Moves tokens' KV between cache slots (``page * block_size + offset``) of every given cache."""

    def move(self, caches: Sequence[torch.Tensor], src: Sequence[int], dst: Sequence[int]) -> None:
        """Copy slot ``src[i]`` to slot ``dst[i]``, all heads, keys and values; every source is read
        before any destination is written, so overlapping runs are safe."""
        ...


class StridedPageMover:
    """Token moves on ``[pages, heads, block_size, content]`` views of any strides (vLLM's GPU layouts)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size

    def move(self, caches: Sequence[torch.Tensor], src: Sequence[int], dst: Sequence[int]) -> None:
        if len(src) != len(dst):
            raise ValueError(f"{len(src)} sources for {len(dst)} destinations")
        if not src:
            return
        indices: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        for cache in caches:
            if cache.dim() != 4 or cache.shape[2] != self.block_size:
                raise ValueError(
                    f"expected a [pages, heads, {self.block_size}, content] cache view, got shape {tuple(cache.shape)}"
                )
            if cache.device not in indices:
                src_t = torch.as_tensor(src, dtype=torch.int64).to(cache.device)
                dst_t = torch.as_tensor(dst, dtype=torch.int64).to(cache.device)
                bs = self.block_size
                indices[cache.device] = (src_t // bs, src_t % bs, dst_t // bs, dst_t % bs)
            src_page, src_offset, dst_page, dst_offset = indices[cache.device]
            values = cache[src_page, :, src_offset]  # (tokens, heads, content): a copy, read before writing
            cache[dst_page, :, dst_offset] = values


TileWriter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""``write(keys, values, cache, slot_mapping)``: the backend's cache write for ``(tokens, heads, dim)``
keys and values into ``cache`` of shape ``(pages, heads, block_size, 2 * dim)``."""

_RADIX = 64  # digits below 64 (keys) and 64..127 (values): exact integers in fp32, fp16 and bf16


def probe_tile_layout(
    write: TileWriter, block_size: int, head_dim: int, num_kv_heads: int, dtype: torch.dtype
) -> torch.Tensor:
    """``(block_size, 2 * head_dim)`` offsets into one head's flattened tile: row ``o`` lists where
    token ``o``'s key dimensions (first ``head_dim``) and value dimensions (last) are stored.

    Raises RuntimeError when the layout mixes heads or tokens in a way this cannot describe.
    """
    tile = 2 * block_size * head_dim
    token_digits = _digits_needed(block_size)
    dim_digits = _digits_needed(head_dim)
    token = torch.arange(block_size)[:, None, None].expand(block_size, num_kv_heads, head_dim)
    dim = torch.arange(head_dim)[None, None, :].expand(block_size, num_kv_heads, head_dim)
    slots = torch.arange(block_size, dtype=torch.int64)

    def read(field: torch.Tensor, digit: int) -> torch.Tensor:
        cache = torch.full((1, num_kv_heads, block_size, 2 * head_dim), -1.0, dtype=dtype)
        part = (field // _RADIX**digit) % _RADIX
        write(part.to(dtype).contiguous(), (part + _RADIX).to(dtype).contiguous(), cache, slots)
        heads = cache.view(num_kv_heads, tile).to(torch.int64)
        if not bool((heads == heads[:1]).all()):
            raise RuntimeError("the KV cache layout differs between heads; token moves are not supported")
        return heads[0]

    token_reads = [read(token, d) for d in range(token_digits)]
    dim_reads = [read(dim, d) for d in range(dim_digits)]
    written = token_reads[0] >= 0
    is_value = token_reads[0] >= _RADIX
    token_of = sum(((r % _RADIX) * _RADIX**d for d, r in enumerate(token_reads)), torch.zeros(tile, dtype=torch.int64))
    dim_of = sum(((r % _RADIX) * _RADIX**d for d, r in enumerate(dim_reads)), torch.zeros(tile, dtype=torch.int64))
    column = dim_of + is_value.to(torch.int64) * head_dim
    offsets = torch.full((block_size, 2 * head_dim), -1, dtype=torch.int64)
    where = torch.nonzero(written).flatten()
    offsets[token_of[where], column[where]] = where
    found = torch.zeros_like(offsets)
    found.index_put_((token_of[where], column[where]), torch.ones_like(where), accumulate=True)
    if int(written.sum()) != block_size * 2 * head_dim or not bool((found == 1).all()):
        raise RuntimeError("could not map the KV cache layout: some element is written twice or never")
    return offsets


def _digits_needed(n: int) -> int:
    digits, span = 1, _RADIX
    while span < n:
        digits, span = digits + 1, span * _RADIX
    return digits


class TokenMover:
    """Moves tokens' KV between slots of vLLM CPU caches, through the tile layout the kernel revealed."""

    def __init__(self, offsets: torch.Tensor, block_size: int) -> None:
        self.offsets = offsets
        self.block_size = block_size

    def move(self, caches: Sequence[torch.Tensor], src: Sequence[int], dst: Sequence[int]) -> None:
        """Copy every head's KV of slot ``src[i]`` to slot ``dst[i]`` in each cache.

        All sources are read before any destination is written, so overlapping runs are safe.
        """
        if len(src) != len(dst):
            raise ValueError(f"{len(src)} sources for {len(dst)} destinations")
        if not src:
            return
        src_t = torch.as_tensor(src, dtype=torch.int64)
        dst_t = torch.as_tensor(dst, dtype=torch.int64)
        bs = self.block_size
        for cache in caches:
            pages, heads = cache.shape[0], cache.shape[1]
            flat = cache.view(pages, heads, -1)
            head = torch.arange(heads)[None, :, None]
            values = flat[(src_t // bs)[:, None, None], head, self.offsets[src_t % bs][:, None, :]]
            flat[(dst_t // bs)[:, None, None], head, self.offsets[dst_t % bs][:, None, :]] = values
