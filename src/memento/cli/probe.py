"""``memento probe``: the dual information stream (paper section 7), in three studies.

- ``probe restart MODEL``: in-place eviction vs restart (mementos recomputed without their blocks),
  free-running over several seeds (overall and among well-formed completions) and teacher-forced;
- ``probe kv MODEL``: the passcode probe: a code in block 2, read back from later mementos' KV;
- ``probe toy``: a 4-layer transformer trained from scratch under the memento mask, probed per
  layer, per distance and across checkpoints.

Each writes OUT/<study>.json, PNG plots and its own section of OUT/report.md (the others are kept).
The task and its knobs default to those of the demo run the model came from (``demo-config.json``
beside the model directory), so ``memento probe kv runs/demo/memento-model`` needs nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from memento.cli.common import KvBudgetOpt, ModelArg, ProgressOpt, fail, parse_knobs, require_exists

app = typer.Typer()
probe_app = typer.Typer(
    help="The dual information stream: restart ablation, KV passcode probe, toy transformer.", no_args_is_help=True
)
app.add_typer(probe_app, name="probe")

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory (JSON, PNGs, report.md).")]
QuickOpt = Annotated[bool, typer.Option("--quick", help="A small smoke run (what the tests run).")]
TaskOpt = Annotated[
    str | None, typer.Option("--task", help="Synthetic task (default: the model's demo-config.json, else stream_sum).")
]
KnobOpt = Annotated[list[str] | None, typer.Option("--knob", help="A synthetic task knob NAME=VALUE.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the samples and the probes.")]


def task_and_knobs(model: Path, task: str | None, knobs: list[str] | None) -> tuple[str, dict[str, Any]]:
    """The task to probe on: given, or the demo run's (``demo-config.json`` beside the model directory)."""
    from memento.synth.tasks import TASKS

    config = model.resolve().parent / "demo-config.json"
    if task is None and config.exists():
        demo = json.loads(config.read_text())
        chosen, chosen_knobs = demo["task"], dict(demo.get("knobs", {}))
    else:
        chosen, chosen_knobs = (task or "stream_sum").removeprefix("synth:"), {}
    if chosen not in TASKS:
        fail(f"unknown synthetic task {chosen!r}; known: {', '.join(TASKS)}")
    chosen_knobs.update(parse_knobs(knobs or []))
    return chosen, chosen_knobs


def _load(model: Path) -> tuple[Any, Any]:
    require_exists(model)
    from memento.eval.run import load_model

    return load_model(str(model))


def _finish(console: Console, out: Path, key: str, written: str, lines: list[str], seconds: float) -> None:
    from memento.analysis.report import update_report

    report = update_report(out / "report.md", key, lines)
    console.print(f"wrote {out / written}, its plots and {report} ({seconds:.0f} s)")


@probe_app.command("restart")
def restart_command(
    model: ModelArg,
    out: OutOpt = Path("runs/probe"),
    task: TaskOpt = None,
    knob: KnobOpt = None,
    problems: Annotated[int, typer.Option("--problems", "-n", min=1, help="Test problems.")] = 100,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Sampling seeds (one sample per problem each).")] = 3,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0)] = 0.6,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1)] = 1200,
    teacher_forced: Annotated[int, typer.Option("--teacher-forced", min=1, help="Gold traces for the loss.")] = 40,
    kv_budget_tokens: KvBudgetOpt = 16384,
    quick: QuickOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """In-place eviction vs restart: accuracy over seeds (all and well-formed) and teacher-forced loss per block."""
    from memento.analysis.restart import RestartSettings, restart_report_lines, run_restart_study

    if temperature == 0.0 and seeds > 1:
        fail("greedy decoding gives the same completions for every seed: use --temperature > 0 or --seeds 1")
    chosen, knobs = task_and_knobs(model, task, knob)
    values = {
        "task": chosen,
        "knobs": knobs,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "kv_budget_tokens": kv_budget_tokens,
    }
    if not quick:
        values |= {"problems": problems, "seeds": seeds, "teacher_forced": teacher_forced}
    settings = RestartSettings.quick(**values) if quick else RestartSettings(**values)
    loaded, tokenizer = _load(model)
    console = Console(stderr=True)
    console.print(f"restart ablation on {chosen} {knobs}: {settings.problems} problems x {settings.seeds} seeds")
    results = run_restart_study(loaded, tokenizer, settings, out, log=console.print, show_progress=progress)
    _finish(console, out, "restart", "restart.json", restart_report_lines(results), results["seconds"])


@probe_app.command("kv")
def kv_command(
    model: ModelArg,
    out: OutOpt = Path("runs/probe"),
    task: TaskOpt = None,
    knob: KnobOpt = None,
    samples: Annotated[int, typer.Option("--samples", "-n", min=20, help="(problem, code) samples.")] = 6000,
    max_distance: Annotated[int, typer.Option("--max-distance", min=1, help="Farthest masked memento.")] = 3,
    at: Annotated[str, typer.Option("--at", help="Where in block 2 the code goes: end or start.")] = "end",
    seed: SeedOpt = 0,
    quick: QuickOpt = False,
) -> None:
    """The passcode probe: a code in block 2, recovered from later mementos' keys and values, per layer and distance."""
    from memento.analysis.passcode import PasscodeSettings, passcode_report_lines, run_passcode_study

    if at not in ("end", "start"):
        fail(f"--at must be end or start, not {at!r}")
    chosen, knobs = task_and_knobs(model, task, knob)
    values: dict[str, Any] = {"task": chosen, "knobs": knobs, "at": at, "seed": seed, "max_distance": max_distance}
    if not quick:
        values["samples"] = samples
    settings = PasscodeSettings.quick(**values) if quick else PasscodeSettings(**values)
    loaded, tokenizer = _load(model)
    console = Console(stderr=True)
    try:
        results = run_passcode_study(loaded, tokenizer, settings, out, log=console.print)
    except ValueError as error:
        fail(str(error), code=1)
    _finish(console, out, "kv", "passcode.json", passcode_report_lines(results), results["seconds"])


@probe_app.command("toy")
def toy_command(
    out: OutOpt = Path("runs/probe"),
    seed: SeedOpt = 0,
    quick: QuickOpt = False,
) -> None:
    """Train the paper's toy transformer under the memento mask and probe its KV (layers, distance, checkpoints)."""
    from dataclasses import replace

    from memento.analysis.toy import ToySettings, run_toy_study, toy_report_lines

    settings = replace(ToySettings.quick() if quick else ToySettings(), seed=seed)
    console = Console(stderr=True)
    results = run_toy_study(settings, out, log=console.print)
    _finish(console, out, "toy", "toy.json", toy_report_lines(results), results["timings"]["total_s"])
