"""Stage 3 of the OpenMementos pipeline: cut a trace's sentences into blocks, exactly.

The objective: choose the number of blocks K and the cuts to maximise

    (sum of the chosen cut scores) / K - lam * std(block sizes) / mean(block sizes)

with every block at least ``min_block_tokens`` long (sizes in tokens, std with ddof=0). That is the
release's (``data/pipeline/segment.py``; its end-to-end script: lam 0.5, K unconstrained, blocks of
200+ tokens), the default here (``score_norm="blocks"``). The paper's text states the score term as
the mean of the chosen cut scores, dividing by K - 1 (``score_norm="cuts"``): that favours very few
blocks (2-3 on real traces). The release keeps one best state per (sentence, block count), which is
not exact: the coefficient-of-variation term does not add up over blocks.

Exactness here: the mean block size is T / K (T, the trace's tokens, is fixed), so for a given K
the penalty depends only on Q = sum of squared block sizes, CV = sqrt(K * Q / T**2 - 1), and the
score term only on S = the sum of the chosen cut scores. The objective rises with S and falls with
Q, and both add up over blocks, so among partial solutions with the same (end, block count, S)
the one with the least Q dominates. Scores are on a grid (averages of two 0-3 passes: multiples of
0.5), so S takes few values and a dynamic programme over (end, K, S) keeping the least Q is exact.
Block counts are tried in increasing order and the search stops once an upper bound (the best
mean score K - 1 cuts could have, with no penalty) cannot beat the best objective found: the
bound only falls as K grows.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SCORE_NORMS = ("cuts", "blocks")


@dataclass(frozen=True)
class Segmentation:
    """The chosen blocks: inclusive (first, last) sentence indices, as the release writes them."""

    blocks: tuple[tuple[int, int], ...]
    objective: float
    mean_score: float
    cv: float

    @property
    def cuts(self) -> tuple[int, ...]:
        """Gap indices cut: gap g lies between sentence g and sentence g + 1."""
        return tuple(last for _, last in self.blocks[:-1])


def objective(
    token_counts: Sequence[int],
    gap_scores: Sequence[float],
    cuts: Sequence[int],
    *,
    lam: float = 0.5,
    score_norm: str = "blocks",
) -> tuple[float, float, float]:
    """(objective, score term, CV) of one set of cuts (gap indices), straight from the definition."""
    bounds = [0, *(g + 1 for g in sorted(cuts)), len(token_counts)]
    sizes = np.array([sum(token_counts[a:b]) for a, b in itertools.pairwise(bounds)], dtype=float)
    k = len(sizes)
    chosen = [gap_scores[g] for g in cuts]
    per = len(chosen) if score_norm == "cuts" else k
    score = sum(chosen) / per if per else 0.0
    cv = float(sizes.std() / sizes.mean()) if sizes.mean() > 0 else 0.0
    return score - lam * cv, score, cv


def _check(token_counts, gap_scores, lam, min_block_tokens, score_norm, resolution) -> np.ndarray:
    n = len(token_counts)
    if n == 0:
        raise ValueError("no sentences to segment")
    if len(gap_scores) != n - 1:
        raise ValueError(f"{n} sentences need {n - 1} gap scores, got {len(gap_scores)}")
    if any(t < 0 for t in token_counts):
        raise ValueError("token counts must be >= 0")
    if score_norm not in SCORE_NORMS:
        raise ValueError(f"score_norm must be one of {SCORE_NORMS}, got {score_norm!r}")
    if lam < 0 or min_block_tokens < 0 or resolution <= 0:
        raise ValueError("lam and min_block_tokens must be >= 0 and resolution > 0")
    units = np.zeros(n + 1, dtype=np.int64)  # units[c]: the score of a cut before sentence c, in resolution steps
    for g, score in enumerate(gap_scores):
        value = 0.0 if score is None else float(score)
        steps = value / resolution
        if value < 0 or not math.isclose(steps, round(steps), abs_tol=1e-9):
            raise ValueError(
                f"gap score {score!r} (gap {g}) is not a non-negative multiple of {resolution}: "
                "pass resolution= to match the scores"
            )
        units[g + 1] = round(steps)
    return units


def segment(
    token_counts: Sequence[int],
    gap_scores: Sequence[float | None],
    *,
    lam: float = 0.5,
    min_block_tokens: int = 200,
    score_norm: str = "blocks",
    resolution: float = 0.5,
    max_blocks: int | None = None,
    min_blocks: int = 1,
    prune: bool = True,
) -> Segmentation:
    """The exact optimum of the objective (missing scores, None, count as 0: no boundary seen).

    ``max_blocks`` caps K (None: as many as ``min_block_tokens`` allows); ``min_blocks`` asks for at
    least that many (as many as fit when the trace is too short: K is clamped to what the minimum
    block size allows). A trace shorter than ``min_block_tokens`` is one block. Ties go to fewer
    blocks. ``prune=False`` switches the bounds off (the same optimum, slower: a check on them).
    """
    units = _check(token_counts, gap_scores, lam, min_block_tokens, score_norm, resolution)
    n = len(token_counts)
    prefix = np.concatenate([[0], np.cumsum(np.asarray(token_counts, dtype=np.float64))])
    total = prefix[-1]
    single = Segmentation(((0, n - 1),), 0.0, 0.0, 0.0)
    if n == 1 or (min_block_tokens > 0 and total < 2 * min_block_tokens):
        return single
    k_limit = n if max_blocks is None else min(n, max_blocks)
    if min_block_tokens > 0:
        k_limit = min(k_limit, int(total // min_block_tokens))
    if min_blocks < 1:
        raise ValueError(f"min_blocks must be >= 1, got {min_blocks}")
    k_least = min(min_blocks, max(k_limit, 1))

    # Upper bound on the score term with K blocks: the best K - 1 gaps, no size penalty.
    top = np.sort(units[1:n])[::-1] * resolution
    top_unit = int(units[1:n].max()) if n > 1 else 0
    best_sums = np.concatenate([[0.0], np.cumsum(top)])

    def bound(k: int) -> float:
        return best_sums[k - 1] / ((k - 1) if score_norm == "cuts" else k)

    # The best any K' >= K could reach (with "blocks" the bound can rise with K: take the suffix max).
    reach = [0.0] * (k_limit + 2)
    for k in range(k_limit, 1, -1):
        reach[k] = max(bound(k), reach[k + 1])

    ends = np.arange(n + 1)
    # valid[c2, c]: a block [c, c2) is long enough (c < c2).
    length = prefix[None, :] - prefix[:, None]  # length[c, c2] = tokens of [c, c2)
    valid_block = (length >= max(min_block_tokens, 1e-12)) & (ends[:, None] < ends[None, :])
    sq = np.where(valid_block, length**2, np.inf)  # sq[c, c2]
    sq_by_end = np.ascontiguousarray(sq.T)  # sq_by_end[c2, c]

    # dp[c, S - lo] = least Q over partitions of [0, c) into k blocks whose k - 1 inner cuts score S
    # units. Only a window of S is kept: [lo, lo + width); the pruning below moves lo up.
    dp = np.full((n + 1, 1), np.inf)
    dp[:, 0] = sq[0, :]  # one block [0, c)
    lo = 0
    levels: list[tuple[np.ndarray, int]] = []  # per k >= 2: (parent[c2, S - lo] = start of the last block, lo)
    best = single if k_least <= 1 else Segmentation(single.blocks, -math.inf, 0.0, 0.0)
    if prune and k_least > 1:  # a feasible solution to start from, so the bounds bite from the first level
        best = max(
            (
                _evenly_cut(token_counts, units, prefix, k_least, w, lam, min_block_tokens, score_norm, resolution)
                for w in (0, 2, 5)
            ),
            key=lambda seg: seg.objective,
            default=best,
        )
        best = _hill_climb(best, token_counts, units, prefix, lam, min_block_tokens, score_norm, resolution)
    bound_inputs = _BoundInputs(
        remaining=total - prefix,
        sentences_left=n - ends,
        total=total,
        best_sums=best_sums,
        reach=np.asarray(reach),
        k_least=k_least,
        k_limit=k_limit,
        lam=lam,
        min_block_tokens=min_block_tokens,
        score_norm=score_norm,
        resolution=resolution,
    )
    for k in range(2, k_limit + 1):
        if prune and reach[k] < best.objective - 1e-12:
            break
        # Prune partial solutions that cannot beat the best found: a final K' >= k adds at most
        # (K' - k) cuts of the top score, and must reach best * (K' - 1) in total (cuts norm; K' for
        # the blocks norm). The loosest K' is the largest one still worth trying.
        last_k = max((kk for kk in range(k, k_limit + 1) if reach[kk] >= best.objective - 1e-12), default=k)
        denominator = (last_k - 1) if score_norm == "cuts" else last_k
        needed = best.objective * denominator - resolution * top_unit * (last_k - k) - 1e-9 if prune else 0.0
        needed = needed if math.isfinite(needed) else 0.0
        width = dp.shape[1]
        starts = np.flatnonzero(np.isfinite(dp).any(axis=1) & (ends > 0) & (ends < n))
        if starts.size == 0:
            break
        shifts = units[starts]
        new_lo = max(lo + int(shifts.min()), math.ceil(needed / resolution) if needed > 0 else 0)
        new_hi = lo + width - 1 + int(shifts.max())
        if new_hi < new_lo:
            break
        # shifted[i, S - new_lo] = dp[starts[i], S - shifts[i] - lo]: the cut before the new block adds its score.
        columns = np.arange(new_lo, new_hi + 1)[None, :] - shifts[:, None] - lo
        inside = (columns >= 0) & (columns < width)
        shifted = np.where(inside, dp[starts[:, None], np.clip(columns, 0, width - 1)], np.inf)
        # (end, S, start) -> Q, the start axis last and contiguous: the reduction runs along memory.
        cost = sq_by_end[:, starts][:, None, :] + shifted.T[None, :, :]
        choice = cost.argmin(axis=2)
        dp = np.take_along_axis(cost, choice[:, :, None], axis=2)[:, :, 0]
        lo = new_lo
        levels.append((np.where(np.isfinite(dp), starts[choice], -1).astype(np.int32), lo))
        finals = dp[n]
        reachable = np.flatnonzero(np.isfinite(finals))
        if reachable.size and k >= k_least:
            scores = (reachable + lo) * resolution
            score_term = scores / ((k - 1) if score_norm == "cuts" else k)
            cv = np.sqrt(np.maximum(k * finals[reachable] / total**2 - 1.0, 0.0))
            values = score_term - lam * cv
            i = int(np.argmax(values))
            if values[i] > best.objective + 1e-12:
                blocks = _backtrack(levels, n, k, int(reachable[i]) + lo, units)
                best = Segmentation(blocks, float(values[i]), float(score_term[i]), float(cv[i]))
        if prune and math.isfinite(best.objective):
            dp, lo = _drop_hopeless(dp, lo, k, best.objective, bound_inputs)
    return best


@dataclass(frozen=True)
class _BoundInputs:
    """What the size bound needs about a trace (fixed for the whole search)."""

    remaining: np.ndarray  # tokens after each end c: T - prefix[c]
    sentences_left: np.ndarray  # n - c
    total: float
    best_sums: np.ndarray  # best_sums[m]: the m best gap scores together
    reach: np.ndarray  # reach[K]: the best score term any K' >= K could have
    k_least: int
    k_limit: int
    lam: float
    min_block_tokens: int
    score_norm: str
    resolution: float


def _drop_hopeless(dp: np.ndarray, lo: int, k: int, best: float, b: _BoundInputs) -> tuple[np.ndarray, int]:
    """Forget partial solutions (k blocks ending at c, cut score S, least Q) that cannot beat ``best``.

    Finished with K' > k blocks, such a state adds m = K' - k blocks over the R = T - prefix[c]
    tokens left, so Q grows by at least R**2 / m (equal blocks), and S by at most the m best gap
    scores. Its objective is then at most  (S + top_m) / den - lam * sqrt(K' (Q + R**2 / m) / T**2 - 1),
    which is below ``best`` unless  Q <= (slack**2 + 1) T**2 / K' - R**2 / m  for some K', with
    slack = ((S + top_m) / den - best) / lam >= 0. This is the bound that makes a forced block count
    (the release's 10-20 blocks) fast: uneven partial solutions die early. Returns the trimmed
    ``dp`` window and its new ``lo``.
    """
    finals = np.arange(k + 1, b.k_limit + 1)
    finals = finals[(finals >= b.k_least) & (b.reach[finals] >= best - 1e-12)]
    if finals.size == 0:
        return np.full((dp.shape[0], 1), np.inf), lo
    m = finals - k
    den = (finals - 1) if b.score_norm == "cuts" else finals
    s_values = (np.arange(dp.shape[1]) + lo) * b.resolution
    score = (s_values[None, :] + b.best_sums[m][:, None]) / den[:, None]  # (K', S)
    room = np.maximum(b.min_block_tokens, 1e-12) * m[:, None]
    fits = (b.remaining[None, :] >= room) & (b.sentences_left[None, :] >= m[:, None])  # (K', c)
    if b.lam == 0:
        hopeful = (fits[:, :, None] & (score[:, None, :] >= best - 1e-12)).any(axis=0)
        dp = np.where(hopeful, dp, np.inf)
    else:
        slack = (score - best) / b.lam
        q_room = np.where(slack >= -1e-12, (np.maximum(slack, 0.0) ** 2 + 1) * b.total**2 / finals[:, None], -np.inf)
        q_rest = np.where(fits, b.remaining[None, :] ** 2 / m[:, None], np.inf)
        limit = (q_room[:, None, :] - q_rest[:, :, None]).max(axis=0)  # (c, S): the largest Q that may still win
        margin = 1e-6 + 1e-9 * np.abs(np.where(np.isfinite(limit), limit, 0.0))  # rounding in the bound
        dp = np.where(dp <= limit + margin, dp, np.inf)
    columns = np.flatnonzero(np.isfinite(dp).any(axis=0))
    if columns.size == 0:
        return np.full((dp.shape[0], 1), np.inf), lo
    return dp[:, columns[0] : columns[-1] + 1], lo + int(columns[0])


def _evenly_cut(token_counts, units, prefix, k, window, lam, min_block_tokens, score_norm, resolution) -> Segmentation:
    """A quick feasible K-block solution: near each K-th of the tokens, the best-scored gap within
    ``window`` sentences (objective -inf when it breaks the minimum block size)."""
    n = len(token_counts)
    total = prefix[-1]
    cuts = []
    for j in range(1, k):
        ideal = int(np.searchsorted(prefix, total * j / k))
        lo, hi = max(1, ideal - window), min(n - 1, ideal + window)
        if lo > hi:
            return Segmentation(((0, n - 1),), -math.inf, 0.0, 0.0)
        cuts.append(max(range(lo, hi + 1), key=lambda c: (units[c], -abs(c - ideal))))
    cuts = sorted(set(cuts))
    bounds = [0, *cuts, n]
    sizes = [prefix[b] - prefix[a] for a, b in itertools.pairwise(bounds)]
    if len(cuts) != k - 1 or min(sizes) < min_block_tokens:
        return Segmentation(((0, n - 1),), -math.inf, 0.0, 0.0)
    value, score, cv = objective(
        token_counts, [u * resolution for u in units[1:n]], [c - 1 for c in cuts], lam=lam, score_norm=score_norm
    )
    return Segmentation(tuple((a, b - 1) for a, b in itertools.pairwise(bounds)), value, score, cv)


def _hill_climb(start, token_counts, units, prefix, lam, min_block_tokens, score_norm, resolution) -> Segmentation:
    """Move one cut at a time to its best place between its neighbours until no move helps.

    Only a better feasible solution to prune with: the search stays exact whatever this returns,
    but the closer it starts to the optimum, the more partial solutions the bounds discard.
    """
    if not math.isfinite(start.objective) or len(start.blocks) < 2:
        return start
    n = len(token_counts)
    total = prefix[-1]
    bounds = [0, *(last + 1 for _, last in start.blocks[:-1]), n]  # bounds[j]: first sentence of block j
    k = len(bounds) - 1
    den = (k - 1) if score_norm == "cuts" else k
    floor = max(min_block_tokens, 1e-12)
    s_units = int(sum(units[c] for c in bounds[1:-1]))
    q = float((np.diff(prefix[bounds]) ** 2).sum())
    current = s_units * resolution / den - lam * math.sqrt(max(k * q / total**2 - 1.0, 0.0))
    improved = True
    while improved:
        improved = False
        for j in range(1, k):
            left, cut, right = bounds[j - 1], bounds[j], bounds[j + 1]
            places = np.arange(left + 1, right)
            a, b = prefix[places] - prefix[left], prefix[right] - prefix[places]
            q_new = q - (prefix[cut] - prefix[left]) ** 2 - (prefix[right] - prefix[cut]) ** 2 + a**2 + b**2
            s_new = s_units - units[cut] + units[places]
            values = s_new * resolution / den - lam * np.sqrt(np.maximum(k * q_new / total**2 - 1.0, 0.0))
            values = np.where((a >= floor) & (b >= floor), values, -np.inf)
            i = int(np.argmax(values))
            if values[i] > current + 1e-12:
                bounds[j], q, s_units, current = int(places[i]), float(q_new[i]), int(s_new[i]), float(values[i])
                improved = True
    cuts = [c - 1 for c in bounds[1:-1]]
    value, score, cv = objective(
        token_counts, [u * resolution for u in units[1:n]], cuts, lam=lam, score_norm=score_norm
    )
    blocks = tuple((a, b - 1) for a, b in itertools.pairwise(bounds))
    return Segmentation(blocks, value, score, cv) if value > start.objective else start


def _backtrack(levels: list[tuple[np.ndarray, int]], n: int, k: int, s_units: int, units: np.ndarray) -> tuple:
    """Blocks of the optimum with k blocks ending at n whose cuts score ``s_units``."""
    starts = []
    end, s = n, s_units
    for level in range(k, 1, -1):
        parent, lo = levels[level - 2]
        c = int(parent[end, s - lo])
        starts.append(c)
        s -= int(units[c])
        end = c
    cuts = sorted(starts)
    bounds = [0, *cuts, n]
    return tuple((a, b - 1) for a, b in itertools.pairwise(bounds))
