"""Every shell command in the README runs as written (issue 16).

The README's ```bash blocks are parsed into commands (continuation lines joined, comments cut), and
every command must be listed in :data:`PLAN`: run here (fast), run here but slow (``-m slow``),
covered by another named test, or not run, with the reason (a GPU-only command; the README says
so). A command added to the README without a plan fails :func:`test_every_readme_command_has_a_plan`,
so the list cannot go stale.

Commands run in a scratch directory that holds what their placeholders name (``traces.jsonl``,
``hf_dataset_dir/``, ``path/to/hf-tokenizer``, ``runs/m/stage2/best``, ...): synthetic traces and a
tiny random model with the memento tokens, made here. The only edits to a command are the ones in
:data:`BOUNDS` (step and problem counts, so a slow test ends in minutes) and a free port for 8000.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from helpers import tiny_model
from memento.records_io import write_records
from memento.synth import generate, write_split
from memento.tiny_tokenizer import build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def readme_commands() -> list[str]:
    """The shell commands of the README's bash blocks, one string each (a quoted argument may span lines)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        pending = ""
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if not pending:
                line = re.sub(r"(^|\s+)#.*$", "", line).strip()  # a comment, outside any quotes
                if not line:
                    continue
            pending = f"{pending}\n{line}" if pending else line
            try:
                shlex.split(pending)
            except ValueError:  # a quote still open: the command goes on on the next line
                continue
            commands.append(re.sub(r"[ \t]+", " ", pending))
            pending = ""
    return commands


FAST, SLOW = "fast", "slow"
PLAN: list[tuple[str, str]] = [
    (r"^make demo$", "covered: the demo from a fresh clone is run by hand at each stop (BENCHMARKS.md)"),
    (r"^make test$", "covered: .ci/run runs it"),
    (r"^memento validate ", FAST),
    (r"^memento inspect ", FAST),
    (r"^memento synth ", FAST),
    (r"^memento train --model path/to/base ", "covered: tests/test_family_cli.py, on a tiny checkpoint per family"),
    (r"^memento serve runs/mine/", "covered: tests/test_family_cli.py and tests/vllm_backend/test_vllm_families.py"),
    (r"^memento train ", SLOW),
    (r"^memento rl ", SLOW),
    (r"^memento generate ", SLOW),
    (r"^memento eval ", SLOW),
    (r"^memento probe ", SLOW),
    (r"^memento demo \[", "covered: a synopsis; tests/test_demo.py runs memento demo --quick"),
    (r"^memento serve runs/demo/memento-model --port 8000", "covered: test_readme_serve_and_curl (slow)"),
    (r"^curl ", "covered: test_readme_serve_and_curl (slow) runs it against the served model"),
    (r"^memento data build ", "covered: test_readme_data_build_and_stats (slow), against a scripted LLM"),
    (r"^memento data stats ", FAST),
    (r"^\.venv-vllm/bin/memento serve .* --backend vllm", "covered: tests/vllm_backend/test_vllm_serve.py"),
    (
        r"^CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 .* -m memento train ",
        "covered: tests/test_train_distributed.py (slow) runs it on 2 CPU processes against 1 process",
    ),
    (r"^accelerate launch --config_file fsdp\.yaml ", "not run: FSDP needs GPUs, there are none here (README)"),
    (
        r"^python examples/lm_eval/make_data\.py ",
        "covered: tests/test_serve_lm_eval.py (slow) builds its data with make_data's lm_eval_record",
    ),
    (
        r"^lm_eval --model local-completions ",
        "covered: tests/test_serve_lm_eval.py (slow) runs it with the shipped task files on a tiny model",
    ),
]
BOUNDS: dict[str, str] = {
    "memento train": "--max-steps 4 --eval-steps 2 --batch-size 4",
    "memento eval": "--problems 3 --max-tokens 48 --no-progress",
    "memento generate": "--max-tokens 24",
    "memento rl": "--steps 1 -G 2 --prompts-per-step 2 --batch-size 4 --max-tokens 24 -n 4 --no-progress",
    "memento probe restart": "--quick --max-tokens 24 --no-progress",
    "memento probe kv": "--quick",
    "memento probe toy": "--quick",
}
"""Appended to commands that would otherwise train for an hour or decode thousands of tokens."""


