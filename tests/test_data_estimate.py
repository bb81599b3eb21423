"""`memento data build --estimate`: the boundary-scoring work is counted exactly before any call.

The same inputs are then built against the scripted LLM: the boundary requests it receives, and
their prompt tokens (counted the same way), must equal the estimate's.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from memento.cli import app
from memento.data.boundaries import SYSTEM as BOUNDARY_SYSTEM
from memento.data.estimate import MESSAGE_OVERHEAD_TOKENS, estimate_build
from memento.data.summarize import SummarizeSettings
from memento.tokens import load_tokenizer
from scripted_llm import ScriptedLLM
from test_data_pipeline import build_args, records, responder, write_input


def test_boundary_work_is_counted_exactly(tmp_path) -> None:
    input_path = tmp_path / "in.jsonl"
    write_input(input_path, 4)
    count = load_tokenizer(None).count
    estimate = estimate_build(records(input_path), count)
    with ScriptedLLM(responder=responder) as server:
        result = CliRunner().invoke(app, build_args(input_path, tmp_path / "out", server.base_url))
        calls = [c.body for c in server.calls]
    assert result.exit_code == 0, result.output
    scoring = [b for b in calls if b["messages"][0]["content"] == BOUNDARY_SYSTEM]
    assert estimate.boundaries.requests == len(scoring) > 0
    sent = sum(count(m["content"]) + MESSAGE_OVERHEAD_TOKENS for b in scoring for m in b["messages"])
    assert estimate.boundaries.prompt_tokens == sent
    assert estimate.traces == estimate.records == 4 and estimate.blocks >= 4
    # The memento range: one round is the floor, every round the ceiling.
    assert 0 < estimate.mementos_low.requests < estimate.mementos_high.requests
    assert estimate.mementos_high.requests == 2 * estimate.mementos_low.requests  # two rounds by default


def test_estimate_cli_calls_nothing_and_prices_the_run(tmp_path) -> None:
    input_path = tmp_path / "in.jsonl"
    write_input(input_path, 3)
    with ScriptedLLM(responder=responder) as server:
        args = build_args(input_path, tmp_path / "out", server.base_url, price_per_1k_prompt=0.5)
        result = CliRunner().invoke(app, [*args, "--price-per-1k-completion", "2", "--estimate"])
        assert server.call_count == 0
    assert result.exit_code == 0, result.output
    assert "boundary scores (exact count)" in result.output and "Price at 0.5 / 2.0" in result.output
    assert not (tmp_path / "out").exists()


def test_estimate_follows_the_settings() -> None:
    record = {"problem": "p", "cot": "<think>" + " ".join(f"Sentence {i} ends here." for i in range(40)) + "</think>"}
    count = load_tokenizer(None).count
    one = estimate_build([record], count, summarize=SummarizeSettings(max_rounds=1))
    three = estimate_build([record], count, summarize=SummarizeSettings(max_rounds=3))
    assert one.mementos_high.requests == one.mementos_low.requests
    assert three.mementos_high.requests == 3 * three.mementos_low.requests
    assert estimate_build(["unreadable"], count).records == 1
    with pytest.raises(ValueError, match="block_tokens"):
        estimate_build([record], count, block_tokens=0)


def test_the_release_example_trace() -> None:
    """On the release's own trace (231 units with today's splitter, 216 with the release's): 39 boundary
    windows, 16 of 16 sentences and 23 of 11, each overlapping the next by one sentence."""
    import json
    from pathlib import Path

    record = json.loads((Path(__file__).parent / "data" / "example_trace.jsonl").read_text())
    estimate = estimate_build([record], load_tokenizer(None).count)
    assert estimate.sentences == 231
    assert estimate.boundaries.requests == -(-230 // 15) + -(-230 // 10) == 39


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--score-norm", "mean"], "score_norm must be one of cuts, blocks"),
        (["--min-blocks", "5", "--max-blocks", "3"], "below"),
    ],
)
def test_bad_segmentation_settings_are_refused_before_any_call(tmp_path, extra, message) -> None:
    input_path = tmp_path / "in.jsonl"
    write_input(input_path, 2)
    with ScriptedLLM(responder=responder) as server:
        result = CliRunner().invoke(app, [*build_args(input_path, tmp_path / "out", server.base_url), *extra])
        assert server.call_count == 0
    assert result.exit_code == 1 and message in result.output
