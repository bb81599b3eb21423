"""Synthetic memento tasks: answers and mementos checked against the prompt, splits, records, the CLI."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memento.cli import app
from memento.format import MEMENTO_TOKENS, SPECIAL_TOKENS, parse_response, trace_from_record
from memento.records_io import read_records
from memento.synth import (
    SPLITS,
    TASKS,
    Problem,
    chat_text,
    generate,
    split_of,
    summarize,
    tiny_token_count,
    write_split,
)
from memento.tiny_tokenizer import DEFAULT_ALPHABET

runner = CliRunner()
ENV = {"COLUMNS": "200"}
N = 300


@pytest.fixture(scope="module", params=sorted(TASKS))
def task(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def problems(task: str) -> list[Problem]:
    return generate(task, "train", N, seed=0)


# ----------------------------------------------------------------------------------------------
# Independent solvers: parse the prompt text and recompute the state after every item
# ----------------------------------------------------------------------------------------------


def running_sum_states(prompt: str) -> list[tuple[str, int]]:
    """(label, total after it) for every item of a running_sum prompt."""
    match = re.fullmatch(r"SUM(?: MOD (\d+))?: ((?:[a-zA-Z]\d+ )*[a-zA-Z]\d+)", prompt)
    assert match, prompt
    modulus = int(match.group(1) or 0)
    states, total = [], 0
    for item in match.group(2).split(" "):
        total += int(item[1:])
        if modulus:
            total %= modulus
        states.append((item[0], total))
    return states


def pointer_walk_states(prompt: str) -> list[tuple[int, str]]:
    """(steps done, node) after every step of a pointer_walk prompt."""
    match = re.fullmatch(r"walk (\d+) from ([a-z]): ((?:[a-z]>[a-z] )*[a-z]>[a-z])", prompt)
    assert match, prompt
    table = dict(entry.split(">") for entry in match.group(3).split(" "))
    node, states = match.group(2), []
    for step in range(1, int(match.group(1)) + 1):
        node = table[node]
        states.append((step, node))
    return states


def check_running_sum(problem: Problem) -> None:
    states = running_sum_states(problem.prompt)
    values = {label: int(v) for label, v in re.findall(r"([a-zA-Z])(\d+)", problem.prompt.split(": ", 1)[1])}
    assert problem.answer == str(states[-1][1])
    consumed, total = 0, 0  # the state a block starts from: what the previous memento says
    for unit in problem.trace.units:
        for step in unit.block.split(" "):
            label, shown, before, value, after = re.fullmatch(r"([a-zA-Z])(\d+):(\d+)\+(\d+)=(\d+)", step).groups()
            assert label == states[consumed][0] and shown == value
            assert int(before) == total and int(value) == values[label] and int(after) == states[consumed][1]
            consumed, total = consumed + 1, int(after)
        label, memento_total = re.fullmatch(r"([a-zA-Z])=(\d+)", unit.memento).groups()
        assert (label, int(memento_total)) == states[consumed - 1]
        # the next block starts from the memento alone
        total = int(memento_total)
    assert consumed == len(states)


def check_pointer_walk(problem: Problem) -> None:
    states = pointer_walk_states(problem.prompt)
    table = dict(re.findall(r"([a-z])>([a-z])", problem.prompt.split(": ", 1)[1]))
    start = re.match(r"walk \d+ from ([a-z])", problem.prompt).group(1)
    assert problem.answer == states[-1][1]
    done, node = 0, start
    for unit in problem.trace.units:
        for step in unit.block.split(" "):
            index, here, there = re.fullmatch(r"(\d+):([a-z])>([a-z])", step).groups()
            assert int(index) == done + 1 and here == node and there == table[here] == states[done][1]
            done, node = done + 1, there
        steps, memento_node = re.fullmatch(r"n=(\d+) ([a-z])", unit.memento).groups()
        assert (int(steps), memento_node) == states[done - 1]
        done, node = int(steps), memento_node  # the next block starts from the memento alone
    assert done == len(states)


def stream_sum_states(prompt: str) -> list[tuple[int, int, int]]:
    """(digit, total, steps left) after every step of a stream_sum prompt."""
    match = re.fullmatch(r"STREAM a(\d) c(\d) x(\d) n(\d\d)", prompt)
    assert match, prompt
    a, c, x, n = (int(g) for g in match.groups())
    states, total = [], 0
    for left in range(n - 1, -1, -1):
        x = (a * x + c) % 10
        total = (total + x) % 10
        states.append((x, total, left))
    return states


STREAM_STEP = re.compile(r"(\d)\*(\d)=(\d)\+(\d)=(\d) n(\d\d) (\d)\+(\d)=(\d)")


def check_stream_sum(problem: Problem) -> None:
    states = stream_sum_states(problem.prompt)
    a, c, x = (int(v) for v in re.fullmatch(r"STREAM a(\d) c(\d) x(\d) n\d\d", problem.prompt).groups())
    assert problem.answer == str(states[-1][1])
    done, total = 0, 0
    for unit in problem.trace.units:
        steps = STREAM_STEP.findall(unit.block)
        assert steps and STREAM_STEP.sub("", unit.block).strip() == ""  # nothing but steps
        for sa, sx, ax, sc, new_x, left, before, added, after in steps:
            assert (int(sa), int(sx), int(sc), int(before), added) == (a, x, c, total, new_x)
            assert int(ax) == a * x % 10
            assert (int(new_x), int(after), int(left)) == states[done]
            done, x, total = done + 1, int(new_x), int(after)
        ma, mc, mx, ms, mn = re.fullmatch(r"a(\d)c(\d)x(\d)s(\d)n(\d\d)", unit.memento).groups()
        assert (int(ma), int(mc)) == (a, c) and (int(mx), int(ms), int(mn)) == states[done - 1]
        x, total = int(mx), int(ms)  # the next block starts from the memento alone
    assert done == len(states)


CHECKERS = {"running_sum": check_running_sum, "pointer_walk": check_pointer_walk, "stream_sum": check_stream_sum}


def test_every_task_has_an_independent_checker() -> None:
    assert set(CHECKERS) == set(TASKS)


def test_answers_and_mementos_match_the_state_recomputed_from_the_prompt(task: str, problems: list[Problem]) -> None:
    for problem in problems:
        CHECKERS[task](problem)
        assert problem.trace.final_answer == problem.answer
        assert problem.memento_response().endswith("</think>\n" + problem.answer)


def test_shape_at_default_difficulty(task: str, problems: list[Problem]) -> None:
    assert len(problems) == N
    blocks = [len(p.trace.units) for p in problems]
    assert statistics.median(blocks) >= 6 and min(blocks) >= 6 and max(blocks) <= 8
    for p in problems:
        for unit in p.trace.units:
            assert len(unit.block) >= 4 * len(unit.memento), (p.uid, unit)
    stats = summarize(problems)
    assert stats["min_unit_ratio"] >= 4 and stats["median_blocks"] >= 6
    # short enough for a ~1M-parameter model on 2 CPU cores (stream_sum writes out more arithmetic)
    assert stats["median_chat_tokens"] <= (650 if task == "stream_sum" else 400)
    assert stats["median_chat_tokens"] == statistics.median(tiny_token_count(chat_text(p)) for p in problems)


def test_tiny_token_count_counts_specials_once() -> None:
    assert tiny_token_count("<|im_start|>ab<|block_start|>c<|im_end|>") == 6


def test_only_alphabet_characters(problems: list[Problem]) -> None:
    specials = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    allowed = set(DEFAULT_ALPHABET)
    for p in problems:
        for text in (
            p.prompt,
            p.answer,
            specials.sub("", p.memento_response()),
            specials.sub("", p.control_response()),
        ):
            assert set(text) <= allowed, (p.uid, set(text) - allowed)


def test_control_response_is_the_same_reasoning_without_mementos(problems: list[Problem]) -> None:
    for p in problems:
        control = p.control_response()
        assert not any(tok in control for tok in MEMENTO_TOKENS)
        for unit in p.trace.units:
            assert unit.memento not in control.split("\n")
        inner, answer = control.removeprefix("<think>\n").split("\n</think>")
        assert inner.split("\n") == [u.block for u in p.trace.units]
        assert answer == "\n" + p.answer == p.trace.answer


def test_records_round_trip_through_the_format(problems: list[Problem]) -> None:
    for p in problems[:100]:
        for schema in ("default", "full"):
            record = p.record(schema)
            trace = trace_from_record(record)
            assert trace == parse_response(p.memento_response(), prompt=p.prompt)
            assert [u.block for u in trace.units] == [u.block for u in p.trace.units]
            assert record["uid"] == p.uid and record["task"] == p.task and record["answer"] == p.answer
            assert record["control_response"] == p.control_response()
            assert record["domain"] == "math" and record["source"] == f"synth:{p.task}"
            assert record["difficulty"] == len(p.trace.units)
        assert len(p.record("full")["sentences"]) > len(p.trace.units)  # one sentence per step


# ----------------------------------------------------------------------------------------------
# Determinism and splits
# ----------------------------------------------------------------------------------------------


def test_deterministic_by_seed(task: str, problems: list[Problem]) -> None:
    assert generate(task, "train", N, seed=0) == problems
    other = generate(task, "train", N, seed=1)
    assert [p.uid for p in other] != [p.uid for p in problems]
    assert len({p.uid for p in problems}) == N  # distinct within a call
    assert generate(task, "train", 10, seed=0) == problems[:10]  # a prefix of the same stream


def test_splits_never_overlap_across_seeds(task: str) -> None:
    prompts: dict[str, set[str]] = {split: set() for split in SPLITS}
    for seed in (0, 1, 2):
        for split in SPLITS:
            n = 200 if split == "train" else 60
            got = generate(task, split, n, seed=seed)
            assert all(split_of(task, p.prompt) == split for p in got)
            prompts[split] |= {p.prompt for p in got}
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    # the split depends on the prompt only: other knobs cannot move a test problem into train
    assert split_of(task, next(iter(prompts["test"]))) == "test"


def test_knobs_change_the_problems() -> None:
    long = generate("running_sum", "test", 50, seed=3, min_blocks=10, max_blocks=10, items_per_block=4)
    assert all(len(p.trace.units) == 10 for p in long)
    for p in long:
        check_running_sum(p)
    walks = generate("pointer_walk", "validation", 50, nodes=20, steps_per_block=5)
    for p in walks:
        check_pointer_walk(p)
        assert len(re.findall(r"[a-z]>[a-z]", p.prompt)) == 20


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "knobs", "message"),
    [
        (("nope", "train", 5), {}, "unknown task"),
        (("running_sum", "dev", 5), {}, "unknown split"),
        (("running_sum", "train", -1), {}, "non-negative"),
        (("running_sum", "train", 5), {"blocks": 3}, "unknown knob"),
        (("pointer_walk", "train", 5), {"items_per_block": 3}, "unknown knob"),
        (("running_sum", "train", 5), {"max_blocks": 2}, "max_blocks"),
        (("running_sum", "train", 5), {"max_blocks": 20}, "at most 52"),
        (("pointer_walk", "train", 5), {"nodes": 27}, "nodes"),
        (("running_sum", "train", 5), {"max_value": 2.5}, "integer"),
        (("running_sum", "train", 5), {"items_per_block": 1}, "under 4x"),  # blocks too short
        (
            ("running_sum", "train", 30),
            {"min_blocks": 1, "max_blocks": 1, "items_per_block": 4, "max_value": 1},
            "cannot find 30",
        ),
    ],
)
def test_errors(args, knobs, message) -> None:
    with pytest.raises(ValueError, match=message):
        generate(*args, **knobs)


def test_zero_problems_and_lower_min_ratio() -> None:
    assert generate("running_sum", "train", 0) == []
    short = generate("running_sum", "train", 5, items_per_block=1, min_ratio=0)
    assert all(len(p.trace.units[0].block.split(" ")) == 1 for p in short)


# ----------------------------------------------------------------------------------------------
# Files and the CLI
# ----------------------------------------------------------------------------------------------


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env=ENV)


def test_write_split_jsonl_and_parquet(problems: list[Problem], tmp_path: Path) -> None:
    for name, schema in (("a.jsonl", "default"), ("b.parquet", "full")):
        path = tmp_path / name
        assert write_split(path, problems[:20], schema=schema) == 20
        rows = [r for _, r in read_records(path)]
        assert [r["uid"] for r in rows] == [p.uid for p in problems[:20]]
        assert all(trace_from_record(r) == p.trace for r, p in zip(rows, problems, strict=False))
        result = invoke("validate", path)
        assert result.exit_code == 0, result.output
    with pytest.raises(ValueError, match="schema"):
        write_split(tmp_path / "c.jsonl", problems[:1], schema="big")


def test_cli_synth_writes_a_valid_split(tmp_path: Path) -> None:
    out = tmp_path / "walk.jsonl"
    result = invoke(
        "synth", "pointer_walk", "--split", "test", "--n", 40, "--seed", 2, "--out", out, "--knob", "nodes=8"
    )
    assert result.exit_code == 0, result.output
    assert "40 pointer_walk test problems" in result.output and "median" in result.output
    lines = out.read_text().splitlines()
    assert len(lines) == 40
    expected = generate("pointer_walk", "test", 40, seed=2, nodes=8)
    assert [json.loads(line)["uid"] for line in lines] == [p.uid for p in expected]
    assert invoke("validate", out).exit_code == 0

    full = tmp_path / "sum.parquet"
    result = invoke("synth", "--n", 30, "--out", full, "--schema", "full", "-k", "max_blocks=9")
    assert result.exit_code == 0, result.output
    assert "30 running_sum train problems" in result.output
    validated = invoke("validate", full, "--json")
    assert validated.exit_code == 0
    assert json.loads(validated.output)["stats"]["schema"] == {"default": 0, "full": 30}


@pytest.mark.parametrize(
    "args",
    [
        ("synth", "nope", "--out", "x.jsonl"),
        ("synth", "--out", "x.jsonl", "--knob", "bogus=1"),
        ("synth", "--out", "x.jsonl", "--knob", "max_blocks"),
        ("synth", "--out", "x.jsonl", "--knob", "max_blocks=ten"),
        ("synth", "--out", "x.jsonl", "--split", "dev"),
        ("synth", "--out", "x.jsonl", "--schema", "big"),
        ("synth", "--out", "x.txt"),
        ("synth",),
    ],
)
def test_cli_synth_usage_errors_exit_2(args, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "x.jsonl").exists()


def test_running_sum_modulus_knob() -> None:
    mod10 = generate("running_sum", "train", 40, seed=1)
    plain = generate("running_sum", "train", 40, seed=1, modulus=0)
    assert all(p.prompt.startswith("SUM MOD 10: ") and len(p.answer) == 1 for p in mod10)
    assert all(p.prompt.startswith("SUM: ") for p in plain)
    assert max(int(p.answer) for p in plain) > 9
    for p in [*mod10, *plain]:
        check_running_sum(p)
    with pytest.raises(ValueError, match="modulus"):
        generate("running_sum", "train", 5, modulus=-1)