def plan_of(command: str) -> str | None:
    return next((plan for pattern, plan in PLAN if re.search(pattern, command)), None)


def test_every_readme_command_has_a_plan() -> None:
    commands = readme_commands()
    assert len(commands) >= 20, commands  # the parser found the blocks
    missing = [c for c in commands if plan_of(c) is None]
    assert not missing, f"README commands with no plan in tests/test_readme.py: {missing}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A directory holding everything the README's placeholders name."""
    root = tmp_path_factory.mktemp("readme")
    problems = generate("stream_sum", "test", 12, seed=5)
    for name in ("traces.jsonl", "data.jsonl", "test.jsonl", "data.parquet"):
        write_split(root / name, problems[:3] if name == "test.jsonl" else problems)
    write_split(root / "train.jsonl", generate("stream_sum", "train", 24, seed=5))
    write_split(root / "val.jsonl", generate("stream_sum", "validation", 8, seed=5))
    from datasets import Dataset

    Dataset.from_list([p.record("default") for p in problems]).save_to_disk(str(root / "hf_dataset_dir"))
    write_records(root / "math500.jsonl", [{"problem": "What is 1 + 2?", "answer": "3"}] * 3)
    tok = build_tiny_tokenizer()
    tok.save_pretrained(root / "path/to/hf-tokenizer")
    model = tiny_model(tok)
    for place in ("runs/m/stage2/best", "runs/demo/memento-model", "path/to/model", "path/to/Qwen3-checkpoint"):
        model.save_pretrained(root / place)
        tok.save_pretrained(root / place)
    (root / "runs/data").mkdir(parents=True)
    shutil.copy(root / "traces.jsonl", root / "runs/data/default.jsonl")  # what `data build` writes
    return root


def run(command: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    for prefix, bounds in BOUNDS.items():
        if command.startswith(prefix):
            command = f"{command} {bounds}"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        shlex.split(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def commands_planned(plan: str) -> list[str]:
    return [
        c for c in readme_commands() if plan_of(c) == plan and not c.startswith(("memento serve", "memento data build"))
    ]


@pytest.mark.parametrize("command", commands_planned(FAST))
def test_readme_command_runs(command: str, workspace: Path) -> None:
    result = run(command, workspace, timeout=180)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("command", commands_planned(SLOW))
def test_readme_slow_command_runs(command: str, workspace: Path) -> None:
    result = run(command, workspace)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_readme_serve_and_curl(workspace: Path) -> None:
    """`memento serve runs/demo/memento-model ...` then the README's curl (on a free port)."""
    commands = readme_commands()
    serve = next(c for c in commands if c.startswith("memento serve runs/demo/memento-model --port 8000 --kv-budget"))
    curl = next(c for c in commands if c.startswith("curl "))
    port = str(free_port())
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(shlex.split(serve.replace("8000", port)), cwd=workspace, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        result = run(curl.replace("8000", port), workspace, timeout=300)
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert answer["choices"][0]["finish_reason"] in ("stop", "length"), answer
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.slow
def test_readme_data_build_and_stats(workspace: Path) -> None:
    """`memento data build` against a scripted OpenAI-compatible LLM (on a free port), then `data stats`."""
    from scripted_llm import ScriptedLLM
    from test_data_pipeline import responder

    build = next(c for c in readme_commands() if c.startswith("memento data build "))
    plain = workspace / "plain"
    plain.mkdir(exist_ok=True)
    records = [
        {"problem": p.prompt, "response": p.trace.units[0].block * 40} for p in generate("stream_sum", "test", 3)
    ]
    write_records(plain / "traces.jsonl", records)
    with ScriptedLLM(responder=responder) as llm:
        result = run(build.replace("http://127.0.0.1:8000/v1", llm.base_url) + " --no-progress", plain)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    stats = next(c for c in readme_commands() if c.startswith("memento data stats "))
    result = run(stats, plain)
    assert result.returncode == 0, result.stderr
