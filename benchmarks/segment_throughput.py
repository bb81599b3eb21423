"""Segmentation throughput: how long the exact segmenter takes for a run the size of OpenMementos.

228K traces of ~190 sentences (~10,900 tokens) each. Real scores are not available offline, so
traces are drawn from distributions around the paper's statistics (sentence lengths log-normal,
~57 tokens on average; gap scores the average of two 0-3 passes) under several score mixes, and
timed on ``--workers`` processes (the machine's cores). The figure is extrapolated to 228K traces.

    .venv/bin/python benchmarks/segment_throughput.py
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import time

import numpy as np

from memento.data.segment import segment

MIXES = {
    # P(score 0..3) of one pass; the second pass agrees or differs by one.
    "mostly weak (realistic guess)": [0.45, 0.30, 0.17, 0.08],
    "uniform": [0.25, 0.25, 0.25, 0.25],
    "almost no transitions": [0.80, 0.15, 0.04, 0.01],
}
OPENMEMENTOS_TRACES = 228_557


def make_trace(rng: np.random.Generator, n: int, mix: list[float]) -> tuple[list[int], list[float]]:
    tokens = np.maximum(5, rng.lognormal(np.log(47), 0.6, n)).astype(int)
    first = rng.choice(4, n - 1, p=mix)
    second = np.clip(first + rng.choice([-1, 0, 0, 1], n - 1), 0, 3)
    return tokens.tolist(), ((first + second) / 2).tolist()


def _run(job: tuple[list[int], list[float], float, int, int | None, str]) -> int:
    tokens, scores, lam, min_blocks, max_blocks, norm = job
    result = segment(
        tokens, scores, lam=lam, min_block_tokens=200, min_blocks=min_blocks, max_blocks=max_blocks, score_norm=norm
    )
    return len(result.blocks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=2000, help="traces timed per mix")
    parser.add_argument("--sentences", type=int, default=190)
    parser.add_argument("--lam", type=float, default=0.5)
    parser.add_argument("--min-blocks", type=int, default=1, help="e.g. 10: the release's 10-20 blocks per trace")
    parser.add_argument("--max-blocks", type=int, default=None, help="e.g. 20 (with --min-blocks 10)")
    parser.add_argument("--score-norm", default="blocks", help="blocks (the release, the default) or cuts")
    parser.add_argument("--workers", type=int, default=multiprocessing.cpu_count())
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    report = {
        "machine": f"{platform.machine()}, {args.workers} workers",
        "lam": args.lam,
        "min_blocks": args.min_blocks,
        "max_blocks": args.max_blocks,
        "score_norm": args.score_norm,
        "mixes": {},
    }
    with multiprocessing.Pool(args.workers) as pool:
        pool.map(
            _run,
            [
                (
                    *make_trace(rng, args.sentences, MIXES["uniform"]),
                    args.lam,
                    args.min_blocks,
                    args.max_blocks,
                    args.score_norm,
                )
            ]
            * args.workers,
        )  # warm-up
        for name, mix in MIXES.items():
            jobs = [
                (*make_trace(rng, args.sentences, mix), args.lam, args.min_blocks, args.max_blocks, args.score_norm)
                for _ in range(args.traces)
            ]
            start = time.perf_counter()
            blocks = pool.map(_run, jobs, chunksize=16)
            seconds = time.perf_counter() - start
            full = seconds / args.traces * OPENMEMENTOS_TRACES
            report["mixes"][name] = {
                "traces": args.traces,
                "seconds": seconds,
                "ms_per_trace_wall": 1000 * seconds / args.traces,
                "median_blocks": float(np.median(blocks)),
                "openmementos_minutes": full / 60,
            }
            print(
                f"{name}: {1000 * seconds / args.traces:.2f} ms/trace on {args.workers} workers, "
                f"median {np.median(blocks):.0f} blocks -> 228K traces in {full / 60:.1f} min"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
