"""The CISPO policy loss, as the paper uses it (pure tensors; the RL trainer calls it).

Per token: ``- sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * log pi_theta(a|s)`` with
``r = pi_theta / pi_old`` and ``sg`` a stop-gradient, plus ``beta * KL(pi_theta || pi_ref)``
(the k3 estimator ``exp(ref - logp) - (ref - logp) - 1``). Unlike PPO's clipping, which zeroes the
gradient of a clipped token, every token keeps its gradient ``-w * A * d log pi``; only the weight
``w`` is bounded. The token losses are summed and divided by the number of loss tokens in the
whole batch (group-total normalisation: a long response weighs more than a short one, as in the
paper), or by a ``normalizer`` the caller gives (the trainer's count across gradient accumulation
and processes).

TRL's own ``loss_type="cispo"`` differs: it caps the weight from above only, at an absolute value
(``clamp(r, max=epsilon_high)``, ScaleRL's recommended 5.0), and never from below. ``clip="trl"`` in
:class:`memento.train.rl.RLSettings` selects it; the default is the paper's two-sided clip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CISPOStats:
    """Sums over the loss tokens (divide by ``tokens`` for fractions and means)."""

    tokens: float
    clipped_low: float  # r < 1 - eps_low
    clipped_high: float  # r > 1 + eps_high
    kl_sum: float  # sum of the per-token KL estimate (0 when there is no reference)
    ratio_max: float

    @property
    def clip_low_fraction(self) -> float:
        return self.clipped_low / self.tokens if self.tokens else 0.0

    @property
    def clip_high_fraction(self) -> float:
        return self.clipped_high / self.tokens if self.tokens else 0.0

    @property
    def kl(self) -> float:
        return self.kl_sum / self.tokens if self.tokens else 0.0


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from the sampled tokens' log-probs (>= 0)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def cispo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, CISPOStats]:
    """The paper's CISPO loss over a (batch, tokens) block of log-probs.

    ``advantages`` is one value per completion (batch,) or per token (batch, tokens); ``mask`` is 1
    on the tokens that enter the loss. Returns the scalar loss and its statistics.
    """
    if logps.shape != old_logps.shape or logps.shape != mask.shape:
        shapes = f"logps {tuple(logps.shape)}, old {tuple(old_logps.shape)}, mask {tuple(mask.shape)}"
        raise ValueError(f"shape mismatch: {shapes}")
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    if beta and ref_logps is None:
        raise ValueError("beta > 0 needs the reference log-probs")
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    weights = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high).detach()
    per_token = -clipped * advantages * logps
    kl = None
    if ref_logps is not None:
        kl = k3_kl(logps, ref_logps)
        if beta:
            per_token = per_token + beta * kl
    norm = weights.sum().clamp(min=1.0) if normalizer is None else normalizer
    loss = (per_token * weights).sum() / norm
    with torch.no_grad():
        live = weights > 0
        stats = CISPOStats(
            tokens=float(weights.sum()),
            clipped_low=float(((ratio < 1 - eps_low) & live).sum()),
            clipped_high=float(((ratio > 1 + eps_high) & live).sum()),
            kl_sum=float((kl * weights).sum()) if kl is not None else 0.0,
            ratio_max=float(ratio[live].max()) if live.any() else 1.0,
        )
    return loss, stats
