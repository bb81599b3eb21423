"""The report writer on a small fixed result: tables, ratios, real-size KV and plots."""

from __future__ import annotations

import json
import math

import pytest

from memento.eval.report import comparisons, write_report

ACCURACIES = {0.75: [1.0, 0.5], 0.5: [0.5, 0.5], 0.25: [0.5, 0.0]}
"""Each run's two problems' accuracies (two samples each), by the run's pass@1."""


def _run(label: str, mode: str, pass1: float, peak: float, auc: float, tps: float, blocks: int) -> dict:
    rows = [
        {
            "problem": "p0",
            "sample": 0,
            "blocks": blocks,
            "block_tokens": [40] * blocks,
            "memento_tokens": [10] * blocks,
        },
        {
            "problem": "p1",
            "sample": 0,
            "blocks": blocks,
            "block_tokens": [50] * blocks,
            "memento_tokens": [12] * blocks,
        },
    ]
    return {
        "label": label,
        "mode": {"name": mode, "keep_last_n": -1 if mode == "vanilla" else 0, "restart": mode == "restart"},
        "problems": 2,
        "samples": 2,
        "accuracy": {"pass@1": pass1, "pass@2": min(1.0, pass1 + 0.25), "maj@2": pass1},
        "pass@1_ci95": [pass1 - 0.25, min(1.0, pass1 + 0.2)],
        "problem_accuracy": ACCURACIES[pass1],
        "mean_peak_kv": peak,
        "mean_auc_kv": auc,
        "bytes_per_token": 512,
        "mean_tokens": 300,
        "generated_tokens": 1200,
        "seconds": 1200 / tps,
        "tokens_per_second": tps,
        "finish_reasons": {"eos": 4},
        "curves": [{"problem": "p0", "live_kv": list(range(1, int(peak) + 1))}],
        "rows": rows,
    }


@pytest.fixture
def results() -> dict:
    return {
        "title": "A fixed result",
        "task": {"task set": "synth:stream_sum", "problems": 2},
        "runs": [
            _run("control", "vanilla", 0.75, 400, 80_000, 1000, 0),
            _run("memento", "memento", 0.5, 100, 20_000, 2500, 3),
            _run("memento", "restart", 0.25, 100, 24_000, 2400, 3),
        ],
    }


def test_comparisons_against_the_first_vanilla_run(results) -> None:
    rows = {row["run"]: row for row in comparisons(results)}
    assert set(rows) == {"memento [memento]", "memento [restart]"}
    memento = rows["memento [memento]"]
    assert memento["baseline"] == "control [vanilla]"
    assert memento["pass@1_diff_pp"] == pytest.approx(-25.0)
    assert memento["peak_kv_ratio"] == pytest.approx(0.25)
    assert memento["auc_kv_ratio"] == pytest.approx(0.25)
    assert memento["throughput_ratio"] == pytest.approx(2.5)
    # paired over the two problems: differences -0.5 and 0, sd 0.354, half-width 1.96 x 0.354 / sqrt(2)
    half = 1.959963984540054 * math.sqrt(0.125) / math.sqrt(2)
    assert memento["pass@1_diff_ci95_pp"] == pytest.approx([100 * (-0.25 - half), 100 * (-0.25 + half)])
    assert rows["memento [restart]"]["auc_kv_ratio"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="not one of the runs"):
        comparisons({**results, "baseline": "nope [vanilla]"})


def test_report_has_the_tables_and_the_plots(results, tmp_path) -> None:
    path = write_report(results, tmp_path, kv_models=["qwen3-8b", "qwen3-32b"])
    text = path.read_text()
    assert text.startswith("# A fixed result\n")
    assert "| run | pass@1 [95% interval] | pass@2 | maj@2 | mean peak KV (tokens) |" in text
    assert (
        "| control [vanilla] | 75.0% [50.0, 95.0] | 100.0% | 75.0% | 400 | 80,000 | 200.0 | 1,000 | 300 | eos 4 |"
        in text
    )
    assert "| memento [memento] | -25.0 pp [-74.0, +24.0] | 0.25x | 0.25x | 2.50x |" in text
    # Real sizes: 400 tokens x 144 KiB = 0.059 GB peak; AUC 80,000 token-steps x 147,456 B = 0.0118 GB x ktok.
    assert "| control [vanilla] | 0.059 / 0.0118 | 0.105 / 0.021 |" in text
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["comparisons"][0]["run"] == "memento [memento]"
    for name in ("kv_sawtooth.png", "accuracy_vs_peak_kv.png", "structure.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({name})" in text


def test_report_without_blocks_skips_the_structure_plot(results, tmp_path) -> None:
    results["runs"] = results["runs"][:1]
    text = write_report(results, tmp_path).read_text()
    assert "structure.png" not in text and not (tmp_path / "structure.png").exists()
    assert "Against the baseline" not in text  # nothing to compare with
