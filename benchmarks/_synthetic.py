"""Random memento-structured token ids for benchmarks (no tokenizer, no model).

Ids 1..4 are the memento delimiters, 5 and 6 are ``<think>``/``</think>``, plain tokens are >= 7.
A sequence is ``prompt <think> (<|block_start|> r <|block_end|><|summary_start|> m <|summary_end|>)*
</think> answer`` with blocks about ``block_ratio`` times longer than their mementos, cut to an
exact length.
"""

from __future__ import annotations

import numpy as np

from memento.format import SpecialTokenIds

SPECIALS = SpecialTokenIds(block_start=1, block_end=2, summary_start=3, summary_end=4, think_start=5, think_end=6)
FIRST_PLAIN = 7


def memento_ids(
    rng: np.random.Generator,
    length: int,
    *,
    n_units: int = 10,
    prompt_len: int = 200,
    answer_len: int = 32,
    block_ratio: float = 5.0,
    vocab: int = 32_000,
) -> np.ndarray:
    """One sequence of exactly ``length`` ids with ``n_units`` (block, memento) units."""
    budget = length - prompt_len - answer_len - 2 - 4 * n_units
    if budget < 2 * n_units:
        raise ValueError(f"length {length} is too short for {n_units} units after a {prompt_len}-token prompt")
    # Split the budget across units (random shares), then each unit's share into block and memento.
    shares = rng.dirichlet(np.full(n_units, 4.0))
    unit_sizes = np.maximum(2, np.floor(shares * budget).astype(np.int64))
    unit_sizes[-1] += budget - int(unit_sizes.sum())
    if unit_sizes[-1] < 2:
        raise ValueError("unit sizes do not fit; use fewer units")

    def plain(n: int) -> list[int]:
        return rng.integers(FIRST_PLAIN, vocab, size=int(n)).tolist()

    s = SPECIALS
    ids = [*plain(prompt_len), s.think_start]
    for size in unit_sizes.tolist():
        memento = max(1, round(size / (1.0 + block_ratio)))
        block = size - memento
        ids += [s.block_start, *plain(block), s.block_end, s.summary_start, *plain(memento), s.summary_end]
    ids += [s.think_end, *plain(answer_len)]
    out = np.asarray(ids, dtype=np.int64)
    assert len(out) == length, (len(out), length)
    return out


def memento_batch(
    batch: int, length: int, *, seed: int = 0, min_units: int = 8, max_units: int = 12, **kwargs
) -> list[np.ndarray]:
    """``batch`` sequences of ``length`` ids, each with 8-12 units (by default)."""
    rng = np.random.default_rng(seed)
    return [
        memento_ids(rng, length, n_units=int(rng.integers(min_units, max_units + 1)), **kwargs) for _ in range(batch)
    ]
