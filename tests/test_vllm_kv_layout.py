"""memento.vllm.kv_layout against hand-written page layouts (no vLLM needed).

Each fake writer stores a token's keys and values in its own arrangement inside a head's tile (the
real CPU kernels transpose keys, AMX packs them). The probe must recover where every element lives,
and the mover must then move tokens so that reading them back through the layout gives the source
token's keys and values, overlapping runs included.
"""

from __future__ import annotations

import pytest
import torch

from memento.vllm.kv_layout import TokenMover, probe_tile_layout


def plain(o: int, d: int, is_value: int, bs: int, hd: int) -> int:
    return o * 2 * hd + is_value * hd + d


def keys_transposed(o: int, d: int, is_value: int, bs: int, hd: int) -> int:
    return d * bs + o if not is_value else bs * hd + o * hd + d


def scrambled(o: int, d: int, is_value: int, bs: int, hd: int) -> int:
    perm = torch.randperm(2 * bs * hd, generator=torch.Generator().manual_seed(bs * 1000 + hd))
    return int(perm[plain(o, d, is_value, bs, hd)])


def make_writer(layout, bs: int, hd: int):
    table = torch.tensor(
        [[layout(o, d % hd, d // hd, bs, hd) for d in range(2 * hd)] for o in range(bs)], dtype=torch.int64
    )

    def write(keys, values, cache, slots):
        pages, heads = cache.shape[:2]
        flat = cache.view(pages, heads, -1)
        for i, slot in enumerate(slots.tolist()):
            page, o = divmod(slot, bs)
            both = torch.cat([keys[i], values[i]], dim=-1)  # (heads, 2 * hd)
            flat[page, :, table[o]] = both.to(cache.dtype)

    return write, table


@pytest.mark.parametrize("layout", [plain, keys_transposed, scrambled])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs,hd", [(32, 32), (128, 64), (96, 80)])
def test_probe_recovers_the_layout_and_moves_tokens(layout, dtype, bs, hd):
    write, table = make_writer(layout, bs, hd)
    offsets = probe_tile_layout(write, bs, hd, num_kv_heads=2, dtype=dtype)
    assert torch.equal(offsets, table)

    pages, heads = 3, 2
    cache = torch.zeros(pages, heads, bs, 2 * hd, dtype=dtype)
    slots = torch.arange(pages * bs)
    keys = torch.randn(len(slots), heads, hd).to(dtype)
    values = torch.randn(len(slots), heads, hd).to(dtype)
    write(keys, values, cache, slots)
    mover = TokenMover(offsets, bs)
    # an overlapping slide across a page boundary, as a compaction does
    src = list(range(bs - 5, 2 * bs + 7))
    dst = [s - 9 for s in src]
    mover.move([cache, cache.clone()], src, dst)
    flat = cache.view(pages, heads, -1)
    for s, d in zip(src, dst, strict=True):
        got = flat[d // bs, :, table[d % bs]]
        want = torch.cat([keys[s], values[s]], dim=-1)
        assert torch.equal(got, want), f"slot {s} -> {d}"
    untouched = bs - 15  # before the destination run
    assert torch.equal(flat[0, :, table[untouched]], torch.cat([keys[untouched], values[untouched]], dim=-1))


def test_a_layout_that_loses_elements_is_refused():
    bs, hd = 32, 32
    write, _ = make_writer(plain, bs, hd)

    def lossy(keys, values, cache, slots):
        write(keys, values, cache, slots)
        cache.view(-1)[5] = -1.0  # one element never written

    with pytest.raises(RuntimeError, match="could not map"):
        probe_tile_layout(lossy, bs, hd, num_kv_heads=1, dtype=torch.float32)
