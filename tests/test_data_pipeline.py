"""`memento data build` end to end against a scripted LLM, and its crash safety under SIGKILL."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from memento.cli import app
from memento.data.boundaries import SYSTEM as BOUNDARY_SYSTEM
from memento.data.summarize import COMPRESSOR_SYSTEM, JUDGE_SYSTEM
from memento.format import trace_from_record
from memento.records_io import read_records
from scripted_llm import ScriptedLLM

STEPS = [
    "We set up the equation x^2 - 5x + 6 = 0 for the unknown.",
    "Factoring gives (x - 2)(x - 3) = 0, so the roots are 2 and 3.",
    "Now we check each root against the constraint x > 2.",
    "Only x = 3 satisfies it, since 2 is not greater than 2.",
    "Next we compute the requested sum of squares for x = 3.",
    "That is 3^2 + 1 = 10, which is the final value asked for.",
    "Let us double check the arithmetic once more to be safe.",
    "Indeed 9 + 1 = 10, so the computation is consistent.",
]


def cot(i: int) -> str:
    body = " ".join(f"{s} (case {i}, step {j})" for j, s in enumerate(STEPS * 3))
    return f"<think>\n{body}\n</think>\n\nThe answer is {10 + i}."


def write_input(path: Path, n: int) -> None:
    rows = [
        {"task_id": f"t{i}", "problem": f"Problem {i}: solve it.", "cot": cot(i), "source": "unit", "domain": "math"}
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def responder(request: dict) -> str:
    """Deterministic answers for the three kinds of call, told apart by their system prompt."""
    system, user = request["messages"][0]["content"], request["messages"][-1]["content"]
    if system == BOUNDARY_SYSTEM:
        asked = re.search(r"Score the gaps ([\d, ]+)\.", user).group(1)
        return json.dumps({g.strip(): (3 if int(g) % 8 == 7 else int(g) % 2) for g in asked.split(",")})
    if system == COMPRESSOR_SYSTEM:
        digest = sum(map(ord, user)) % 997
        return f"result: block digest {digest}; x: 3; sum: 10"
    if system == JUDGE_SYSTEM:
        scores = {"formulas": 3, "values": 2, "methods": 2, "verification": 1, "faithful": 1, "result_first": 1}
        return json.dumps({"scores": scores, "deductions": 1, "total": 9, "feedback": "fine"})
    raise AssertionError(f"unexpected system prompt: {system[:60]}")


def build_args(input_path: Path, out: Path, base_url: str, **extra) -> list[str]:
    args = ["data", "build", str(input_path), "-o", str(out), "--base-url", base_url, "--model", "m"]
    args += ["--api-key-env", "NO_SUCH_KEY_VAR", "--shard-size", "3", "--min-block-tokens", "60", "--no-progress"]
    args += ["--concurrency", "4", "--traces-in-flight", "2"]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def records(path: Path) -> list[dict]:
    return [r for _, r in read_records(path)]


def test_build_writes_both_schemas_that_validate(tmp_path) -> None:
    input_path = tmp_path / "in.jsonl"
    write_input(input_path, 5)
    with ScriptedLLM(responder=responder) as server:
        result = CliRunner().invoke(app, build_args(input_path, tmp_path / "out", server.base_url))
    assert result.exit_code == 0, result.output
    default, full = records(tmp_path / "out/default.jsonl"), records(tmp_path / "out/full.jsonl")
    assert [r["task_id"] for r in default] == [f"t{i}" for i in range(5)]
    assert set(default[0]) >= {"problem", "response", "domain", "source", "difficulty"}
    for row in full:
        trace = trace_from_record(row)  # the full schema's sentences/blocks/summaries agree with the response
        assert len(trace.units) >= 2
        assert trace.final_answer.startswith("The answer is")
        assert all(unit.memento.startswith("result: block digest") for unit in trace.units)
        assert "".join(row["sentences"]) == cot(int(row["task_id"][1:])).split("<think>")[1].split("</think>")[0]
    check = CliRunner().invoke(app, ["validate", str(tmp_path / "out/full.jsonl")])
    assert check.exit_code == 0, check.output
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["default"] == 5 and summary["failed"] == 0 and summary["llm"]["failures"] == 0
    stats = CliRunner().invoke(app, ["data", "stats", str(tmp_path / "out/default.jsonl"), "--plots", str(tmp_path)])
    assert stats.exit_code == 0, stats.output
    assert (tmp_path / "blocks_per_trace.png").exists() and (tmp_path / "compression_ratio.png").exists()


def test_a_rerun_reuses_shards_and_the_cache_and_other_settings_are_refused(tmp_path) -> None:
    input_path = tmp_path / "in.jsonl"
    write_input(input_path, 4)
    out = tmp_path / "out"
    with ScriptedLLM(responder=responder) as server:
        first = CliRunner().invoke(app, build_args(input_path, out, server.base_url))
        calls = server.call_count
        again = CliRunner().invoke(app, build_args(input_path, out, server.base_url))
        assert server.call_count == calls  # every shard was done: no LLM call at all
        (out / "shards" / "done-00001.json").unlink()  # pretend the second shard never finished
        third = CliRunner().invoke(app, build_args(input_path, out, server.base_url))
        assert server.call_count == calls  # redone from the cache
        other = CliRunner().invoke(app, build_args(input_path, out, server.base_url, lam=1.0))
    assert first.exit_code == again.exit_code == third.exit_code == 0
    assert "2 of 2 shards were already done" in again.output and "1 of 2 shards" in third.output
    assert other.exit_code == 1 and "other settings" in other.output
    assert [r["task_id"] for r in records(out / "default.jsonl")] == ["t0", "t1", "t2", "t3"]


def test_a_trace_whose_mementos_keep_failing_is_recorded_not_guessed(tmp_path) -> None:
    input_path = tmp_path / "in.jsonl"
    write_input(input_path, 3)

    def no_mementos_for_t1(request: dict) -> str:
        if (
            request["messages"][0]["content"] == COMPRESSOR_SYSTEM
            and "Problem 1:" in request["messages"][-1]["content"]
        ):
            return "<|block_start|>"  # always rejected by the memento check
        return responder(request)

    with ScriptedLLM(responder=no_mementos_for_t1) as server:
        result = CliRunner().invoke(app, build_args(input_path, tmp_path / "out", server.base_url, max_retries=1))
    assert result.exit_code == 0, result.output
    assert [r["task_id"] for r in records(tmp_path / "out/default.jsonl")] == ["t0", "t2"]
    failed = records(tmp_path / "out/failed.jsonl")
    assert len(failed) == 1 and "no memento" in failed[0]["reason"]
    assert failed[0]["task_id"] == "t1"  # named by its id, not only by its position
    umask = os.umask(0)
    os.umask(umask)
    for name in ("default.jsonl", "failed.jsonl", "summary.json"):  # ordinary modes, not mkstemp's 0600
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_sigkill_and_resume_gives_the_uninterrupted_output(tmp_path) -> None:
    """Kill the build several times mid-run, rerun to the end: identical output, nothing lost or
    duplicated, and no call repeated whose answer had reached the cache."""
    input_path = tmp_path / "in.jsonl"
    write_input(input_path, 12)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    command = [sys.executable, "-m", "memento.cli"]

    def cached(out: Path) -> int:
        return sum(1 for _ in (out / "llm-cache").rglob("*.json")) if (out / "llm-cache").exists() else 0

    with ScriptedLLM(responder=responder, latency=0.05) as server:
        reference = tmp_path / "reference"
        subprocess.run([*command, *build_args(input_path, reference, server.base_url)], check=True, env=env)
        reference_calls = server.call_count
        server.reset()

        out = tmp_path / "killed"
        kills = 0
        for more in (15, 25, 10, 30, 20):  # kill once this many more answers have reached the cache
            before = cached(out)
            process = subprocess.Popen([*command, *build_args(input_path, out, server.base_url)], env=env)
            while process.poll() is None and cached(out) < before + more:
                time.sleep(0.005)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
            process.wait()
        subprocess.run([*command, *build_args(input_path, out, server.base_url)], check=True, env=env)
        bodies = [json.dumps(c.body, sort_keys=True) for c in server.calls]

    assert kills >= 3
    for name in ("default.jsonl", "full.jsonl", "failed.jsonl"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    ids = [r["task_id"] for r in records(out / "default.jsonl")]
    assert ids == [f"t{i}" for i in range(12)]  # none lost, none twice
    repeated = sum(n - 1 for n in collections.Counter(bodies).values())
    # Only calls in flight at a kill can be made again (their answers never reached the cache).
    assert repeated <= kills * 4
    assert len(set(bodies)) == reference_calls
    # The accounting adds up every run into the directory, not only the last one.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"] >= 2
    assert summary["llm"]["requests"] > summary["llm_this_run"]["requests"]
    assert summary["llm"]["successes"] >= reference_calls


def test_the_output_trains_with_memento_train_unchanged(tmp_path) -> None:
    input_path = tmp_path / "in.jsonl"
    write_input(input_path, 3)
    with ScriptedLLM(responder=responder) as server:
        built = CliRunner().invoke(app, build_args(input_path, tmp_path / "out", server.base_url))
    assert built.exit_code == 0, built.output
    data = tmp_path / "out/default.jsonl"
    args = ["train", "--train", str(data), "--eval", str(data), "-o", str(tmp_path / "run"), "--tiny", "qwen3"]
    args += ["--tiny-hidden", "32", "--tiny-layers", "1", "--max-steps", "2", "--batch-size", "2", "--eval-steps", "2"]
    trained = CliRunner().invoke(app, args)
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "run/stage2/best/model.safetensors").exists()


def test_faults_on_the_wire_do_not_change_the_output(tmp_path) -> None:
    """429s, 500s, truncated and garbage bodies and timeouts are retried: the same data as a clean run."""
    input_path = tmp_path / "in.jsonl"
    write_input(input_path, 4)
    pattern = ["ok", "500", "ok", "truncated", "429", "ok", "garbage", "ok", "503", "ok"]

    def fault(i: int, body: dict) -> str:
        return "timeout" if i in (5, 17) else pattern[i % len(pattern)]

    with ScriptedLLM(responder=responder) as server:
        clean = CliRunner().invoke(app, build_args(input_path, tmp_path / "clean", server.base_url))
    with ScriptedLLM(responder=responder, faults=fault, hang_s=3) as server:
        faulty = CliRunner().invoke(app, build_args(input_path, tmp_path / "faulty", server.base_url, timeout=1))
        served = collections.Counter(server.faults_served)
    assert clean.exit_code == 0 and faulty.exit_code == 0, faulty.output
    assert served["truncated"] and served["timeout"] and served["429"]
    for name in ("default.jsonl", "full.jsonl"):
        assert (tmp_path / "faulty" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    summary = json.loads((tmp_path / "faulty/summary.json").read_text())
    # Every fault served was answered by a retry, or ended a call that had used up its retries (a
    # call that drew 6 faults in a row gives up; the record is redone, so the output is the same).
    llm = summary["llm"]
    assert llm["retries"] + llm["failures"] >= sum(v for k, v in served.items() if k != "ok")
