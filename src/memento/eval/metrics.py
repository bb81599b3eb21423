"""Accuracy over k samples per problem (pass@1, unbiased pass@k, maj@k) and KV summaries.

pass@k is the unbiased estimator of Chen et al. (2021): with ``n`` samples of which ``c`` are
correct, the chance that ``k`` drawn without replacement include a correct one,
``1 - C(n - c, k) / C(n, k)``. maj@k is the chance that the most common answer among ``k`` samples
is correct, ties broken uniformly at random (as the paper does). Both are exact expectations over
the k-subsets (enumerated when there are few, else a fixed-seed sample), not one random draw, so
they do not move between runs.

Intervals are 95% and over problems, the unit that was sampled: :func:`wilson_interval` for pass@1
(with k samples a problem contributes its mean accuracy, whose variance is at most that of one
Bernoulli draw, so the interval is conservative), :func:`paired_difference_interval` for the
difference between two runs on the same problems.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Sequence

MAX_SUBSETS = 2000
"""k-subsets enumerated for maj@k before a seeded sample of this many is used instead."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: ``n`` samples, ``c`` correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= correct <= samples, got {c} of {n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= samples ({n}), got k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(keys: Sequence[str | None], correct: Sequence[bool]) -> float:
    """Chance that a uniform pick among the most common answers is correct.

    ``keys`` group equivalent answers (see :class:`memento.eval.grading.Grade`); a sample without
    an answer (``None``) does not vote. No votes at all: 0.
    """
    if len(keys) != len(correct):
        raise ValueError(f"{len(keys)} answers but {len(correct)} grades")
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    leaders = [key for key, count in votes.items() if count == top]
    right = {key for key, ok in zip(keys, correct, strict=True) if key is not None and ok}
    return sum(key in right for key in leaders) / len(leaders)


def maj_at_k(keys: Sequence[str | None], correct: Sequence[bool], k: int, seed: int = 0) -> float:
    """maj@k for one problem: the expected :func:`majority_correct` over k-subsets of its samples."""
    n = len(keys)
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= samples ({n}), got k={k}")
    if k == n:
        return majority_correct(keys, correct)
    if math.comb(n, k) <= MAX_SUBSETS:
        subsets: list[tuple[int, ...]] | list[list[int]] = list(itertools.combinations(range(n), k))
    else:
        rng = random.Random(seed)
        subsets = [rng.sample(range(n), k) for _ in range(MAX_SUBSETS)]
    total = sum(majority_correct([keys[i] for i in s], [correct[i] for i in s]) for s in subsets)
    return total / len(subsets)


def accuracy_summary(samples: Sequence[Sequence[tuple[str | None, bool]]], ks: Sequence[int]) -> dict[str, float]:
    """pass@1, pass@k and maj@k averaged over problems; ``samples[p]`` holds (key, correct) per sample.

    Every problem must have the same number of samples; k larger than that is skipped, and so is
    k = 1 (pass@1 is always there; maj@1 would only repeat it).
    """
    if not samples:
        raise ValueError("no problems to summarise")
    sizes = {len(s) for s in samples}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"every problem needs the same, non-zero number of samples, got {sorted(sizes)}")
    n = sizes.pop()
    out: dict[str, float] = {}
    out["pass@1"] = _mean(sum(ok for _, ok in s) / n for s in samples)
    for k in sorted(set(ks)):
        if 2 <= k <= n:
            out[f"pass@{k}"] = _mean(pass_at_k(n, sum(ok for _, ok in s), k) for s in samples)
            out[f"maj@{k}"] = _mean(maj_at_k([key for key, _ in s], [ok for _, ok in s], k) for s in samples)
    return out


Z95 = 1.959963984540054
"""The two-sided 95% normal quantile."""


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion ``p`` observed over ``n`` units.

    Unlike the normal interval it stays inside [0, 1] and does not shrink to a point at 0% or 100%
    (200 problems all right: [98.1%, 100%]), which is where the demo's accuracies sit.
    """
    if n < 1:
        raise ValueError(f"need at least one problem, got {n}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"a proportion is in [0, 1], got {p}")
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if p == 0.0 else max(0.0, centre - half)  # exact ends: no rounding residue at 0% / 100%
    high = 1.0 if p == 1.0 else min(1.0, centre + half)
    return low, high


def problem_accuracies(samples: Sequence[Sequence[bool]]) -> list[float]:
    """Each problem's mean accuracy over its samples."""
    if not samples or any(not s for s in samples):
        raise ValueError("every problem needs at least one sample")
    return [sum(s) / len(s) for s in samples]


def pass_at_1_interval(samples: Sequence[Sequence[bool]]) -> tuple[float, float]:
    """95% interval of pass@1 over problems (``samples[p]``: the correctness of problem p's samples)."""
    accuracies = problem_accuracies(samples)
    return wilson_interval(sum(accuracies) / len(accuracies), len(accuracies))


def paired_difference_interval(a: Sequence[float], b: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high) of ``a - b`` over problems scored by both (per-problem accuracies, paired).

    The normal interval of a paired mean: both runs answered the same problems, so the problems'
    own difficulty cancels and the interval is narrower than two independent ones. With no
    disagreement at all it is the point itself. Accuracies lie in [0, 1], so the interval is cut to
    [-1, 1] (the normal approximation would run past -100 pp for a run that fails nearly everything).
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"need the same, non-zero number of problems, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n == 1:
        return mean, mean, mean
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = z * sd / math.sqrt(n)
    return mean, max(-1.0, mean - half), min(1.0, mean + half)


def kv_summary(live_kv: Sequence[int]) -> dict[str, int]:
    """Peak and AUC (token-steps: the sum over decode steps) of one request's live KV curve."""
    return {"peak_kv": max(live_kv, default=0), "auc_kv": int(sum(live_kv)), "steps": len(live_kv)}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
