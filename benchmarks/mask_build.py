"""Mask construction: dense boolean / additive float masks vs a FlexAttention BlockMask.

All figures come from one run, side by side, on the same random memento-structured token ids
(``_synthetic.py``). Every variant is timed end to end from token ids:

- visibility decision: ``build_batch`` (tracker over each sequence + padding/collation), shared
  by every variant;
- dense bool ``(B, 1, L, L)``: ``build_batch(...).dense()``;
- additive float32: the dense mask turned into 0 / finfo.min (``MaskBatch.additive()``);
- BlockMask, ours: ``make_block_mask`` decides whole tiles from ``invisible_from``;
- BlockMask, the library call a user would reach for: torch's ``create_block_mask`` over our
  ``mask_mod``, eager (``_compile=False``) and compiled; the run checks all three are identical.

Variants are timed round-robin so that load from other processes falls on all of them alike.

Memory: "result" is the size of what the variant returns (for the BlockMask: its index tensors plus
the ``invisible_from`` its mask_mod reads); "peak" is the growth of the process's peak resident
set while the variant runs (Linux ``VmHWM``, reset before each run through ``/proc/self/clear_refs``).

A second, smaller section times the attention op itself (SDPA with the dense mask, SDPA with the
additive mask, flex_attention with the BlockMask, SDPA ``is_causal``) and checks the outputs agree.

    .venv/bin/python benchmarks/mask_build.py                 # B=16, L=8192, 3 repeats
    .venv/bin/python benchmarks/mask_build.py --batch 4 --length 2048 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

# A fresh inductor cache, so the reported compile times are cold (set before torch is imported).
if "--warm-cache" not in sys.argv:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="memento-bench-inductor-"))

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic import SPECIALS, memento_batch
from memento.masking import MEMENTO, VANILLA, additive_mask, build_batch, make_block_mask, make_mask_mod

warnings.filterwarnings("ignore", message=".*_compile flag on create_block_mask.*")
warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")

GIB = 1024**3
MIB = 1024**2


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def nbytes(obj: Any) -> int:
    """Bytes held by the tensors of a mask (a tensor, a BlockMask, or a tuple of them)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if hasattr(obj, "as_tuple"):  # BlockMask
        return sum(nbytes(t) for t in obj.as_tuple() if isinstance(t, torch.Tensor))
    if hasattr(obj, "invisible_from") and hasattr(obj, "input_ids"):  # MaskBatch
        return nbytes((obj.input_ids, obj.position_ids, obj.attention_mask, obj.invisible_from))
    if isinstance(obj, (tuple, list)):
        return sum(nbytes(t) for t in obj)
    return 0


def _timed(fn: Callable[[], Any]) -> tuple[float, int | None, int]:
    """One call: wall time, growth of the peak resident set during it, bytes of the result."""
    gc.collect()
    have_peak = _reset_peak()
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - t0
    hwm = _status_kib("VmHWM")
    peak = (hwm - base) * 1024 if have_peak and base is not None and hwm is not None else None
    size = nbytes(out)
    del out
    gc.collect()
    return elapsed, peak, size


def measure(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, Any]]:
    """Time every variant ``repeats`` times, interleaved round-robin, after one warm-up call each.

    Interleaving spreads any drift in the machine's load evenly over the variants, so their ratios
    stay meaningful on a shared machine. Reports medians and minima; the warm-up call is reported as
    ``first_call_s`` (for compiled variants it includes compilation).
    """
    out: dict[str, dict[str, Any]] = {}
    for name, fn in variants.items():
        first, _, _ = _timed(fn)
        out[name] = {"first_call_s": first, "times_s": [], "peaks": []}
    for _ in range(repeats):
        for name, fn in variants.items():
            elapsed, peak, size = _timed(fn)
            out[name]["times_s"].append(elapsed)
            if peak is not None:
                out[name]["peaks"].append(peak)
            out[name]["result_bytes"] = size
    for m in out.values():
        m["median_s"] = statistics.median(m["times_s"])
        m["min_s"] = min(m["times_s"])
        peaks = m.pop("peaks")
        m["peak_bytes"] = max(peaks) if peaks else None
    return out


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores_available": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_1min": _loadavg(),
    }


