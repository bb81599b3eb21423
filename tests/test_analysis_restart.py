"""The restart comparison (memento.analysis.restart): same tokens, only the mementos' KV differs."""

from __future__ import annotations

import random

import numpy as np
import pytest

from helpers import memento_case, tiny_model
from memento.analysis.restart import IN_PLACE, RESTART, compare_restart, mementos_closed_before, token_losses
from memento.chat import tracked_prefix
from memento.format import SpecialTokenIds
from memento.masking import CHAT_MEMENTO
from memento.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_tiny_tokenizer()
    rng = random.Random(3)
    cases = [memento_case(tokenizer, rng, units=(2, 4)) for _ in range(6)]
    return tokenizer, tiny_model(tokenizer), SpecialTokenIds.from_tokenizer(tokenizer), cases


def test_mementos_closed_before_counts_only_completion_mementos(setup):
    tokenizer, _, specials, _ = setup
    e = specials.summary_end
    a, b, c, d = (tokenizer.convert_tokens_to_ids(ch) for ch in "abcd")
    seq = [e, a, b, e, c, e, d]
    # prompt = first 2 tokens: its <|summary_end|> is not counted
    assert mementos_closed_before(seq, specials, start=2).tolist() == [0, 0, 0, 1, 1, 2]


def test_restart_changes_only_what_follows_a_closed_memento(setup):
    tokenizer, model, specials, cases = setup
    sequences = [p + c for p, c in cases]
    prefix = tracked_prefix(CHAT_MEMENTO, None, tokenizer)
    result = compare_restart(
        model,
        sequences,
        [len(p) for p, _ in cases],
        specials,
        assistant_prefix=prefix,
        pad_token_id=tokenizer.pad_token_id,
    )
    assert result.before_first_max_gap < 1e-5  # same context before any memento closes
    assert len(result.in_place) >= 3 and sum(result.tokens) == sum(len(c) for _, c in cases)
    assert result.in_place[0] == pytest.approx(result.restart[0], abs=1e-5)
    gaps = [abs(r["restart_minus_in_place"]) for r in result.rows()[1:]]
    assert max(gaps) > 1e-4, "restart recomputes the mementos: later tokens must see other KV"


def test_token_losses_equal_a_plain_forward_in_vanilla_mode(setup):
    """The independent check: with nothing evicted, the masked forward is a causal forward."""
    import torch

    from memento.masking import MaskConfig

    tokenizer, model, specials, cases = setup
    seq = cases[0][0] + cases[0][1]
    vanilla = MaskConfig.chat(keep_last_n=-1)
    prefix = tracked_prefix(vanilla, None, tokenizer)
    (losses,) = token_losses(model, [seq], specials, vanilla, assistant_prefix=prefix)
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].double()
    expected = -torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0].numpy()
    np.testing.assert_allclose(losses, expected, atol=1e-4)
    assert IN_PLACE.keep_last_n == 0 and RESTART.restart
