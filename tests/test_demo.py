"""`memento demo --quick` end to end: data, both trainings, three evaluations, report, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from memento.cli import app
from memento.demo import QUICK, DemoConfig, run_demo


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_quick_demo_writes_the_report_and_results(quick_run) -> None:
    out, output = quick_run
    results = json.loads((out / "results.json").read_text())
    names = [f"{r['label']} [{r['mode']['name']}]" for r in results["runs"]]
    assert names == ["control [vanilla]", "memento [memento]", "memento [restart]"]
    for run in results["runs"]:
        assert run["problems"] == QUICK.test_problems
        assert len(run["rows"]) == QUICK.test_problems
        assert run["engine"]["kv_budget_tokens"] == QUICK.kv_budget_tokens  # one budget for every run
        assert run["generated_tokens"] > 0 and run["tokens_per_second"] > 0
    assert results["targets"][0]["target"].startswith("memento pass@1")
    memento = results["runs"][1]
    assert memento["engine"]["evictions"] > 0  # even the quick model writes mementos, and blocks go
    assert memento["mean_peak_kv"] < results["runs"][0]["mean_peak_kv"]
    report = (out / "report.md").read_text()
    assert "| control [vanilla] |" in report and "| memento [restart] |" in report
    assert "restart ablation" in report and (out / "kv_sawtooth.png").exists()
    assert "[vanilla]" in output and "[restart]" in output and "report:" in output  # table, markup escaped


def test_quick_demo_checkpoints_load_with_plain_transformers(quick_run) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = quick_run
    for name in ("control-model", "memento-model"):
        tokenizer = AutoTokenizer.from_pretrained(out / name)
        model = AutoModelForCausalLM.from_pretrained(out / name).eval()
        ids = tokenizer("<|block_start|>STREAM", return_tensors="pt", add_special_tokens=False)["input_ids"]
        assert ids.shape[1] == 7  # the memento token is one token, then one per character
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape == (1, 7, len(tokenizer)) and torch.isfinite(logits).all()


def test_rerun_reuses_the_models_and_other_settings_are_refused(quick_run) -> None:
    out, _ = quick_run
    logged: list[str] = []
    results = run_demo(out, quick=True, show_progress=False, log=logged.append)
    assert results["training_reused"] is True
    assert any("reusing" in line for line in logged)
    with pytest.raises(SystemExit, match="other settings"):
        run_demo(out, config=DemoConfig(stage1_steps=7), show_progress=False, log=logged.append)
