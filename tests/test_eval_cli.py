"""`memento eval` from the command line: a file task set, the math grader, several modes, errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from helpers import tiny_model
from memento.cli import app
from memento.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tokenizer = build_tiny_tokenizer()
    tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "set.jsonl"
    rows = [{"question": f"STREAM a{i} c1 x2 n03", "answer": "\\frac{1}{2}", "id": f"p{i}"} for i in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_eval_writes_a_report_for_every_mode(model_dir, problems, tmp_path) -> None:
    out = tmp_path / "eval"
    args = ["eval", str(model_dir), "--task", str(problems), "--modes", "memento,vanilla,keep-1", "--grader", "math"]
    args += ["--max-tokens", "24", "--samples", "2", "--temperature", "1.0", "--seed", "5", "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--no-progress", "--kv-model", "qwen3-8b", "--kv-model", "qwen3-32b"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert [r["mode"]["name"] for r in results["runs"]] == ["memento", "vanilla", "keep-1"]
    for run in results["runs"]:
        assert [row["problem"] for row in run["rows"]] == ["p0", "p0", "p1", "p1", "p2", "p2"]
        assert set(run["accuracy"]) == {"pass@1", "pass@2", "maj@2"}
        assert all(row["gold"] == "\\frac{1}{2}" for row in run["rows"])
        assert all(0 < row["peak_kv"] <= row["prompt_tokens"] + 24 for row in run["rows"])
    # Same prompts and seeds in every mode: with nothing evicted yet the samples are the same tokens.
    vanilla = results["runs"][1]["rows"]
    assert all(r["tokens"] >= 1 for r in vanilla)
    report = (out / "report.md").read_text()
    assert "Qwen3-8B peak GB" in report and "Qwen3-32B peak GB" in report
    assert "memento" in result.output and "report:" in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--modes", "evict"], "unknown mode"),
        (["--kv-model", "gpt-9"], "unknown --kv-model"),
        (["--task", "synth:nope"], "unknown synthetic task"),
        (["--samples", "2", "--ks", "3"], "k must be in 1..samples"),
    ],
)
def test_eval_bad_options_are_clear_errors(model_dir, extra, message, tmp_path) -> None:
    result = CliRunner().invoke(app, ["eval", str(model_dir), "-o", str(tmp_path), "--no-progress", *extra])
    assert result.exit_code in (1, 2)
    assert message in result.output


def test_eval_missing_model_is_a_usage_error(tmp_path) -> None:
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such file" in result.output
