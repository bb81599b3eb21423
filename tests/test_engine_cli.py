"""``memento generate``: the engine from the command line, on a saved tiny checkpoint."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from helpers import tiny_model
from memento.chat import chat_prompt
from memento.cli import app
from memento.engine import LLM, SamplingParams
from memento.tiny_tokenizer import build_tiny_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tokenizer = build_tiny_tokenizer()
    tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_generate_writes_json_lines_equal_to_the_python_api(checkpoint, tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["generate", str(checkpoint), "-p", "SUM: a1 b2", "-p", "SUM: c3", "--max-tokens", "9", "-o", str(out)]
    result = runner.invoke(app, [*args, "--kv-budget-tokens", "500", "--keep-last-n", "0"])
    assert result.exit_code == 0, result.output
    assert "2 prompts x 1: 18 tokens" in result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    llm = LLM(checkpoint, kv_budget_tokens=500)
    tokenizer = llm.engine.tokenizer
    want = llm.generate(
        [chat_prompt(tokenizer, p) for p in ("SUM: a1 b2", "SUM: c3")], SamplingParams(temperature=0, max_tokens=9)
    )
    assert [r["token_ids"] for r in rows] == [w.outputs[0].token_ids for w in want]
    assert all(r["finish_reason"] == "length" and r["peak_kv"] > 0 for r in rows)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--kv-budget-tokens", "5"], "KV budget is 5 tokens"),
        (["--top-p", "0"], "top_p"),
        (["--keep-last-n", "-3"], "keep_last_n"),
    ],
)
def test_generate_reports_bad_settings_without_a_traceback(checkpoint, extra, message):
    result = runner.invoke(app, ["generate", str(checkpoint), "-p", "SUM: a1 b2", *extra])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_generate_needs_a_prompt(checkpoint):
    result = runner.invoke(app, ["generate", str(checkpoint)])
    assert result.exit_code == 2 and "--prompt" in result.output
