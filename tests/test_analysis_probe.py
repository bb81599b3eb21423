"""The KV probes (memento.analysis.kv, probe, passcode, report) and ``memento probe``.

The passcode experiment's logic is checked exactly, without any probe: for one problem and two
different codes, the KV entries that must not depend on the code (every memento before the code's
block; layer 0 of any memento; a later memento under restart) are bitwise equal, and those that
carry the dual stream (a later memento under in-place eviction, from layer 1 on) differ.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import tiny_model
from memento.analysis.kv import kv_features, kv_rows
from memento.analysis.passcode import (
    IN_PLACE,
    RESTART,
    PasscodeSettings,
    build_samples,
    inject_code,
    memento_spans,
    passcode_report_lines,
    run_passcode_study,
)
from memento.analysis.probe import CHANCE, ProbeSettings, digit_labels, family_contains, split_codes, train_probe
from memento.analysis.report import read_sections, update_report
from memento.chat import assistant_prefix_ids, chat_prompt
from memento.cli import app
from memento.format import SpecialTokenIds
from memento.masking import MaskConfig, compute_visibility
from memento.modeling import build_tiny_model
from memento.synth import generate
from memento.tiny_tokenizer import build_tiny_tokenizer

KNOBS = {"min_steps": 9, "max_steps": 11, "steps_per_block": 3}
"""stream_sum with 3 blocks of 3-5 steps: ~250-token traces."""


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_tiny_tokenizer()
    return tokenizer, tiny_model(tokenizer), SpecialTokenIds.from_tokenizer(tokenizer)


def _one_problem_two_codes(tokenizer, specials):
    problem = next(p for p in generate("stream_sum", "train", 5, seed=0, **KNOBS) if len(p.trace.units) >= 3)
    prompt = chat_prompt(tokenizer, problem.prompt)
    sequences = [
        tokenizer(prompt + inject_code(problem, code, " passcode {code}"), add_special_tokens=False)["input_ids"]
        for code in ("11111", "98765")
    ]
    start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    spans = [memento_spans(seq, specials, start) for seq in sequences]
    return sequences, spans


def _memento_kv(model, tokenizer, specials, sequences, spans, memento, config):
    positions = [list(range(s[memento][0], s[memento][1])) for s in spans]
    return kv_features(
        model, sequences, positions, specials, config, assistant_prefix=assistant_prefix_ids(tokenizer), pad_token_id=0
    )


def test_only_the_dual_stream_carries_the_code(setup):
    """Two hops: memento 2 reads T2 at layer 0 (its KV differs from layer 1 on), memento 3 reads memento
    2's layer-1 KV at layer 1 (its KV differs from layer 2 on), so this needs three layers."""
    tokenizer, _, specials = setup
    model = build_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=3, intermediate_size=64)
    sequences, spans = _one_problem_two_codes(tokenizer, specials)
    assert sequences[0] != sequences[1] and [len(s) for s in spans] == [len(s) for s in reversed(spans)]
    same = lambda kv, layer: np.array_equal(kv[layer][0], kv[layer][1])  # noqa: E731
    causal = _memento_kv(model, tokenizer, specials, sequences, spans, 0, IN_PLACE)
    direct = _memento_kv(model, tokenizer, specials, sequences, spans, 1, IN_PLACE)
    masked = _memento_kv(model, tokenizer, specials, sequences, spans, 2, IN_PLACE)
    restart = _memento_kv(model, tokenizer, specials, sequences, spans, 2, RESTART)
    assert same(causal, 0) and same(causal, 1), "memento 1 predates the code"
    assert same(direct, 0) and not same(direct, 1), "layer 0 KV is the memento's own tokens; layer 1 has seen T2"
    assert same(masked, 0) and same(masked, 1) and not same(masked, 2), "the dual stream: memento 2's KV, read"
    assert all(same(restart, layer) for layer in range(3)), "restart recomputes memento 2 without T2: channel cut"


