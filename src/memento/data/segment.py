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

Speed comes from bounds that only ever discard what cannot beat the best solution found so far
(``prune=False`` turns them off: the same optimum, slower). A quick starting solution (cuts near
even positions at well-scored gaps, then hill-climbed) makes them bite from the first level:

- *Score caps.* A small DP over (blocks still to come, start) gives the most cut score m more
  blocks can add from each sentence, with every block between the minimum and the longest length
  that can still win. It bounds each final block count K' (a count whose best possible score term
  cannot reach the best objective is never finished) and each partial solution.
- *Longest block.* A K'-block solution beating ``best`` has Q <= (slack**2 + 1) T**2 / K', with
  slack = (score cap - best) / lam, and a block of L tokens forces Q >= L**2 + (T - L)**2 / (K' - 1):
  no block can be longer than the largest L allowed by any live K'. Each level only pairs ends
  with the starts in that band.
- *Size bound.* A partial solution with k blocks, cut score S and least Q, finished with K' > k
  blocks over the R tokens left, ends with Q + R**2 / m at least (m = K' - k equal blocks) and a
  cut score of at most S + its cap: it is dropped when that cannot beat ``best`` for any live K'.
"""

from __future__ import annotations

import dataclasses
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
    if min_blocks < 1:
        raise ValueError(f"min_blocks must be >= 1, got {min_blocks}")
    n = len(token_counts)
    prefix = np.concatenate([[0], np.cumsum(np.asarray(token_counts, dtype=np.float64))])
    total = prefix[-1]
    single = Segmentation(((0, n - 1),), 0.0, 0.0, 0.0)
    if n == 1 or (min_block_tokens > 0 and total < 2 * min_block_tokens):
        return single
    if total == 0:  # every block is empty, CV is 0 by definition: only the scores count
        kwargs = {"score_norm": score_norm, "resolution": resolution, "max_blocks": max_blocks, "prune": prune}
        plain = segment([1] * n, gap_scores, lam=0.0, min_block_tokens=0, min_blocks=min_blocks, **kwargs)
        return dataclasses.replace(plain, cv=0.0)
    k_limit = n if max_blocks is None else min(n, max_blocks)
    if min_block_tokens > 0:
        k_limit = min(k_limit, int(total // min_block_tokens))
    k_least = min(min_blocks, max(k_limit, 1))
    floor = float(min_block_tokens)  # and a block holds at least one sentence (it may have 0 tokens)
    problem = _Problem(units, prefix, lam, floor, score_norm, resolution, k_least, k_limit)

    best = single if k_least <= 1 else Segmentation(single.blocks, -math.inf, 0.0, 0.0)
    bounds = None
    if prune and k_limit >= 2:
        start = _starting_solution(token_counts, problem)
        best = start if start.objective > best.objective else best
        bounds = _Bounds(problem, best.objective)

    ends = np.arange(n + 1)
    length = prefix[None, :] - prefix[:, None]  # length[c, c2] = tokens of [c, c2)
    valid_block = (length >= floor) & (ends[:, None] < ends[None, :])
    sq_by_end = np.ascontiguousarray(np.where(valid_block, length**2, np.inf).T)  # [c2, c]: Q of block [c, c2)

    # dp[c, S - lo] = least Q over partitions of [0, c) into k blocks whose k - 1 inner cuts score S
    # units. Only a window of S is kept: [lo, lo + width); the pruning below moves lo up.
    longest = bounds.longest(np.arange(2, k_limit + 1)) if bounds else math.inf
    dp = np.where(prefix <= longest, sq_by_end[:, 0], np.inf)[:, None]  # one block [0, c)
    lo = 0
    levels: list[tuple[np.ndarray, int]] = []  # per k >= 2: (parent[c2, S - lo] = start of the last block, lo)
    for k in range(2, k_limit + 1):
        live = bounds.live(k, best.objective) if bounds else None
        if live is not None and live.size == 0:
            break
        starts = np.flatnonzero(np.isfinite(dp[1:n]).any(axis=1)) + 1  # ends of k - 1 blocks, before n
        if starts.size == 0:
            break
        width = dp.shape[1]
        shifts = units[starts]
        new_lo = lo + int(shifts.min())
        if bounds:
            new_lo = max(new_lo, bounds.least_units(k, live))
            longest = bounds.longest(live)
        new_hi = lo + width - 1 + int(shifts.max())
        if new_hi < new_lo:
            break
        # shifted[i, S - new_lo] = dp[starts[i], S - shifts[i] - lo]: the cut before the new block adds its score.
        columns = np.arange(new_lo, new_hi + 1)[None, :] - shifts[:, None] - lo
        inside = (columns >= 0) & (columns < width)
        shifted = np.where(inside, dp[starts[:, None], np.clip(columns, 0, width - 1)], np.inf)
        # The starts each end may pair with: blocks from the minimum to the longest length, a band.
        p_starts = prefix[starts]
        first = np.searchsorted(p_starts, prefix - longest, side="left")
        last = np.minimum(np.searchsorted(p_starts, prefix - floor, side="right"), np.searchsorted(starts, ends))
        band = np.maximum(last - first, 0)
        band_width = int(band.max())
        if band_width == 0:
            break
        live_ends = np.flatnonzero(band)
        offsets = np.arange(band_width)
        pick = np.minimum(first[live_ends, None] + offsets, starts.size - 1)  # (end, j) -> index into starts
        block_q = np.where(offsets < band[live_ends, None], sq_by_end[live_ends[:, None], starts[pick]], np.inf)
        cost = block_q[:, :, None] + shifted[pick]  # (end, j, S) -> Q
        choice = cost.argmin(axis=1)
        dp = np.full((n + 1, cost.shape[2]), np.inf)
        dp[live_ends] = np.take_along_axis(cost, choice[:, None, :], axis=1)[:, 0, :]
        parent = np.full(dp.shape, -1, dtype=np.int32)
        parent[live_ends] = starts[np.take_along_axis(pick, choice, axis=1)]
        lo = new_lo
        levels.append((parent, lo))
        finals = dp[n]
        reachable = np.flatnonzero(np.isfinite(finals))
        if reachable.size and k >= k_least:
            score_term = (reachable + lo) * resolution / problem.den(k)
            cv = np.sqrt(np.maximum(k * finals[reachable] / total**2 - 1.0, 0.0))
            values = score_term - lam * cv
            i = int(np.argmax(values))
            if values[i] > best.objective + 1e-12:
                blocks = _backtrack(levels, n, k, int(reachable[i]) + lo, units)
                best = Segmentation(blocks, float(values[i]), float(score_term[i]), float(cv[i]))
                if bounds:
                    bounds.improve(best.objective)
        if bounds:
            dp, lo = bounds.drop_hopeless(dp, lo, k, bounds.live(k + 1, best.objective))
    return best


@dataclass(frozen=True)
class _Problem:
    """One trace's segmentation problem, as the search and its bounds see it."""

    units: np.ndarray  # units[c]: the score of a cut before sentence c, in resolution steps (units[0] = 0)
    prefix: np.ndarray  # prefix[c]: tokens of sentences [0, c)
    lam: float
    floor: float  # the shortest block, in tokens
    score_norm: str
    resolution: float
    k_least: int
    k_limit: int

    @property
    def total(self) -> float:
        return float(self.prefix[-1])

    def den(self, k):
        """What the score sum is divided by with k blocks (works on arrays)."""
        return np.maximum(k - 1, 1) if self.score_norm == "cuts" else k


class _Bounds:
    """What the search may discard, given the best objective found so far (see the module docstring)."""

    def __init__(self, problem: _Problem, best: float) -> None:
        self.p = problem
        finals = np.arange(problem.k_limit + 1)
        self.dens = np.asarray(problem.den(np.maximum(finals, 1)), dtype=np.float64)
        top = np.sort(problem.units[1:])[::-1].astype(np.float64)
        self.best_sums = np.concatenate([[0.0], np.cumsum(top)])  # best_sums[m]: the m best cuts, in units
        loose = np.concatenate([[-np.inf], self.best_sums[: problem.k_limit]])  # units of K' - 1 best cuts
        self.best = best
        # Blocks longer than the loosest bound never win, so the caps need only shorter ones; the caps
        # then tighten the score bound and so the longest block.
        self.score_cap = loose * problem.resolution / self.dens  # per K': the best score term possible
        self._longest = self._longest_per_final()
        most = int(self.live(2, best).max(initial=0))  # no final count above this can win
        self.caps = self._score_caps(float(self._longest[2:].max(initial=-np.inf)), most)
        self.score_cap = np.minimum(self.score_cap, self.caps[finals, 0] * problem.resolution / self.dens)
        self._longest = self._longest_per_final()

    def improve(self, best: float) -> None:
        self.best = best
        self._longest = self._longest_per_final()

    def live(self, k: int, best: float) -> np.ndarray:
        """Final block counts K' >= k that may still beat ``best``."""
        finals = np.arange(max(k, self.p.k_least, 2), self.p.k_limit + 1)
        return finals[self.score_cap[finals] >= best - 1e-12]

    def longest(self, live: np.ndarray) -> float:
        """The longest block any solution with a block count in ``live`` can have and still win."""
        return float(self._longest[live].max(initial=0.0)) * (1 + 1e-12) + 1e-9

    def least_units(self, k: int, live: np.ndarray) -> int:
        """The least cut score (units) k blocks need to have: the rest adds at most the best cuts."""
        if live.size == 0 or not math.isfinite(self.best):
            return 0
        needed = (self.best * self.dens[live] / self.p.resolution - self.best_sums[live - k]).min() - 1e-9
        return max(math.ceil(needed), 0)

    def _longest_per_final(self) -> np.ndarray:
        """Per K' >= 2: the largest L with L**2 + (T - L)**2 / (K' - 1) <= (slack**2 + 1) T**2 / K'."""
        finals = np.arange(self.p.k_limit + 1, dtype=np.float64)
        longest = np.full(finals.size, np.inf)
        if self.p.lam == 0 or not math.isfinite(self.best):
            return longest
        total = self.p.total
        k = finals[2:]
        slack = np.maximum(self.score_cap[2:] - self.best, 0.0) / self.p.lam
        q_max = (slack**2 + 1) * total**2 / k
        a, b, c = k / (k - 1), -2 * total / (k - 1), total**2 / (k - 1) - q_max
        root = (-b + np.sqrt(np.maximum(b**2 - 4 * a * c, 0.0))) / (2 * a)
        longest[2:] = np.where(self.score_cap[2:] >= self.best - 1e-12, root, 0.0)
        return longest

    def _score_caps(self, longest: float, most: int) -> np.ndarray:
        """caps[m, c]: the most cut units m blocks covering [c, n) can score, the cut at c included.

        Every block holds between ``floor`` and ``longest`` tokens; -inf where m such blocks cannot
        cover [c, n), and for m above ``most`` (no solution with that many blocks can win).
        """
        prefix, units, k_limit = self.p.prefix, self.p.units, self.p.k_limit
        n = len(prefix) - 1
        longest = longest * (1 + 1e-12) + 1e-9 if math.isfinite(longest) else np.inf
        first = np.maximum(np.searchsorted(prefix, prefix + self.p.floor, side="left"), np.arange(1, n + 2))
        band = np.maximum(np.searchsorted(prefix, prefix + longest, side="right") - first, 0)
        # Each start's next ends form a window [first, first + band) that only moves right: a range
        # maximum from a sparse table (maxima of runs of 2**j) takes two lookups per start.
        band = np.where(first <= n, band, 0)
        level = np.floor(np.log2(np.maximum(band, 1))).astype(np.int64)
        left = np.minimum(first, n)
        right = np.maximum(left + band - (1 << level), 0)
        empty = band == 0
        depth = int(level.max()) + 1
        caps = np.full((k_limit + 1, n + 1), -np.inf)
        caps[0, n] = 0.0
        table = np.full((depth, n + 1), -np.inf)
        for m in range(1, most + 1):
            table[0] = caps[m - 1]
            for j in range(1, depth):
                step = 1 << (j - 1)
                table[j, : n + 1 - step] = np.maximum(table[j - 1, : n + 1 - step], table[j - 1, step:])
                table[j, n + 1 - step :] = table[j - 1, n + 1 - step :]
            following = np.maximum(table[level, left], table[level, right])
            following[empty] = -np.inf
            caps[m] = units + following
            if not np.isfinite(caps[m]).any():
                break
        return caps

    def drop_hopeless(self, dp: np.ndarray, lo: int, k: int, live: np.ndarray) -> tuple[np.ndarray, int]:
        """Forget partial solutions (k blocks ending at c, cut units S, least Q) that cannot win.

        Finished with K' > k blocks (K' in ``live``), such a state adds m = K' - k blocks over the
        R = T - prefix[c] tokens left, so Q grows by at least R**2 / m and S by at most caps[m, c]:
        it is kept only if Q <= (slack**2 + 1) T**2 / K' - R**2 / m for some K', with
        slack = ((S + caps[m, c]) / den - best) / lam >= 0. Returns the trimmed window and its ``lo``.
        """
        empty = np.full((dp.shape[0], 1), np.inf), lo
        rows = np.flatnonzero(np.isfinite(dp).any(axis=1))
        live = live[live > k]
        if rows.size == 0 or live.size == 0:
            return empty
        extra = self.caps[(live - k)[:, None], rows[None, :]]  # (K', row)
        useful = np.isfinite(extra).any(axis=1)
        live, extra = live[useful], extra[useful]
        if live.size == 0:
            return empty
        p, best = self.p, self.best
        s_values = np.arange(lo, lo + dp.shape[1], dtype=np.float64)
        # In place on one (K', row, S) array: the score term's excess over best, then the Q room it buys.
        room = extra[:, :, None] + s_values
        room *= (p.resolution / self.dens[live])[:, None, None]
        states = dp[rows]
        if p.lam == 0 or not math.isfinite(best):  # -inf: m blocks do not fit
            keep = (np.isfinite(room) & (room >= best - 1e-12)).any(axis=0)
        else:
            room -= best
            hopeful = room >= -1e-12  # False where m blocks do not fit (-inf) or the score falls short
            np.maximum(room, 0.0, out=room)
            room *= 1.0 / p.lam  # the slack
            np.square(room, out=room)
            room += 1.0
            room *= (p.total**2 / live)[:, None, None]
            room -= ((p.total - p.prefix[rows]) ** 2 / (live - k)[:, None])[:, :, None]  # the blocks to come
            room[~hopeful] = -np.inf
            limit = room.max(axis=0)  # (row, S): the largest Q that may still win
            margin = 1e-6 + 1e-9 * np.abs(np.where(np.isfinite(limit), limit, 0.0))  # rounding in the bound
            keep = states <= limit + margin
        dp = np.full(dp.shape, np.inf)
        dp[rows] = np.where(keep, states, np.inf)
        columns = np.flatnonzero(np.isfinite(dp).any(axis=0))
        if columns.size == 0:
            return empty
        return dp[:, columns[0] : columns[-1] + 1], lo + int(columns[0])


def _starting_solution(token_counts: Sequence[int], p: _Problem) -> Segmentation:
    """A quick feasible solution to prune with: for a few block counts (blocks of 300-1,300 tokens,
    and ``k_least``), cut near each K-th of the tokens at the best-scored gap within 0, 2 or 5
    sentences, keep the best, and hill-climb it. Objective -inf when nothing fits.
    """
    n = len(token_counts)
    total, units, prefix = p.total, p.units, p.prefix
    counts = {min(max(round(total / size), p.k_least, 2), p.k_limit) for size in (300, 400, 500, 650, 800, 1000, 1300)}
    counts |= {p.k_least} if p.k_least > 1 else set()
    centres = np.arange(n + 1)
    best_value, best_cuts = -math.inf, None
    for window in (0, 2, 5):
        # near[c]: the best-scored gap within ``window`` of c (ties: the nearer, then the earlier).
        offsets = np.array([0, *(sign * d for d in range(1, window + 1) for sign in (-1, 1))])
        candidates = centres[:, None] + offsets
        valid = (candidates >= 1) & (candidates <= n - 1)
        key = np.where(valid, units[np.clip(candidates, 0, n)], -1)
        near = np.where(valid.any(axis=1), candidates[centres, key.argmax(axis=1)], -1)
        for k in sorted(counts):
            cuts = near[np.searchsorted(prefix, total * np.arange(1, k) / k)]
            if (cuts < 0).any() or (np.diff(cuts) <= 0).any():
                continue
            sizes = np.diff(prefix[np.concatenate([[0], cuts, [n]])])
            if sizes.min() < p.floor:
                continue
            cv = math.sqrt(max(k * float((sizes**2).sum()) / total**2 - 1.0, 0.0))
            value = units[cuts].sum() * p.resolution / p.den(k) - p.lam * cv
            if value > best_value:
                best_value, best_cuts = value, cuts
    if best_cuts is None:
        return Segmentation(((0, n - 1),), -math.inf, 0.0, 0.0)
    bounds = [0, *best_cuts.tolist(), n]
    value, score, cv = objective(
        token_counts,
        (units[1:n] * p.resolution).tolist(),
        [c - 1 for c in bounds[1:-1]],
        lam=p.lam,
        score_norm=p.score_norm,
    )
    start = Segmentation(tuple((a, b - 1) for a, b in itertools.pairwise(bounds)), value, score, cv)
    return _hill_climb(start, token_counts, p)


def _hill_climb(start: Segmentation, token_counts: Sequence[int], p: _Problem) -> Segmentation:
    """Move one cut at a time to its best place between its neighbours until no move helps.

    Only a better feasible solution to prune with: the search stays exact whatever this returns,
    but the closer it starts to the optimum, the more partial solutions the bounds discard.
    """
    if not math.isfinite(start.objective) or len(start.blocks) < 2:
        return start
    n = len(token_counts)
    units, prefix, lam, floor, resolution = p.units, p.prefix, p.lam, p.floor, p.resolution
    total = p.total
    bounds = [0, *(last + 1 for _, last in start.blocks[:-1]), n]  # bounds[j]: first sentence of block j
    k = len(bounds) - 1
    den = p.den(k)
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
        token_counts, (units[1:n] * resolution).tolist(), cuts, lam=lam, score_norm=p.score_norm
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
