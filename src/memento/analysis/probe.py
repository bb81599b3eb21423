"""The paper's digit probe: an MLP (512, 256, bottleneck 128) with one 10-way head per digit.

A probe reads features (KV entries, or a text-only encoding for a baseline) and predicts a code of
``digits`` decimal digits. It is trained on one set of codes and scored on codes it never saw
(:func:`split_codes` decides by a hash, so no digit position is biased). Its accuracy is the mean
over digits, and its interval is taken over *samples* (each sample's fraction of digits right), not
over digit predictions: the digits of one sample share their features, so they are not independent
trials and a digit-level interval would be too narrow.

Chance is exactly ``1 / 10`` for uniform digits whatever the probe learned, which is why a causal
control (features computed before the code existed) must land on it: a probe that beats chance
there has a leak in the experiment.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist

import numpy as np
import torch
from torch import nn

from memento.eval.metrics import Z95

CHANCE = 0.1
"""A uniform decimal digit: the accuracy of any predictor that does not see it."""


def split_codes(codes: Sequence[str], validation_fraction: float = 0.2) -> np.ndarray:
    """True where a code belongs to validation, by a stable hash of the code itself: a code is in one
    split only, wherever it occurs, and (unlike ``code % 5``) no digit's value is tied to the split."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    cut = int(validation_fraction * 1000)
    return np.asarray([int(hashlib.sha256(c.encode()).hexdigest()[:8], 16) % 1000 < cut for c in codes], dtype=bool)


def digit_labels(codes: Sequence[str]) -> np.ndarray:
    """(N, digits) integer labels from equal-length digit strings."""
    if not codes:
        raise ValueError("no codes")
    width = len(codes[0])
    if any(len(c) != width or not c.isdigit() for c in codes):
        raise ValueError("codes must be digit strings of one length")
    return np.asarray([[int(ch) for ch in c] for c in codes], dtype=np.int64)


class DigitProbe(nn.Module):
    """MLP probe: input -> 512 -> 256 -> 128 (bottleneck) -> one 10-way head per digit."""

    def __init__(self, n_features: int, digits: int, hidden: Sequence[int] = (512, 256, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.GELU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.heads = nn.Linear(width, digits * 10)
        self.digits = digits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.body(x)).view(x.shape[0], self.digits, 10)


@dataclass(frozen=True)
class ProbeSettings:
    """How a probe is fitted (no dropout, as the paper's; weight decay and early stopping regularise)."""

    epochs: int = 60
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    patience: int = 10
    """Stop when validation loss has not improved for this many epochs; the best epoch's weights are scored."""
    seed: int = 0


@dataclass
class ProbeResult:
    accuracy: float
    low: float
    high: float
    per_digit: list[float] = field(default_factory=list)
    n_train: int = 0
    n_validation: int = 0
    epochs: int = 0
    chance: float = CHANCE

    @property
    def above_chance(self) -> bool:
        return self.low > self.chance

    @property
    def at_chance(self) -> bool:
        return self.low <= self.chance <= self.high

    def to_dict(self) -> dict[str, float | int | list[float]]:
        return asdict(self)


def sample_interval(correct: np.ndarray, z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high) of digit accuracy; ``correct`` is (samples, digits) of 0/1, clustered by sample."""
    per_sample = correct.mean(axis=1)
    n = len(per_sample)
    mean = float(per_sample.mean())
    se = float(per_sample.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.5
    return mean, max(0.0, mean - z * se), min(1.0, mean + z * se)


def train_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    settings: ProbeSettings = ProbeSettings(),
) -> ProbeResult:
    """Fit a :class:`DigitProbe` on (train_x, train_y) and score it on held-out (val_x, val_y).

    Features are standardised with the training set's statistics only. Early stopping watches a
    slice of the *training* codes (10%), never the validation set, so the reported accuracy is an
    honest held-out figure.
    """
    if len(train_x) != len(train_y) or len(val_x) != len(val_y):
        raise ValueError("features and labels differ in length")
    if len(train_x) < 10 or len(val_x) < 2:
        raise ValueError(f"too few samples to probe: {len(train_x)} train, {len(val_x)} validation")
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    mean = train_x.mean(axis=0, keepdims=True)
    std = train_x.std(axis=0, keepdims=True) + 1e-6
    x = torch.as_tensor((train_x - mean) / std, dtype=torch.float32)
    y = torch.as_tensor(train_y, dtype=torch.long)
    order = torch.randperm(len(x), generator=generator)
    n_stop = max(1, len(x) // 10)
    stop_idx, fit_idx = order[:n_stop], order[n_stop:]
    probe = DigitProbe(x.shape[1], y.shape[1])
    optimiser = torch.optim.AdamW(probe.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    loss_fn = nn.CrossEntropyLoss()

    def loss_on(idx: torch.Tensor) -> float:
        probe.eval()
        with torch.no_grad():
            return float(loss_fn(probe(x[idx]).reshape(-1, 10), y[idx].reshape(-1)))

    best, best_state, stale, epochs = math.inf, None, 0, 0
    for epoch in range(settings.epochs):
        probe.train()
        perm = fit_idx[torch.randperm(len(fit_idx), generator=generator)]
        for i in range(0, len(perm), settings.batch_size):
            idx = perm[i : i + settings.batch_size]
            loss = loss_fn(probe(x[idx]).reshape(-1, 10), y[idx].reshape(-1))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        epochs = epoch + 1
        current = loss_on(stop_idx)
        if current < best - 1e-4:
            best, stale = current, 0
            best_state = {k: v.clone() for k, v in probe.state_dict().items()}
        else:
            stale += 1
            if stale >= settings.patience:
                break
    if best_state is not None:
        probe.load_state_dict(best_state)
    probe.eval()
    with torch.no_grad():
        vx = torch.as_tensor((val_x - mean) / std, dtype=torch.float32)
        predicted = probe(vx).argmax(-1).numpy()
    correct = (predicted == val_y).astype(np.float64)
    accuracy, low, high = sample_interval(correct)
    return ProbeResult(
        accuracy=accuracy,
        low=low,
        high=high,
        per_digit=[float(v) for v in correct.mean(axis=0)],
        n_train=len(train_x),
        n_validation=len(val_x),
        epochs=epochs,
    )


def family_contains(results: Sequence[dict[str, float]], value: float = CHANCE) -> bool:
    """Whether every interval of a family of probes holds ``value`` at a family-wise 95% (Bonferroni).

    A control probed at k layers is k tests: with k per-probe 95% intervals, one misses chance about
    k times in 20 by luck alone, and the layers share one validation set, so they miss together.
    Each interval is widened to z = Phi^-1(1 - 0.025 / k) from its own standard error (recovered from
    its 95% bounds), so the family as a whole holds ``value`` 95% of the time when nothing leaks.
    """
    if not results:
        raise ValueError("no probe results")
    z = NormalDist().inv_cdf(1 - 0.025 / len(results))
    for r in results:
        se = (r["high"] - r["low"]) / (2 * Z95)
        if abs(r["accuracy"] - value) > z * se:
            return False
    return True
