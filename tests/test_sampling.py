"""The sampler at every value the API accepts: no NaN, no crash, the documented rule (sampling.py)."""

from __future__ import annotations

import math

import pytest
import torch

from memento.engine.sampling import GREEDY_BELOW, SamplingParams, sample_tokens

TEMPERATURES = [0.0, 5e-324, 1e-300, 1e-45, 1e-6, GREEDY_BELOW, 1e-3, 0.7, 1.0, 2.0]
TOP_PS = [1e-300, 1e-9, 0.3, 1.0]
TOP_KS = [-1, 0, 1, 3]


def draw(logits: torch.Tensor, **params) -> int:
    p = SamplingParams(**params)
    (token,) = sample_tokens(logits[None], [p], [torch.Generator().manual_seed(p.seed or 0)])
    return token.token_id


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("top_p", TOP_PS)
@pytest.mark.parametrize("top_k", TOP_KS)
def test_every_accepted_setting_samples_a_valid_token(temperature, top_p, top_k) -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1)) * 8
    token = draw(logits, temperature=temperature, top_p=top_p, top_k=top_k)
    assert 0 <= token < 50
    best = int(torch.argmax(logits))
    if temperature < GREEDY_BELOW or top_k == 1 or top_p <= 1e-9:
        assert token == best, "greedy, top-k 1 and a vanishing nucleus all keep only the most likely token"


def test_a_tiny_but_sampling_temperature_is_nearly_greedy_without_overflow() -> None:
    logits = torch.tensor([10.0, 9.0, -3.0])
    assert all(draw(logits, temperature=1e-4, seed=s) == 0 for s in range(20))  # (10 - 9) / 1e-4: no inf


@pytest.mark.parametrize(
    ("row", "allowed"),
    [
        ([float("nan"), 1.0, 2.0], {1, 2}),  # NaN counts as -inf
        ([0.0, float("inf"), 3.0], {1}),  # +inf is the largest finite value: that token
        ([float("-inf"), 0.5, float("-inf")], {1}),
        ([float("nan")] * 3, {0, 1, 2}),  # nothing finite: greedy on the raw row, no crash
    ],
)
@pytest.mark.parametrize("temperature", [0.0, 1.0, 2.0])
def test_non_finite_logits_are_sanitised(row, allowed, temperature) -> None:
    assert draw(torch.tensor(row), temperature=temperature, top_p=0.9) in allowed


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampling_still_follows_the_tempered_distribution(temperature) -> None:
    """The max shift changes nothing about the distribution: frequencies within 4 sigma of softmax."""
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0])
    want = torch.softmax(logits / temperature, dim=-1)
    n = 4000
    params = [SamplingParams(temperature=temperature)] * n
    gen = torch.Generator().manual_seed(7)
    tokens = [t.token_id for t in sample_tokens(logits.expand(n, -1), params, [gen] * n)]
    for token, p in enumerate(want.tolist()):
        freq = tokens.count(token) / n
        assert abs(freq - p) <= 4 * math.sqrt(p * (1 - p) / n), (token, freq, p)


def test_top_p_keeps_the_nucleus_and_always_the_top_token() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    seen = {draw(logits, temperature=1.0, top_p=0.7, seed=s) for s in range(200)}
    assert seen == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the third is dropped


def test_min_p_drops_tokens_below_its_share_of_the_top_probability() -> None:
    # probabilities at temperature 1: 0.5, 0.3, 0.15, 0.05 -> min_p 0.2 keeps p >= 0.1: tokens 0, 1, 2
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    drawn = {draw(logits, temperature=1.0, min_p=0.2, seed=s) for s in range(400)}
    assert drawn == {0, 1, 2}
    assert {draw(logits, temperature=1.0, min_p=0.0, seed=s) for s in range(400)} == {0, 1, 2, 3}
    assert {draw(logits, temperature=1.0, min_p=1.0, seed=s) for s in range(50)} == {0}  # the top always stays


def test_repetition_penalty_is_vllms_rule_and_leaves_logprobs_raw() -> None:
    logits = torch.tensor([2.0, 1.5, -1.0, -0.5])
    p = SamplingParams(temperature=0, repetition_penalty=2.0, logprobs=0)
    # seen tokens 0 and 3: 2.0 / 2 = 1.0 and -0.5 * 2 = -1.0; token 1 (1.5) now wins
    (token,) = sample_tokens(logits[None], [p], [None], histories=[[0, 3, 0]])
    assert token.token_id == 1
    assert token.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[1]))  # the raw distribution's
    (plain,) = sample_tokens(logits[None], [SamplingParams(temperature=0)], [None])
    assert plain.token_id == 0
    with pytest.raises(ValueError, match="histories"):
        sample_tokens(logits[None], [p], [None])


@pytest.mark.parametrize(
    "field,value",
    [("min_p", -0.1), ("min_p", 1.5), ("repetition_penalty", 0), ("repetition_penalty", -1.0), ("prompt_logprobs", -1)],
)
def test_bad_penalties_are_refused(field, value) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