def _loadavg() -> float | None:
    """Other processes on the same cores skew every figure; the load average says if there were any."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------


def torch_block_mask(invisible_from: torch.Tensor, compile: bool) -> BlockMask:
    """The BlockMask as torch builds it: ``create_block_mask`` evaluating our ``mask_mod``."""
    batch, length = invisible_from.shape
    return create_block_mask(
        make_mask_mod(invisible_from), B=batch, H=None, Q_LEN=length, KV_LEN=length, device="cpu", _compile=compile
    )


def same_block_mask(a: BlockMask, b: BlockMask) -> bool:
    """Same partial and full blocks (indices compared where they are in use)."""
    for num in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        if not torch.equal(getattr(a, num), getattr(b, num)):
            return False
    for num, idx in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        used = torch.arange(getattr(a, idx).shape[-1]) < getattr(a, num)[..., None]
        if not torch.equal(getattr(a, idx)[used], getattr(b, idx)[used]):
            return False
    return True


def bench_masks(batch: int, length: int, repeats: int, compiled: bool) -> dict[str, Any]:
    seqs = memento_batch(batch, length, seed=0, prompt_len=min(200, length // 8), answer_len=min(32, length // 16))
    mb = build_batch(seqs, SPECIALS, MEMENTO)
    inv = mb.invisible_from
    dense = mb.dense()  # input of the "conversion only" variants

    def decided() -> torch.Tensor:
        return build_batch(seqs, SPECIALS, MEMENTO).invisible_from

    variants: dict[str, Callable[[], Any]] = {
        "decision": lambda: build_batch(seqs, SPECIALS, MEMENTO),
        "dense_only": mb.dense,
        "dense_e2e": lambda: build_batch(seqs, SPECIALS, MEMENTO).dense(),
        "additive_only": partial(additive_mask, dense),
        "additive_e2e": lambda: build_batch(seqs, SPECIALS, MEMENTO).additive(),
        "block_ours_e2e": lambda: make_block_mask(decided()),
        "block_torch_eager_e2e": lambda: torch_block_mask(decided(), compile=False),
    }
    if compiled:
        variants["block_torch_compiled_e2e"] = lambda: torch_block_mask(decided(), compile=True)

    print(f"  {len(variants)} variants x ({repeats} repeats + 1 warm-up), interleaved ...", flush=True)
    results: dict[str, Any] = measure(variants, repeats)
    for key in ("block_ours_e2e", "block_torch_eager_e2e", "block_torch_compiled_e2e"):
        if key in results:  # what the BlockMask's mask_mod reads
            results[key]["result_bytes"] += nbytes(inv)

    print("  checks ...", flush=True)
    ours = make_block_mask(inv)
    reference = torch_block_mask(inv, compile=False)
    results["block_ours_equals_torch"] = same_block_mask(ours, reference)
    if compiled:
        results["block_compiled_equals_eager"] = same_block_mask(reference, torch_block_mask(inv, compile=True))
    results["block_sparsity_pct"] = float(ours.sparsity())
    del ours, reference, dense
    gc.collect()
    return results


# ----------------------------------------------------------------------------------------------
# The attention op
# ----------------------------------------------------------------------------------------------


def bench_attention(batch: int, length: int, heads: int, head_dim: int, repeats: int, compiled: bool) -> dict[str, Any]:
    seqs = memento_batch(batch, length, seed=1, prompt_len=min(64, length // 8), answer_len=min(32, length // 16))
    mb = build_batch(seqs, SPECIALS, MEMENTO)
    vanilla = build_batch(seqs, SPECIALS, VANILLA)
    dense, additive = mb.dense(), mb.additive()
    block_mask = make_block_mask(mb.invisible_from)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=gen) for _ in range(3))

    outs: dict[str, torch.Tensor] = {}

    def run(name: str, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with torch.no_grad():
                out = fn()
            outs[name] = out
            return out

        return call

    variants = {
        "sdpa_causal": run("sdpa_causal", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        "sdpa_dense_bool": run("sdpa_dense_bool", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)),
        "sdpa_additive": run("sdpa_additive", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive)),
        "flex_eager": run("flex_eager", lambda: flex_attention(q, k, v, block_mask=block_mask)),
    }
    if compiled:
        flex_compiled = torch.compile(flex_attention, dynamic=False)
        variants["flex_compiled"] = run("flex_compiled", lambda: flex_compiled(q, k, v, block_mask=block_mask))
    res: dict[str, Any] = measure(variants, repeats)

    ref = outs["sdpa_dense_bool"]
    res["max_abs_diff_vs_sdpa_dense"] = {
        name: float((out - ref).abs().max()) for name, out in outs.items() if name != "sdpa_causal"
    }
    # The vanilla (keep_last_n=-1) dense mask reproduces is_causal.
    vanilla_out = F.scaled_dot_product_attention(q, k, v, attn_mask=vanilla.dense())
    res["max_abs_diff_vanilla_mask_vs_is_causal"] = float((vanilla_out - outs["sdpa_causal"]).abs().max())
    res["evictions_change_output"] = float((ref - outs["sdpa_causal"]).abs().max())
    return res


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_b(b: int | None) -> str:
    if b is None:
        return "-"
    if b >= GIB:
        return f"{b / GIB:.2f} GiB"
    if b >= MIB:
        return f"{b / MIB:.1f} MiB"
    return f"{b / 1024:.1f} KiB"


def _fmt_ratio(x: float) -> str:
    return f"{x:.0f}x" if x >= 10 else f"{x:.2f}x"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


def report_masks(r: dict[str, Any], batch: int, length: int) -> None:
    dense_t = r["dense_e2e"]["median_s"]
    dense_b = r["dense_e2e"]["result_bytes"]
    labels = [
        ("decision", "visibility decision only (build_batch: tracker + collation)"),
        ("dense_only", "dense bool materialisation only (MaskBatch.dense)"),
        ("dense_e2e", "(a) dense bool (B,1,L,L), end to end"),
        ("additive_only", "additive float32 conversion only (additive_mask)"),
        ("additive_e2e", "(b) additive float32 (B,1,L,L), end to end"),
        ("block_ours_e2e", "(c) BlockMask, ours (make_block_mask, per tile), end to end"),
        ("block_torch_eager_e2e", "(c') BlockMask, torch create_block_mask eager, end to end"),
        ("block_torch_compiled_e2e", "(c'') BlockMask, torch create_block_mask compiled, end to end"),
    ]
    rows = []
    for key, label in labels:
        if key not in r:
            continue
        m = r[key]
        rows.append(
            [
                label,
                f"{_fmt_s(m['median_s'])} ({_fmt_s(m['min_s'])})",
                _fmt_ratio(dense_t / m["median_s"]),
                _fmt_s(m["first_call_s"]),
                _fmt_b(m["result_bytes"]),
                _fmt_b(m["peak_bytes"]),
                _fmt_ratio(dense_b / m["result_bytes"]) if m["result_bytes"] else "-",
            ]
        )
    print_table(
        f"Mask construction, B={batch}, L={length} (medians; ratio = dense end-to-end / this)",
        ["variant", "median (min)", "dense/this", "first call", "result", "peak RSS growth", "dense bytes/this"],
        rows,
    )
    ours = r["block_ours_e2e"]["median_s"]
    ratios = [f"ours vs torch eager create_block_mask: {r['block_torch_eager_e2e']['median_s'] / ours:.0f}x faster"]
    if "block_torch_compiled_e2e" in r:
        ratios.append(f"vs torch compiled: {r['block_torch_compiled_e2e']['median_s'] / ours:.1f}x faster")
    print("\nBlockMask " + "; ".join(ratios))
    print(
        f"checks: our BlockMask == torch's: {r['block_ours_equals_torch']}"
        + (f"; compiled == eager: {r['block_compiled_equals_eager']}" if "block_compiled_equals_eager" in r else "")
        + f"; tiles skipped {r['block_sparsity_pct']:.1f}%"
    )


def report_attention(r: dict[str, Any], batch: int, length: int, heads: int, head_dim: int) -> None:
    base = r["sdpa_causal"]["median_s"]
    labels = [
        ("sdpa_causal", "SDPA is_causal (no mask; reference speed)"),
        ("sdpa_dense_bool", "SDPA + dense bool memento mask"),
        ("sdpa_additive", "SDPA + additive float memento mask"),
        ("flex_eager", "flex_attention + BlockMask, eager"),
        ("flex_compiled", "flex_attention + BlockMask, torch.compile"),
    ]
    rows = []
    for key, label in labels:
        if key not in r:
            continue
        m = r[key]
        diff = r["max_abs_diff_vs_sdpa_dense"].get(key)
        rows.append(
            [
                label,
                f"{_fmt_s(m['median_s'])} ({_fmt_s(m['min_s'])})",
                f"{m['median_s'] / base:.2f}x",
                _fmt_s(m["first_call_s"]),
                "-" if diff is None else f"{diff:.1e}",
            ]
        )
    print_table(
        f"Attention op, B={batch}, H={heads}, L={length}, head_dim={head_dim}, float32 (medians)",
        ["op", "median (min)", "this/causal", "first call", "max |diff| vs SDPA dense"],
        rows,
    )
    print(
        f"\nchecks: vanilla (keep_last_n=-1) dense mask vs is_causal max |diff| "
        f"{r['max_abs_diff_vanilla_mask_vs_is_causal']:.1e}; memento mask vs is_causal max |diff| "
        f"{r['evictions_change_output']:.2f} (evictions change the output)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per variant (after one warm-up call)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--warm-cache", action="store_true", help="reuse inductor's on-disk cache (compile times not cold)")
    p.add_argument("--attn-batch", type=int, default=4)
    p.add_argument("--attn-length", type=int, default=1024)
    p.add_argument("--attn-heads", type=int, default=4)
    p.add_argument("--attn-head-dim", type=int, default=32)
    p.add_argument("--skip-attention", action="store_true")
    p.add_argument("--json", metavar="PATH", help="also write all figures as JSON ('-' for stdout)")
    args = p.parse_args(argv)

    info = machine_info()
    print(
        f"machine: {info['cpu']}, {info['cores_available']} cores available, torch threads "
        f"{info['torch_threads']}, torch {info['torch']}, CUDA {info['cuda']}, Python {info['python']}, "
        f"1-min load average at start {info['loadavg_1min']}"
    )
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    compiled = not args.no_compile
    t0 = time.perf_counter()
    print(f"\nmask construction, B={args.batch}, L={args.length}, {args.repeats} repeats:", flush=True)
    masks = bench_masks(args.batch, args.length, args.repeats, compiled)
    out: dict[str, Any] = {"machine": info, "args": vars(args), "masks": masks}
    attention = None
    if not args.skip_attention:
        print("\nattention op:", flush=True)
        attention = bench_attention(
            args.attn_batch, args.attn_length, args.attn_heads, args.attn_head_dim, max(args.repeats, 10), compiled
        )
        out["attention"] = attention
    out["total_s"] = time.perf_counter() - t0

    report_masks(masks, args.batch, args.length)
    if attention is not None:
        report_attention(attention, args.attn_batch, args.attn_length, args.attn_heads, args.attn_head_dim)
    out["loadavg_1min_end"] = _loadavg()
    print(f"\ntotal benchmark time {out['total_s']:.0f} s; 1-min load average at the end {out['loadavg_1min_end']}")
    if args.json:
        text = json.dumps(out, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
