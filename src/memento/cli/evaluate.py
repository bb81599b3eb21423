"""``memento eval`` and ``memento demo``: a model evaluated under several KV modes (memento.eval), and
the end-to-end demo (memento.demo) that trains a control and a memento model and evaluates both.
Each writes OUT/report.md and OUT/results.json and prints the table of runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from memento.cli.common import (
    MaxTokensOpt,
    ModelArg,
    ProgressOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    fail,
    parse_knobs,
    require_exists,
    settings_from,
)
from memento.demo import run_demo, run_seeds, seeds_table
from memento.engine import SamplingParams
from memento.eval.kvsim import PRESETS
from memento.eval.report import runs_table, write_report
from memento.eval.run import EvalSettings, Mode, evaluate_model, load_model
from memento.eval.tasks import load_task_set
from memento.families import default_mask

app = typer.Typer()


@app.command("eval")
def eval_command(
    model: ModelArg,
    task: Annotated[
        str, typer.Option("--task", help="synth:TASK, or a JSONL / Parquet file or HF dataset directory.")
    ] = "synth:stream_sum",
    out: Annotated[Path, typer.Option("--out", "-o", help="Where report.md, results.json and plots go.")] = Path(
        "runs/eval"
    ),
    modes: Annotated[
        str, typer.Option("--modes", help="Comma-separated: memento, vanilla, restart, keep-N.")
    ] = "memento,vanilla,restart",
    problems: Annotated[
        int | None, typer.Option("--problems", "-n", min=1, help="Problems (default: synth 200, files all).")
    ] = None,
    samples: Annotated[int, typer.Option("--samples", "-k", min=1, help="Samples per problem.")] = 1,
    ks: Annotated[str, typer.Option("--ks", help="Comma-separated k for pass@k / maj@k (default: samples).")] = "",
    grader: Annotated[str | None, typer.Option("--grader", help="exact, choice or math (default: by task).")] = None,
    grader_timeout: Annotated[float, typer.Option("--grader-timeout", min=0.1, help="Seconds per answer.")] = 5.0,
    problem_field: Annotated[str | None, typer.Option("--problem-field")] = None,
    answer_field: Annotated[str | None, typer.Option("--answer-field")] = None,
    knob: Annotated[list[str] | None, typer.Option("--knob", help="A synthetic task knob NAME=VALUE.")] = None,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = -1,
    max_tokens: MaxTokensOpt = 1024,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    kv_budget_tokens: Annotated[
        int | None, typer.Option("--kv-budget-tokens", min=1, help="KV pool in tokens, the same for every mode.")
    ] = None,
    max_num_seqs: Annotated[int, typer.Option("--max-num-seqs", min=1)] = 64,
    max_block_tokens: Annotated[int | None, typer.Option("--max-block-tokens", min=1)] = None,
    kv_model: Annotated[
        list[str] | None, typer.Option("--kv-model", help="Real sizes to report KV for: qwen3-8b, qwen3-32b, ...")
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or bfloat16.")] = "float32",
    progress: ProgressOpt = True,
) -> None:
    """Evaluate a model under several KV modes: accuracy (pass@k, maj@k), peak/AUC KV, throughput.

    Every mode runs the same problems with the same sampling settings and seeds. Writes
    OUT/results.json (every sample), OUT/report.md and PNG plots (the KV sawtooth, accuracy vs peak
    KV, block and memento lengths).
    """
    require_exists(model)
    try:
        family_mask = default_mask(model)  # Phi-4: "memento" is memento+delimiters, as it was trained
        mode_list = [Mode.parse(m, family_mask) for m in modes.split(",") if m.strip()]
        if not mode_list:
            fail("give at least one mode")
        kv_models = [m.lower() for m in (kv_model or ["qwen3-8b"])]
        unknown = [m for m in kv_models if m not in PRESETS]
        if unknown:
            fail(f"unknown --kv-model {', '.join(unknown)}: one of {', '.join(PRESETS)}")
        settings = settings_from(
            EvalSettings,
            locals(),
            sampling=settings_from(SamplingParams, locals(), n=samples),
            ks=tuple(int(k) for k in ks.split(",") if k.strip()),
        )
        task_set = load_task_set(
            task,
            problems,
            grader=grader,
            knobs=parse_knobs(knob or []),
            problem_field=problem_field,
            answer_field=answer_field,
        )
        loaded, tokenizer = load_model(str(model), dtype)
        runs = evaluate_model(
            loaded, tokenizer, task_set, mode_list, settings, label=model.name, show_progress=progress
        )
    except ValueError as exc:
        fail(str(exc), code=1)
    results = {
        "title": f"Evaluation of {model}",
        "task": {"task set": task_set.name, "problems": len(task_set.problems), "grader": task_set.grader},
        "settings": settings.results_settings(),
        "runs": runs,
    }
    report = write_report(results, out, kv_models)
    Console().print(runs_table(runs))
    Console().print(f"report: {report}")


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where everything goes.")] = Path("runs/demo"),
    quick: Annotated[
        bool, typer.Option("--quick", help="A smoke run of every step (under a minute on 2 cores).")
    ] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete OUT first instead of resuming.")] = False,
    seeds: Annotated[
        int,
        typer.Option(
            "--seeds",
            min=1,
            help="Run everything on this many seeds (0, 1, ...), each in OUT/seed-S, and tabulate them in "
            "OUT/seeds.md.",
        ),
    ] = 1,
    progress: ProgressOpt = True,
) -> None:
    """The end-to-end demo: synthetic data, control and memento models, evaluation, report.

    Trains a tiny Qwen3 on memento traces (stage 1 with full attention, then the same number of
    steps under the memento mask for the memento model and with full attention for the control),
    evaluates control, memento and restart at one KV budget, and writes
    OUT/report.md, OUT/results.json, plots and both checkpoints (OUT/control-model, OUT/memento-model).
    """
    console = Console(highlight=False)
    log = lambda m: console.print(escape(m))  # noqa: E731
    if seeds > 1:
        every = run_seeds(out, seeds, quick=quick, fresh=fresh, show_progress=progress, log=log)
        for line in seeds_table(every):
            console.print(escape(line))
        console.print(f"seeds: {out / 'seeds.md'}")
        return
    results = run_demo(out, quick=quick, fresh=fresh, show_progress=progress, log=log)
    console.print(runs_table(results["runs"], results.get("title")))
    for target in results["targets"]:
        mark = "[green]met[/green]" if target["met"] else "[red]NOT met[/red]"
        console.print(f"{mark}  {escape(target['target'])}: {target['measured']}")
    console.print(f"report: {out / 'report.md'}   models: {out / 'control-model'}, {out / 'memento-model'}")