def test_kv_features_match_a_plain_forward_in_vanilla_mode(setup):
    """The independent reference: with nothing evicted, the cached KV is a plain causal forward's."""
    tokenizer, model, specials = setup
    sequences, _ = _one_problem_two_codes(tokenizer, specials)
    positions = [[3, 10, len(sequences[0]) - 1]]
    got = kv_features(model, sequences[:1], positions, specials, MaskConfig(keep_last_n=-1), pad_token_id=0)
    with torch.no_grad():
        cache = model(torch.tensor([sequences[0]]), use_cache=True)["cache"]
    for layer in range(model.config.num_hidden_layers):
        keys, values = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # (heads, T, d)
        rows = []
        for p in positions[0]:
            rows += [keys[:, p].reshape(-1), values[:, p].reshape(-1)]
        np.testing.assert_allclose(got[layer][0], torch.cat(rows).numpy(), atol=1e-5)


def test_kv_rows_read_a_restarted_memento_from_its_second_copy(setup):
    tokenizer, _, specials = setup
    sequences, spans = _one_problem_two_codes(tokenizer, specials)
    prefix = assistant_prefix_ids(tokenizer)
    vis = compute_visibility(sequences[0], specials, RESTART, prefix)
    rows = kv_rows(vis)
    first_memento_token = spans[0][0][0] + 1
    copies = np.flatnonzero(vis.source == first_memento_token)
    assert len(copies) == 2 and rows[first_memento_token] == copies[-1]
    plain = kv_rows(compute_visibility(sequences[0], specials, IN_PLACE, prefix))
    assert np.array_equal(plain, np.arange(len(sequences[0])))


def test_probe_finds_a_planted_signal_and_not_noise():
    rng = np.random.default_rng(0)
    codes = [f"{v:05d}" for v in rng.integers(0, 100_000, 1500)]
    labels, validation = digit_labels(codes), split_codes(codes)
    noise = rng.normal(size=(1500, 64)).astype(np.float32)
    onehot = np.zeros((1500, 50), np.float32)
    onehot[np.arange(1500)[:, None], np.arange(5) * 10 + labels] = 3.0
    signal = np.concatenate([onehot + rng.normal(size=onehot.shape), noise], axis=1).astype(np.float32)
    settings = ProbeSettings(epochs=30)
    fit = lambda x: train_probe(x[~validation], labels[~validation], x[validation], labels[validation], settings)  # noqa: E731
    at_chance, found = fit(noise), fit(signal)
    assert at_chance.at_chance and not at_chance.above_chance
    assert found.above_chance and found.accuracy > 0.5


def test_family_contains_widens_for_several_probes():
    # 9.5% [9.1, 9.9]: misses 10% as one probe, holds it as one of four (z 2.50 instead of 1.96)
    one = {"accuracy": 0.095, "low": 0.091, "high": 0.099}
    assert not family_contains([one]) and family_contains([one] * 4)
    assert not family_contains([{"accuracy": 0.13, "low": 0.12, "high": 0.14}] * 4)  # a real leak stays one
    with pytest.raises(ValueError):
        family_contains([])


def test_split_codes_is_by_code_and_unbiased():
    codes = [f"{v:05d}" for v in range(20_000)]
    validation = split_codes(codes, 0.2)
    assert 0.18 < validation.mean() < 0.22
    assert np.array_equal(split_codes(codes[:50], 0.2), validation[:50])  # a code's split never depends on others
    last_digits = np.asarray([int(c[-1]) for c in codes])
    for d in range(10):  # no digit value is tied to the split (as code % 5 would tie it)
        assert 0.17 < validation[last_digits == d].mean() < 0.23
    with pytest.raises(ValueError, match="one length"):
        digit_labels(["123", "4567"])


