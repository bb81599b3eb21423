"""Boundary scoring against a scripted LLM: windows, two passes averaged, retries, missing gaps."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from memento.data.boundaries import BoundarySettings, boundary_messages, parse_scores, score_boundaries, window_spans
from memento.data.llm import LLMClient, LLMConfig
from scripted_llm import ScriptedLLM

SENTENCES = [f"Sentence number {i} says something." for i in range(30)]


def true_score(gap: int) -> int:
    return (gap * 7) % 4


def responder(request: dict) -> str:
    """Scores each asked-for gap by a fixed rule (the user message lists the gap ids)."""
    asked = re.search(r"Score the gaps ([\d, ]+)\.", request["messages"][-1]["content"]).group(1)
    return json.dumps({g.strip(): true_score(int(g)) for g in asked.split(",")})


def run(server: ScriptedLLM, sentences=SENTENCES, **settings):
    config = LLMConfig(base_url=server.base_url, model="m", api_key_env=None, backoff_base_s=0.001, max_retries=2)

    async def main():
        async with LLMClient(config) as client:
            return await score_boundaries(client, "Add things.", sentences, BoundarySettings(**settings))

    return asyncio.run(main())


@pytest.mark.parametrize(("n", "size"), [(30, 16), (30, 11), (2, 16), (16, 16), (17, 16), (100, 11)])
def test_windows_cover_every_gap_exactly_once(n, size) -> None:
    spans = window_spans(n, size)
    gaps = [g for span in spans for g in list(span)[:-1]]
    assert sorted(gaps) == list(range(n - 1))
    assert all(len(span) <= size for span in spans)


def test_two_passes_score_every_gap_and_are_averaged() -> None:
    with ScriptedLLM(responder=responder) as server:
        result = run(server)
        assert server.call_count == len(window_spans(30, 16)) + len(window_spans(30, 11))
    assert result.scores == [float(true_score(g)) for g in range(29)]
    assert result.passes[0] == result.passes[1] == [true_score(g) for g in range(29)]
    assert result.missing == 0 and result.failed_windows == []


def test_passes_that_disagree_average_to_halves() -> None:
    def split_opinion(request: dict) -> str:
        asked = re.search(r"Score the gaps ([\d, ]+)\.", request["messages"][-1]["content"]).group(1)
        gaps = [int(g) for g in asked.split(",")]
        return json.dumps({str(g): 3 if len(gaps) == 15 else 2 for g in gaps})  # the 16-pass says 3, the 11-pass 2

    with ScriptedLLM(responder=split_opinion) as server:
        result = run(server, sentences=SENTENCES[:16], window_sizes=(16, 11))
    assert result.scores == [2.5] * 15
    assert result.passes == [[3] * 15, [2] * 15]


def test_a_malformed_answer_is_retried_then_a_failed_window_is_missing_not_guessed() -> None:
    calls = {"n": 0}

    def flaky(request: dict) -> str:
        calls["n"] += 1
        content = request["messages"][-1]["content"]
        if "Score the gaps 0," in content and "[15]" in content:  # the first 16-window: always garbage
            return "I think the gaps are fine."
        if calls["n"] == 2:
            return '{"0": 7}'  # out of range once: retried
        return responder(request)

    with ScriptedLLM(responder=flaky) as server:
        result = run(server)
    assert [f["pass"] for f in result.failed_windows] == [0]
    assert "no JSON object" in result.failed_windows[0]["error"]
    assert result.passes[0][:15] == [None] * 15  # pass 1's first window is missing...
    assert result.scores[:10] == [float(true_score(g)) for g in range(10)]  # ...pass 2 still scored it
    assert result.missing == 0


def test_gaps_no_pass_scored_are_none() -> None:
    with ScriptedLLM(responder=lambda r: "no") as server:
        result = run(server, sentences=SENTENCES[:5])
    assert result.scores == [None] * 4 and result.missing == 4
    assert len(result.failed_windows) == 2


def test_parse_scores_is_strict_about_what_it_accepts() -> None:
    assert parse_scores('Sure:\n```json\n{"3": 1, "4": 2}\n```', [3, 4]) == {3: 1, 4: 2}
    assert parse_scores('{"3": 1.0, "4": 0, "9": 3}', [3, 4]) == {3: 1, 4: 0}
    for bad, message in [
        ("nothing", "no JSON"),
        ('{"3": 1}', "no score for gaps"),
        ('{"3": 4, "4": 1}', "outside 0-3"),
        ('{"3": 1.5, "4": 1}', "not an integer"),
        ('{"3": true, "4": 1}', "not an integer"),
        ('{"x": 1}', "not a number"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_scores(bad, [3, 4])


def test_the_prompt_numbers_sentences_and_cuts_long_ones() -> None:
    sentences = ["short", "x" * 5000, "end"]
    messages = boundary_messages("P", sentences, range(0, 3), BoundarySettings(max_sentence_chars=100))
    user = messages[-1]["content"]
    assert "[0] short" in user and "[2] end" in user and "[...]" in user and "Score the gaps 0, 1." in user
    assert len(user) < 600
    with pytest.raises(ValueError, match="window sizes"):
        BoundarySettings(window_sizes=(1,))
