"""Every attention backend applies the same memento mask.

(a) The op alone: SDPA with ``MaskBatch.dense()`` (bool, True = attend), SDPA with
``MaskBatch.additive()``, a hand-written softmax attention and ``flex_attention`` with
``make_block_mask`` give the same outputs on the real (non-padding) rows, for several knob settings,
left and right padding, and match each sequence attended on its own.

(b) A tiny randomly initialised HF Qwen3 takes the 4D mask as ``attention_mask``. In transformers
5.x ``masking_utils._preprocess_mask_arguments`` returns any 4D tensor as-is (no re-interpretation),
so it reaches the attention function unchanged: ``sdpa_attention_forward`` hands it to
``F.scaled_dot_product_attention`` (bool: True = attend; float: added to the scores), while
``eager_attention_forward`` computes ``scores + attention_mask``. Eager therefore needs the
*additive* mask: a bool mask is silently added as 0/1 and masks nothing
(:func:`test_eager_silently_misreads_a_bool_mask` pins this down).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memento.format import SpecialTokenIds
from memento.masking import (
    MEMENTO,
    VANILLA,
    MaskBatch,
    MaskConfig,
    build_batch,
    compute_visibility,
    make_block_mask,
)

SPECIALS = SpecialTokenIds(block_start=1, block_end=2, summary_start=3, summary_end=4, think_start=5, think_end=6)
FIRST_PLAIN = 7
VOCAB = 64
ATOL = 1e-5

CONFIGS = {
    "vanilla": VANILLA,
    "memento": MEMENTO,
    "keep1": MaskConfig(keep_last_n=1),
    "delims": MaskConfig(mask_delimiters=True),
    "answer": MaskConfig(keep_last_block_for_answer=True),
    "restart": MaskConfig(restart=True),
}


def random_trace(rng: np.random.Generator, n_units: int) -> list[int]:
    """prompt <think> (<|block_start|> r <|block_end|><|summary_start|> m <|summary_end|>)* </think> answer."""

    def plain(lo: int, hi: int) -> list[int]:
        return rng.integers(FIRST_PLAIN, VOCAB, size=int(rng.integers(lo, hi + 1))).tolist()

    ids = [*plain(2, 6), SPECIALS.think_start]
    for _ in range(n_units):
        ids += [SPECIALS.block_start, *plain(2, 7), SPECIALS.block_end, SPECIALS.summary_start, *plain(1, 3)]
        ids.append(SPECIALS.summary_end)
    return [*ids, SPECIALS.think_end, *plain(1, 4)]


def random_batch(seed: int, units: tuple[int, ...] = (1, 3, 2)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [random_trace(rng, n) for n in units]


def real_rows(mb: MaskBatch) -> torch.Tensor:
    return mb.attention_mask.bool()


# ----------------------------------------------------------------------------------------------
# (a) the attention op
# ----------------------------------------------------------------------------------------------


def manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mb: MaskBatch) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        # Eager flex_attention on CPU works (an unfused reference implementation) but warns.
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, block_mask=make_block_mask(mb.invisible_from))


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_attention_backends_agree(name: str, padding_side: str) -> None:
    config = CONFIGS[name]
    seqs = random_batch(seed=len(name))
    items = [compute_visibility(s, SPECIALS, config) for s in seqs]
    mb = build_batch(seqs, SPECIALS, config, padding_side=padding_side)
    batch, length = mb.input_ids.shape
    heads, dim = 2, 8
    gen = torch.Generator().manual_seed(0)
    # Per-sequence q/k/v, placed at each sequence's rows, so padding can be compared away.
    per_seq = [tuple(torch.randn(heads, len(v), dim, generator=gen) for _ in range(3)) for v in items]
    q, k, v = (torch.randn(batch, heads, length, dim, generator=gen) for _ in range(3))
    for b, (vis, (qs, ks, vs)) in enumerate(zip(items, per_seq, strict=True)):
        rows = slice(mb.offsets[b], mb.offsets[b] + len(vis))
        q[b, :, rows], k[b, :, rows], v[b, :, rows] = qs, ks, vs

    dense = mb.dense()
    assert dense.dtype == torch.bool and dense.shape == (batch, 1, length, length)
    outs = {
        "sdpa_bool": F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
        "sdpa_additive": F.scaled_dot_product_attention(q, k, v, attn_mask=mb.additive()),
        "manual": manual_attention(q, k, v, dense),
        "flex_eager": flex(q, k, v, mb),
    }
    real = real_rows(mb)
    ref = outs["sdpa_bool"]
    for label, out in outs.items():
        assert torch.isfinite(out).all(), label  # padding rows see themselves: no empty softmax row
        for b in range(batch):
            diff = (out[b][:, real[b]] - ref[b][:, real[b]]).abs().max().item()
            assert diff <= ATOL, f"{label} vs sdpa_bool, sample {b}: {diff:.2e}"

    # Batched and padded == each sequence alone with its own (L, L) mask.
    for b, (vis, (qs, ks, vs)) in enumerate(zip(items, per_seq, strict=True)):
        alone = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=vis.dense())
        diff = (ref[b][:, real[b]] - alone).abs().max().item()
        assert diff <= ATOL, f"sample {b} batched ({padding_side} padding) vs alone: {diff:.2e}"

    if name == "vanilla":
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if padding_side == "right":  # left padding shifts real rows behind padding that causal would see
            for b in range(batch):
                assert (causal[b][:, real[b]] - ref[b][:, real[b]]).abs().max().item() <= ATOL


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_block_mask_per_tile_equals_torch_create_block_mask(name: str, padding_side: str) -> None:
    """Our tile decisions equal torch evaluating the mask_mod on every pair (small tiles, many units)."""
    from torch.nn.attention.flex_attention import create_block_mask

    seqs = random_batch(seed=7 + len(name), units=(6, 2, 9))
    mb = build_batch(seqs, SPECIALS, CONFIGS[name], padding_side=padding_side)
    batch, length = mb.input_ids.shape
    ours = make_block_mask(mb.invisible_from, block_size=8)
    theirs = create_block_mask(
        mb.mask_mod(), B=batch, H=None, Q_LEN=length, KV_LEN=length, device="cpu", BLOCK_SIZE=8, _compile=False
    )
    assert length > 8 * 4, "the test needs several tiles per row"
    for counts, indices in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        n_ours, n_theirs = getattr(ours, counts), getattr(theirs, counts)
        assert torch.equal(n_ours, n_theirs), counts
        used = torch.arange(getattr(ours, indices).shape[-1]) < n_ours[..., None]
        assert torch.equal(getattr(ours, indices)[used], getattr(theirs, indices)[used]), indices
    assert 0 < int(ours.full_kv_num_blocks.sum()) < int(ours.kv_num_blocks.sum() + ours.full_kv_num_blocks.sum())


# ----------------------------------------------------------------------------------------------
# (b) a tiny HF model
# ----------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = {}
    state = None
    for impl in ("sdpa", "eager"):
        config = Qwen3Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            attn_implementation=impl,
        )
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config).eval()
        if state is None:
            state = model.state_dict()
        else:
            model.load_state_dict(state)
        assert model.config._attn_implementation == impl
        out[impl] = model
    return out


def logits(model: torch.nn.Module, mb: MaskBatch, mask: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=mb.input_ids, attention_mask=mask, position_ids=mb.position_ids).logits


def assert_close_on(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, what: str) -> None:
    diff = (a[rows] - b[rows]).abs().max().item()
    assert diff <= ATOL, f"{what}: max |diff| {diff:.2e}"


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("name", ["memento", "keep1", "delims", "restart"])
def test_hf_bool_mask_equals_additive_and_eager(models, name: str, padding_side: str) -> None:
    mb = build_batch(random_batch(seed=7), SPECIALS, CONFIGS[name], padding_side=padding_side)
    real = real_rows(mb)
    sdpa_bool = logits(models["sdpa"], mb, mb.dense())
    assert sdpa_bool.shape == (*mb.input_ids.shape, VOCAB)
    assert_close_on(logits(models["sdpa"], mb, mb.additive()), sdpa_bool, real, "sdpa additive vs sdpa bool")
    assert_close_on(logits(models["eager"], mb, mb.additive()), sdpa_bool, real, "eager additive vs sdpa bool")


def test_eager_silently_misreads_a_bool_mask(models) -> None:
    """Canary: eager adds the mask to the scores, so a bool mask adds 0/1 and masks nothing.

    If this starts failing, transformers began converting bool masks for eager; the additive mask
    stays correct either way.
    """
    mb = build_batch(random_batch(seed=3), SPECIALS, MEMENTO)
    right = logits(models["eager"], mb, mb.additive())
    wrong = logits(models["eager"], mb, mb.dense())
    assert (right - wrong).abs().max().item() > 1e-3
    # Row 0 sees only itself under any mask; with the bool mask added it sees the whole sequence.
    assert (right[:, 0] - wrong[:, 0]).abs().max().item() > 1e-3


def test_hf_vanilla_mask_equals_plain_causal_forward(models) -> None:
    rng = np.random.default_rng(11)
    same_length = [random_trace(rng, 2) for _ in range(3)]
    n = min(len(s) for s in same_length)
    same_length = [s[:n] for s in same_length]  # a prefix of a trace is well formed
    mb = build_batch(same_length, SPECIALS, VANILLA)
    with torch.no_grad():
        plain = models["sdpa"](input_ids=mb.input_ids).logits
    all_rows = torch.ones_like(mb.input_ids, dtype=torch.bool)
    for impl, mask in (("sdpa", mb.dense()), ("sdpa", mb.additive()), ("eager", mb.additive())):
        assert_close_on(logits(models[impl], mb, mask), plain, all_rows, f"{impl} vanilla mask vs plain causal")

    # Padded batches: against the model's own 2D padding mask (positions passed explicitly).
    for side in ("right", "left"):
        mb = build_batch(random_batch(seed=5), SPECIALS, VANILLA, padding_side=side)
        real = real_rows(mb)
        ours = logits(models["sdpa"], mb, mb.dense())
        theirs = logits(models["sdpa"], mb, mb.attention_mask)
        assert_close_on(ours, theirs, real, f"vanilla 4D mask vs 2D padding mask ({side} padding)")


def test_hf_memento_mask_is_not_ignored(models) -> None:
    seqs = random_batch(seed=13, units=(3,))
    memento = build_batch(seqs, SPECIALS, MEMENTO)
    vanilla = build_batch(seqs, SPECIALS, VANILLA)
    assert torch.equal(memento.input_ids, vanilla.input_ids)
    first_end = seqs[0].index(SPECIALS.summary_end)
    for impl, kind in (("sdpa", "dense"), ("eager", "additive")):
        m = logits(models[impl], memento, getattr(memento, kind)())[0]
        v = logits(models[impl], vanilla, getattr(vanilla, kind)())[0]
        # Identical up to the first <|summary_end|>, different from it on (its block is gone).
        assert (m[:first_end] - v[:first_end]).abs().max().item() <= ATOL
        assert (m[first_end] - v[first_end]).abs().max().item() > 1e-3, impl
        assert (m[first_end:] - v[first_end:]).abs().amax(dim=-1).min().item() > 1e-4, impl


def test_hf_restart_layout_forward(models) -> None:
    seq = random_batch(seed=17, units=(3,))[0]
    vis = compute_visibility(seq, SPECIALS, MaskConfig(restart=True))
    assert len(vis) > len(seq) and len(vis.events) == 3
    mb = build_batch([seq], SPECIALS, MaskConfig(restart=True))
    assert torch.equal(mb.position_ids[0], torch.from_numpy(vis.position_ids))
    out = logits(models["sdpa"], mb, mb.dense())[0]
    assert out.shape == (len(vis), VOCAB)
    assert_close_on(logits(models["eager"], mb, mb.additive())[0], out, slice(None), "restart: eager vs sdpa")

    # Before the first inserted copy, the rows are the original tokens and see what vanilla sees.
    first, second = vis.events[0], vis.events[1]
    first_copy = int(vis.output_rows[first.at]) - len(first.recompute)
    plain_mb = build_batch([seq], SPECIALS, VANILLA)
    vanilla = logits(models["sdpa"], plain_mb, plain_mb.dense())[0]
    assert_close_on(out, vanilla, slice(0, first_copy), "restart rows before the first eviction vs vanilla")
    # Logits read through output_rows have one row per original token.
    assert out[torch.from_numpy(vis.output_rows)].shape == (len(seq), VOCAB)

    # From the first copy until the second eviction, the rows equal a causal forward over the trace
    # with block 1 (and its original memento KV) cut out, at the same logical positions: the
    # recomputed memento carries no information from its block.
    cut_ids = seq[: first.evicted.start] + seq[first.recompute.start :]
    cut_pos = list(range(first.evicted.start)) + list(range(first.recompute.start, len(seq)))
    with torch.no_grad():
        cut = models["sdpa"](
            input_ids=torch.tensor([cut_ids]), position_ids=torch.tensor([cut_pos]), attention_mask=None
        ).logits[0]
    span = len(first.recompute) + (second.at - first.at)
    assert_close_on(
        out[first_copy : first_copy + span],
        cut[first.evicted.start : first.evicted.start + span],
        slice(None),
        "restart",
    )