def test_quick_passcode_study_controls_sit_at_chance(setup, tmp_path):
    tokenizer, model, _ = setup
    settings = PasscodeSettings.quick(knobs=KNOBS, max_distance=1)
    results = run_passcode_study(model, tokenizer, settings, tmp_path, log=lambda _: None)
    conditions = results["conditions"]
    assert set(conditions) == {"causal", "direct", "masked+1", "restart+1"}
    for layer in ("0", "1"):
        causal = conditions["causal"][layer]
        assert causal["low"] <= CHANCE <= causal["high"], "the causal control must sit at chance"
    assert conditions["restart+1"]["1"]["low"] <= CHANCE
    sensitivity = results["sensitivity"]
    assert all(v == 0.0 for v in sensitivity["in_place"][0]), "layer 0: the memento's own tokens only"
    assert sensitivity["in_place"][1][0] == 0.0 and sensitivity["in_place"][1][1] > 0.01  # causal 0, direct moves
    assert sensitivity["in_place"][1][2] == 0.0, "two layers: memento 3 needs a second hop"
    assert all(v == 0.0 for row in sensitivity["restart"] for v in row)
    saved = json.loads((tmp_path / "passcode.json").read_text())
    assert saved["samples"] == settings.samples and saved["validation_samples"] < settings.samples
    assert (tmp_path / "passcode_layers.png").stat().st_size > 1000
    assert (tmp_path / "passcode_distance.png").stat().st_size > 1000
    text = "\n".join(passcode_report_lines(results))
    assert (
        "26.7%" in text
        and "Causal control at chance at every layer (family-wise 95% over the 2 layers, Bonferroni): yes" in text
    )


def test_build_samples_refuses_problems_too_short(setup):
    tokenizer, _, specials = setup
    with pytest.raises(ValueError, match="max-distance"):
        build_samples(tokenizer, specials, PasscodeSettings.quick(knobs=KNOBS, max_distance=5))


def test_report_keeps_other_sections(tmp_path):
    path = tmp_path / "report.md"
    update_report(path, "toy", ["## toy", "one"])
    update_report(path, "restart", ["## restart"])
    update_report(path, "toy", ["## toy", "two"])
    sections = read_sections(path.read_text())
    assert sections == {"restart": "## restart\n", "toy": "## toy\ntwo\n"}
    assert path.read_text().index("## restart") < path.read_text().index("## toy")
    with pytest.raises(ValueError, match="unknown report section"):
        update_report(path, "nope", [])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, setup):
    tokenizer, model, _ = setup
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path.parent / "demo-config.json").write_text(json.dumps({"task": "stream_sum", "knobs": KNOBS}))
    return path


def test_cli_probe_kv_and_restart_write_one_report(model_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "probe"
    result = runner.invoke(app, ["probe", "kv", str(model_dir), "--quick", "--max-distance", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["probe", "restart", str(model_dir), "--quick", "--max-tokens", "24", "--no-progress", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    restart = json.loads((out / "restart.json").read_text())
    assert restart["settings"]["knobs"] == KNOBS  # from demo-config.json beside the model
    assert len(restart["seeds"]) == 2 and restart["teacher_forced"]["before_first_max_gap"] < 1e-5
    assert set(read_sections((out / "report.md").read_text())) == {"restart", "kv"}
    assert (out / "restart.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["kv", "MODEL", "--at", "middle"], "--at must be end or start"),
        (["restart", "MODEL", "--temperature", "0"], "greedy decoding"),
        (["kv", "MODEL", "--task", "nope"], "unknown synthetic task"),
    ],
)
def test_cli_probe_bad_options_are_clear_errors(model_dir, args, message):
    args = [str(model_dir) if a == "MODEL" else a for a in args]
    result = CliRunner().invoke(app, ["probe", *args])
    assert result.exit_code == 2 and message in result.output


def test_cli_probe_toy_quick_adds_its_section(tmp_path):
    out = tmp_path / "probe"
    out.mkdir()
    update_report(out / "report.md", "restart", ["## restart", "kept"])
    result = CliRunner().invoke(app, ["probe", "toy", "--quick", "-o", str(out)])
    assert result.exit_code == 0, result.output
    sections = read_sections((out / "report.md").read_text())
    assert sections["restart"] == "## restart\nkept\n" and "## Toy transformer" in sections["toy"]
    assert json.loads((out / "toy.json").read_text())["settings"]["blocks"] == 6
