"""memento.data.summarize against a scripted OpenAI-compatible server: the compress -> judge -> rewrite
loop, best-of-rounds selection, retries of malformed answers, context passing, and the verdict parser."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from memento.data.llm import LLMClient, LLMConfig
from memento.data.summarize import (
    COMPRESSOR_SYSTEM,
    JUDGE_SYSTEM,
    SummarizeSettings,
    check_memento,
    compressor_messages,
    judge_messages,
    parse_judgement,
    summarize_block,
    summarize_trace,
)
from scripted_llm import ScriptedLLM

PROBLEM = "Find the sum of the roots of x^2-5x+6=0."
BLOCK = "By Vieta the sum of roots is -b/a = 5. Check: roots 2 and 3, 2+3=5. OK."


def verdict(total: int, feedback: str = "fine") -> str:
    """A consistent judge answer with the given total (scores filled greedily, no deductions)."""
    scores, left = {}, total
    for name, top in [
        ("formulas", 3),
        ("values", 2),
        ("methods", 2),
        ("verification", 1),
        ("faithful", 1),
        ("result_first", 1),
    ]:
        scores[name] = min(top, left)
        left -= scores[name]
    return json.dumps({"scores": scores, "deductions": 0, "total": total, "feedback": feedback})


class Script:
    """A responder: compressor and judge answers from two queues (the last answer repeats once a queue
    runs dry), with every request recorded by role."""

    def __init__(self, mementos: list[str], judgements: list[str]):
        self.mementos, self.judgements = list(mementos), list(judgements)
        self.requests: dict[str, list[list[dict]]] = {"compressor": [], "judge": []}

    def __call__(self, body: dict) -> str:
        system = body["messages"][0]["content"]
        role = {COMPRESSOR_SYSTEM: "compressor", JUDGE_SYSTEM: "judge"}[system]
        self.requests[role].append(body["messages"])
        queue = self.mementos if role == "compressor" else self.judgements
        return queue.pop(0) if len(queue) > 1 else queue[0]

    def user(self, role: str, index: int) -> str:
        return self.requests[role][index][-1]["content"]


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptedLLM]:
    with ScriptedLLM() as s:
        yield s


def run(server: ScriptedLLM, script: Script, coro_fn, **config):
    """Point the shared server at ``script`` and run ``coro_fn(client)`` on a fresh client."""
    server.reset()
    server.responder = script
    cfg = LLMConfig(
        base_url=server.base_url, model="m", api_key_env=None, backoff_base_s=0.001, max_retries=2, **config
    )

    async def main():
        async with LLMClient(cfg) as client:
            return await coro_fn(client)

    return asyncio.run(main())


def block_run(server, script, settings=None, previous=(), block=BLOCK):
    return run(server, script, lambda c: summarize_block(c, PROBLEM, list(previous), block, settings))


# --- the loop ------------------------------------------------------------------------------------


def test_accepted_in_one_round(server) -> None:
    script = Script(["sum of roots: 5 (Vieta: -b/a); check: 2+3=5 ok"], [verdict(9)])
    result = block_run(server, script)
    assert server.call_count == 2
    assert result.accepted and result.final_score == 9 and result.error is None
    assert result.memento == "sum of roots: 5 (Vieta: -b/a); check: 2+3=5 ok"
    assert len(result.rounds) == 1
    assert result.rounds[0]["judgement"]["total"] == 9 and result.rounds[0]["cached"] is False
    # The judge saw the memento and the block.
    assert "sum of roots: 5" in script.user("judge", 0) and BLOCK in script.user("judge", 0)


def test_rewrite_uses_feedback(server) -> None:
    feedback = "Quote the formula -b/a verbatim and name Vieta."
    script = Script(["  roots sum to 5  ", "sum: 5 via Vieta -b/a"], [verdict(5, feedback), verdict(9)])
    result = block_run(server, script)
    assert server.call_count == 4
    assert result.accepted and result.final_score == 9 and result.memento == "sum: 5 via Vieta -b/a"
    rewrite = script.user("compressor", 1)
    assert feedback in rewrite and "roots sum to 5" in rewrite  # the feedback and the stripped first attempt
    assert feedback not in script.user("compressor", 0)
    assert [r["judgement"]["total"] for r in result.rounds] == [5, 9]
    assert result.rounds[0]["feedback"] == feedback


def test_not_accepted_keeps_best_with_ties_to_later(server) -> None:
    script = Script(["first", "second", "third"], [verdict(5, "more")])
    result = block_run(server, script, SummarizeSettings(max_rounds=3))
    assert server.call_count == 6
    assert not result.accepted and result.final_score == 5 and result.memento == "third"
    assert len(result.rounds) == 3

    script = Script(["first", "second", "third"], [verdict(6), verdict(4), verdict(6)])
    assert block_run(server, script, SummarizeSettings(max_rounds=3)).memento == "third"

    script = Script(["first", "second"], [verdict(7), verdict(3)])
    result = block_run(server, script)  # default: 2 rounds
    assert server.call_count == 4
    assert result.memento == "first" and result.final_score == 7 and not result.accepted


def test_judge_answer_in_prose_and_fences(server) -> None:
    answer = f"Here is my review.\n```json\n{verdict(8)}\n```\nHope this helps {{:)}}."
    result = block_run(server, Script(["m"], [answer]))
    assert server.call_count == 2 and result.accepted and result.final_score == 8


def test_malformed_judgements_are_retried(server) -> None:
    out_of_range = json.loads(verdict(9))
    out_of_range["scores"]["formulas"] = 4
    script = Script(["m"], ["{not json", json.dumps(out_of_range), verdict(9)])
    result = block_run(server, script)
    assert server.call_count == 4  # 1 compressor + 3 judge attempts (max_retries=2)
    assert len(script.requests["judge"]) == 3
    assert result.accepted and result.final_score == 9


def test_persistently_malformed_judge_keeps_memento_unscored(server) -> None:
    script = Script(["m1", "m2"], [verdict(5, "fix it"), "no verdict today"])
    result = block_run(server, script)
    assert server.call_count == 1 + 1 + 1 + 3  # compress, judge, compress, judge x3
    assert result.memento == "m2"  # the latest memento, kept unscored
    assert result.final_score is None and not result.accepted
    assert result.rounds[1]["judgement"] is None and "judge failed in round 2" in result.error
    assert result.rounds[1]["error"] == result.error


def test_compressor_special_token_rejected_and_retried(server) -> None:
    script = Script(["<|summary_start|>m<|summary_end|>", "<think>m", "", "clean memento"], [verdict(10)])
    result = block_run(server, script)
    assert len(script.requests["compressor"]) == 3  # the third answer ("") is the last retry
    assert result.memento is None and "compression failed in round 1" in result.error
    assert result.rounds == [] and result.final_score is None

    script = Script(["<|block_end|>", "clean memento"], [verdict(10)])
    result = block_run(server, script)
    assert server.call_count == 3 and result.memento == "clean memento" and result.accepted


def test_over_long_memento_rejected(server) -> None:
    script = Script(["x" * 50, "short"], [verdict(9)])
    result = block_run(server, script, SummarizeSettings(max_memento_chars=20))
    assert len(script.requests["compressor"]) == 2 and result.memento == "short"
    assert "under 20 characters" in script.user("compressor", 0)


def test_trace_passes_earlier_mementos(server) -> None:
    script = Script(["memento one", "memento two", "memento three"], [verdict(9)])
    blocks = ["block A", "block B", "block C"]
    results = run(server, script, lambda c: summarize_trace(c, PROBLEM, blocks, SummarizeSettings()))
    assert [r.memento for r in results] == ["memento one", "memento two", "memento three"]
    third = script.user("compressor", 2)
    assert "[1] memento one" in third and "[2] memento two" in third and "block C" in third
    assert "memento" not in script.user("compressor", 0).split("<earlier_mementos>")[1].split("</earlier_mementos>")[0]
    assert "[1] memento one" in script.user("judge", 2)

    script = Script(["memento one", "memento two", "memento three"], [verdict(9)])
    settings = SummarizeSettings(context_mementos=1)
    run(server, script, lambda c: summarize_trace(c, PROBLEM, blocks, settings))
    third = script.user("compressor", 2)
    assert "memento one" not in third and "[1] memento two" in third


def test_trace_stops_after_a_block_without_memento(server) -> None:
    script = Script(["ok", "<|block_start|>"], [verdict(9)])
    results = run(server, script, lambda c: summarize_trace(c, PROBLEM, ["a", "b", "c"]))
    assert [r.memento for r in results] == ["ok", None, None]
    assert results[2].error.startswith("skipped") and len(script.requests["compressor"]) == 1 + 3


# --- prompts and parsers -------------------------------------------------------------------------


def test_prompts_shape() -> None:
    first = compressor_messages(PROBLEM, [], BLOCK, None, None)
    assert first[0] == {"role": "system", "content": COMPRESSOR_SYSTEM} and first[1]["role"] == "user"
    assert "(none: this is the first block)" in first[1]["content"] and "previous_memento" not in first[1]["content"]
    judge = judge_messages(PROBLEM, ["a"], BLOCK, "the memento")
    assert judge[0]["content"] == JUDGE_SYSTEM and "<memento>\nthe memento\n</memento>" in judge[1]["content"]


def test_check_memento() -> None:
    assert check_memento("  a; b: 1 \n") == "a; b: 1"
    for bad in ["   ", "x </think>", "x <|block_start|>", "<|summary_end|>"]:
        with pytest.raises(ValueError):
            check_memento(bad)
    with pytest.raises(ValueError, match="cap"):
        check_memento("abcdef", max_chars=5)


def test_parse_judgement_recomputes_total() -> None:
    data = json.loads(verdict(9))
    data["deductions"], data["total"] = 3, 9
    j = parse_judgement(json.dumps(data))
    assert j.total == 6 and j.reported_total == 9 and j.recomputed
    data["deductions"], data["total"] = 15, 0  # clamped at 0
    j = parse_judgement(json.dumps(data))
    assert j.total == 0 and not j.recomputed
    assert parse_judgement(verdict(7)).as_dict()["reported_total"] is None


def test_parse_judgement_fences_and_prose() -> None:
    assert parse_judgement(f"```json\n{verdict(8)}\n```").total == 8
    # The last verdict wins over a draft; a stray object after it without scores is ignored.
    text = f"Draft: {verdict(3)}\nFinal answer:\n{verdict(10)}\nNotes: {{}}"
    assert parse_judgement(text).total == 10
    # Unescaped LaTeX in the feedback is repaired rather than rejected.
    raw = verdict(9).replace('"fine"', '"write \\sqrt{2} verbatim"')
    assert parse_judgement(raw).feedback == "write \\sqrt{2} verbatim"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["scores"].update(formulas=4),
        lambda d: d["scores"].update(values=-1),
        lambda d: d["scores"].update(result_first=2),
        lambda d: d["scores"].update(methods=1.5),
        lambda d: d["scores"].update(methods="2"),
        lambda d: d["scores"].update(faithful=True),
        lambda d: d["scores"].pop("verification"),
        lambda d: d["scores"].update(style=1),
        lambda d: d.update(deductions=-1),
        lambda d: d.pop("deductions"),
        lambda d: d.pop("total"),
        lambda d: d.update(feedback=None),
        lambda d: d.update(scores=[1, 2]),
    ],
)
def test_parse_judgement_rejects_bad_fields(mutate) -> None:
    data = json.loads(verdict(9))
    mutate(data)
    with pytest.raises(ValueError):
        parse_judgement(json.dumps(data))


@pytest.mark.parametrize("garbage", ["", "no json here", "{broken", "[1, 2, 3]", '{"total": 9}', "```json\n```"])
def test_parse_judgement_garbage(garbage) -> None:
    with pytest.raises(ValueError):
        parse_judgement(garbage)


def test_settings_validation() -> None:
    for bad in [{"threshold": 11}, {"max_rounds": 0}, {"max_memento_chars": 0}, {"context_mementos": -1}]:
        with pytest.raises(ValueError):
            SummarizeSettings(**bad)
