"""The toy study of the dual information stream (memento.analysis.toy): data, mask, probes, outputs."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch

from memento.analysis.probe import CHANCE
from memento.analysis.toy import (
    UNIT_LENGTH,
    ToySettings,
    ToyVocab,
    condition_pairs,
    draw_samples,
    expected_text_ceiling,
    make_toy_data,
    map_digit_given_sum,
    memento_positions,
    run_toy_study,
    shared_mask_inputs,
    text_features,
    toy_report_lines,
    toy_trends,
)
from memento.masking import MEMENTO, build_batch
from memento.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def vocab(tokenizer) -> ToyVocab:
    return ToyVocab.from_tokenizer(tokenizer)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One quick run shared by the tests below (about 20 s on two CPU cores)."""
    out = tmp_path_factory.mktemp("toy")
    lines: list[str] = []
    results = run_toy_study(ToySettings.quick(), out, log=lines.append)
    return results, out, lines


def test_sequences_follow_the_papers_layout(tokenizer, vocab):
    data = make_toy_data(20, 10, vocab, seed=5)
    assert data.ids.shape == (20, 10 * UNIT_LENGTH) and data.digits.shape == (20, 10, 5)
    text = tokenizer.decode(data.ids[3].tolist())
    units = text.split("<|summary_end|>")[:-1]
    total = 0
    for j, unit in enumerate(units):
        block, memento = unit.removeprefix("<|block_start|>").split("<|block_end|><|summary_start|>")
        assert block == "".join(map(str, data.digits[3, j]))
        total += sum(int(ch) for ch in block)
        assert memento == f"{total:03d}"  # zero-padded running sum, most significant digit first
    assert len(units) == 10 and data.sums[3, -1] == total
    np.testing.assert_array_equal(data.sums, np.cumsum(data.digits.sum(-1), axis=1))
    again = make_toy_data(20, 10, vocab, seed=5)
    np.testing.assert_array_equal(again.ids, data.ids)
    assert (
        tokenizer.decode(data.ids[3, memento_positions(2, True)].tolist())
        == f"<|summary_start|>{data.sums[3, 2]:03d}<|summary_end|>"
    )


def test_one_mask_serves_every_sequence_and_evicts_each_block(vocab):
    data = make_toy_data(4, 3, vocab, seed=1)
    shared = shared_mask_inputs(vocab, 3, "sdpa")["attention_mask"][0, 0]
    per_sequence = build_batch(list(data.ids), vocab.specials, MEMENTO).dense()
    assert all(torch.equal(per_sequence[i, 0], shared) for i in range(4))
    end0, digits0, memento0 = UNIT_LENGTH - 1, range(1, 6), memento_positions(0)
    assert shared[end0 - 1, list(digits0)].all()  # memento 0 computed while block 0 is visible
    assert not shared[end0:, list(digits0)].any()  # from its <|summary_end|> on, block 0 is gone
    assert shared[end0:, memento0].all()  # but the memento's own entries stay


def test_condition_pairs_and_split():
    assert condition_pairs("causal", 4) == [(0, 1), (1, 2), (2, 3)]
    assert condition_pairs("masked", 4, 2) == [(2, 0), (3, 1)]
    assert condition_pairs("direct", 2) == [(0, 0), (1, 1)]
    with pytest.raises(ValueError):
        condition_pairs("masked", 4, 4)


def test_samples_split_by_code_and_text_features_hide_later_mementos(vocab):
    data = make_toy_data(300, 10, vocab, seed=2)
    samples = draw_samples(data, condition_pairs("masked", 10, 3), limit=1000, seed=0, validation_fraction=0.2)
    assert len(samples) == 1000 and 0.1 < samples.validation.mean() < 0.3
    assert not set(np.asarray(samples.codes)[samples.validation]) & set(np.asarray(samples.codes)[~samples.validation])
    assert (samples.memento - samples.target == 3).all()
    x = text_features(data, samples)
    assert x.shape == (1000, 10 * 30 + 10)
    visible_sums = x[:, :300].reshape(1000, 10, 30).sum(-1)
    np.testing.assert_array_equal(visible_sums, 3 * (np.arange(10)[None] <= samples.memento[:, None]))


