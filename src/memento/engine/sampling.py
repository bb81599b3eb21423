"""Sampling parameters and the sampler: temperature, top-k, top-p, seeds, logprobs.

Every request gets its own ``torch.Generator`` (seeded from ``SamplingParams.seed``, sample ``i``
of ``n`` from ``seed + i``), so a seeded request draws the same tokens whatever else is in the
batch. Logprobs are those of the model's own distribution (log-softmax of the raw logits, before
temperature or truncation), as vLLM reports them by default.

Every value the parameters accept samples without NaN (the rule, tested for the extremes):

* a temperature below :data:`GREEDY_BELOW` (1e-5, vLLM's ``_SAMPLING_EPS``) is greedy decoding;
  above it, logits are shifted by their maximum before dividing, so ``logits / T`` cannot overflow;
* NaN logits count as -inf, +inf ones as the largest finite value (a row with no finite logit is
  decoded greedily on the raw argmax);
* top-k and top-p always keep the most likely token (top_p is compared in float64: a top_p of
  1e-300 keeps exactly that token instead of rounding to 0 and dropping everything); so does min-p.

vLLM's ``repetition_penalty`` (every token already in the prompt or the output: a positive logit
divided by it, a negative one multiplied) and ``min_p`` (tokens below ``min_p`` times the most likely
token's probability dropped) are implemented as vLLM defines them; at 1 and 0 they do nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

GREEDY_BELOW = 1e-5
"""Temperatures below this are greedy decoding (as in vLLM): dividing logits by them would overflow."""


@dataclass
class SamplingParams:
    """How to sample one request. ``temperature=0`` is greedy decoding (ties go to the lowest id)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k truncation
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's logprob and the top k
    prompt_logprobs: int | None = None
    """None: none; k >= 0: every prompt token's logprob (the first has none) and the top k, computed
    during prefill under the memento mask (a prompt holding closed blocks is scored as the engine sees it)."""
    repetition_penalty: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        problems = []
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            problems.append(f"stop_token_ids must hold non-negative integer ids, got {self.stop_token_ids!r}")
        if not _is_int(self.n) or self.n < 1:
            problems.append(f"n must be an integer >= 1, got {self.n!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            problems.append(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            problems.append(f"top_k must be -1 (off), 0 (off) or a positive integer, got {self.top_k!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            problems.append(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop must hold non-empty strings, got {self.stop!r}")
        if self.seed is not None and not _is_int(self.seed):
            problems.append(f"seed must be an integer or None, got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            problems.append(f"logprobs must be None or an integer >= 0, got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs) or self.prompt_logprobs < 0):
            problems.append(f"prompt_logprobs must be None or an integer >= 0, got {self.prompt_logprobs!r}")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty <= 2**31:
            problems.append(f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            problems.append(f"min_p must be in [0, 1], got {self.min_p!r}")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))
        self.stop_token_ids = list(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value  # not NaN


@dataclass
class SampledToken:
    """One sampled token, its logprob under the model, and the top alternatives if asked for."""

    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


def _truncate(logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """Logits with everything outside the top-k, the top-p nucleus and the min-p floor set to -inf
    (1-D, finite max 0: the scaled logits).

    The most likely token is always kept.
    """
    if min_p > 0:  # p(token) < min_p * p(top)  <=>  logit < log(min_p) + max logit (which is 0)
        logits = logits.masked_fill(logits < math.log(min_p), float("-inf"))
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits.double(), dim=-1)
        # Drop a token when the tokens strictly before it already reach top_p.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _sanitise(logits: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf, +inf -> the dtype's largest finite value (float32 rows x vocab)."""
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max, neginf=float("-inf"))


def _draw(row: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """One token from a sanitised row under ``p``'s temperature, top-k and top-p."""
    top = row.max()
    if not torch.isfinite(top):  # nothing finite to sample from
        return int(torch.argmax(row))
    scaled = _truncate((row - top) / p.temperature, p.top_k, p.top_p, p.min_p)  # max 0: exp cannot overflow
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


def apply_repetition_penalty(logits: torch.Tensor, seen: Sequence[int], penalty: float) -> torch.Tensor:
    """vLLM's repetition penalty on one row: the logits of ``seen`` tokens pulled towards "less likely"
    (a positive logit divided by ``penalty``, a negative one multiplied by it)."""
    ids = torch.as_tensor(sorted(set(seen)), dtype=torch.long)
    if penalty == 1.0 or ids.numel() == 0:
        return logits
    out = logits.clone()
    picked = out[ids]
    out[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    histories: Sequence[Sequence[int]] | None = None,
) -> list[SampledToken]:
    """Draw one token per row of ``logits`` (rows x vocab, any float dtype) under each row's params.

    ``histories``: each row's tokens so far (prompt and output), needed by a ``repetition_penalty``
    other than 1. Logprobs are the raw model's, before the penalty (as vLLM reports them).
    """
    logits = logits.float()
    want_logprobs = any(p.logprobs is not None for p in params)
    logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    penalised = [row for row, p in enumerate(params) if p.repetition_penalty != 1.0]
    if penalised:
        if histories is None:
            raise ValueError("a repetition_penalty other than 1 needs the rows' token histories")
        logits = logits.clone()
        for row in penalised:
            logits[row] = apply_repetition_penalty(logits[row], histories[row], params[row].repetition_penalty)
    safe = _sanitise(logits)
    greedy = torch.argmax(safe, dim=-1).tolist()  # one call for the whole batch
    out: list[SampledToken] = []
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        token = greedy[row] if p.greedy else _draw(safe[row], p, gen)
        sampled = SampledToken(token)
        if p.logprobs is not None and logprobs is not None:
            sampled.logprob = float(logprobs[row, token])
            if p.logprobs > 0:
                top = torch.topk(logprobs[row], p.logprobs)
                sampled.top_logprobs = dict(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        out.append(sampled)
    return out