def test_text_ceiling_is_the_exact_best_guess_from_the_digit_sum():
    codes = np.asarray(list(itertools.product(range(10), repeat=5)))  # every block, equally likely
    guess = map_digit_given_sum(codes.sum(1))
    brute = float((codes == guess[:, None]).mean())
    assert expected_text_ceiling() == pytest.approx(brute, abs=1e-12)
    assert expected_text_ceiling() == pytest.approx(0.1603, abs=1e-4)
    assert map_digit_given_sum(np.asarray([0, 45, 20])).tolist() == [0, 9, 2]


def test_checkpoint_steps_and_full_defaults():
    full = ToySettings()
    assert full.checkpoint_steps()[-1] == full.steps and len(full.checkpoint_steps()) == 5
    assert (full.layers, full.hidden_size, full.blocks) == (4, 128, 10)


def test_causal_control_is_at_chance(study):
    results, _, _ = study
    for layer in results["layers"]["causal"]:
        assert layer["low"] <= CHANCE <= layer["high"], layer
        assert layer["n_validation"] > 300
    assert results["trends"]["causal_control_at_chance"]


def test_direct_condition_beats_chance_at_the_last_layer(study):
    results, _, _ = study
    last = results["layers"]["direct"][-1]
    assert last["low"] > CHANCE + 0.03, last
    assert results["distance"][0]["kv"] == last


def test_outputs_written(study):
    results, out, lines = study
    assert json.loads((out / "toy.json").read_text()) == json.loads(json.dumps(results))
    for name in ("toy_layers.png", "toy_distance.png", "toy_leakage.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert results["parameters"] == 24_064  # the quick model; the full one has 809,984
    assert [row["distance"] for row in results["distance"]] == list(range(6))
    assert [row["step"] for row in results["leakage"]] == [30, 60]
    assert results["leakage"][-1]["masked_1"]["n_validation"] < results["layers"]["masked_1"][-1]["n_validation"]
    assert any(line.startswith("toy probe layer 1 masked_1:") for line in lines)
    assert any(line.startswith("toy train: step 60/60") for line in lines)
    ceilings = [row["text_ceiling"]["accuracy"] for row in results["distance"]]
    assert all(0.12 < c < 0.2 for c in ceilings)  # ~16%: the digit sum alone


def test_report_sets_the_papers_numbers_beside_ours(study):
    results, _, _ = study
    text = "\n".join(toy_report_lines(results))
    assert text.startswith("## Toy transformer:")
    for figure in ("26.2%", "13.1%", "21.4%", "17-19%", "77% -> 95%"):
        assert figure in text
    assert "paper (Qwen-free toy, section 7)" in text and "| ours" not in text.split("\n")[0]
    assert (
        "Causal control at chance at every layer (family-wise 95% over the layers, Bonferroni, holds 10%): yes." in text
    )
    direct = results["layers"]["direct"][-1]
    assert f"{100 * direct['accuracy']:.1f}%" in text
    assert "Reading note:" in text
    assert all(line.count("|") == 5 for line in text.splitlines() if line.startswith("| paper (Qwen-free"))


def test_report_tells_a_leak_from_a_control_below_chance(study):
    results, _, _ = study
    low = copy.deepcopy(results)
    low["layers"]["causal"][0].update(accuracy=0.09, low=0.085, high=0.095)
    low["trends"] = toy_trends(low)
    text = "\n".join(toy_report_lines(low))
    assert "no, below chance (layer 1 9.0% [8.5, 9.5])" in text and "leaks" not in text
    high = copy.deepcopy(results)
    high["layers"]["causal"][-1].update(accuracy=0.13, low=0.12, high=0.14)
    high["trends"] = toy_trends(high)
    assert not high["trends"]["causal_control_at_chance"] and high["trends"]["causal_control_above_chance"]
    assert "NO, above chance (layer 2 13.0% [12.0, 14.0]): the experiment leaks." in "\n".join(toy_report_lines(high))
