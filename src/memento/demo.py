"""``memento demo``: the paper's headline effect, end to end, on a laptop CPU with no network.

1. Synthetic data: problems of a task whose reasoning must carry state across blocks (stream_sum),
   each with its memento trace (blocks and the mementos that summarise them): short ones for stage
   1, long ones (~6 blocks) for the branches and the evaluation.
2. Training, tiny Qwen3 from scratch: stage 1 with full causal attention on the short problems (the
   format and the arithmetic), then two branches from its best model, the same number of steps on
   the long traces: under the memento mask (stage 2: the **memento** model) and with full attention
   (the **control**: it writes the same format but was never taught to work without its blocks).
   Each branch at the learning rate its validation loss chose (:func:`training_story`).
3. Evaluation through the engine, all runs at the same fixed KV budget: greedy on every test
   problem, control with nothing evicted (vanilla), memento with each block evicted once its memento
   ends, and memento in restart mode (the dual-information-stream ablation: mementos recomputed
   without their blocks); then control and memento sampled at the paper's settings (temperature
   0.6, top-p 0.95, top-k 20), several samples per problem: pass@1 with 95% intervals, maj@k.
4. ``OUT/report.md`` (tables, targets, the paper's Table 1 beside ours, plots), ``OUT/results.json``,
   and the two checkpoints in HF format (``OUT/control-model``, ``OUT/memento-model``) that
   transformers and ``memento serve`` load.

Re-running with the same settings reuses the trained models (an interrupted training resumes from
its last Trainer checkpoint), so only the evaluation runs again. ``--quick`` is a smoke run of every
step (about a minute; its models are barely trained, so its accuracy means nothing). :func:`run_seeds`
(``memento demo --seeds N``) runs the whole demo on several seeds and tabulates them.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memento.records_io import pin_settings
from memento.synth import DEFAULT_TASK

if TYPE_CHECKING:
    from memento.train.sft import SFTSettings

DEMO_KNOBS: dict[str, int] = {"min_steps": 36, "max_steps": 44, "steps_per_block": 7}
"""Longer stream_sum traces than the task's defaults (~940 chat tokens): ~6 blocks of 7 steps, each
block ~9x its memento, so the KV saving is the size the paper reports (replayed on the reference
traces: peak 0.33x, AUC 0.33x of the same traces without eviction)."""

STAGE1_KNOBS: dict[str, int] = {"min_steps": 4, "max_steps": 8, "steps_per_block": 4}
"""Short problems of the same task for stage 1 (one or two blocks, ~150 chat tokens).

Why: on the long traces a model with full attention does not learn the task's arithmetic (the two
mod-10 tables): the digit stream repeats within a trace, so after its first steps every product and
sum can be copied from an earlier step, and the few steps that must be computed carry too little
of the loss. 1,000 full-attention steps on the long traces reach validation loss 0.049 and 33%
greedy accuracy, with the errors in the first tenth of the trace (7.6% of tokens wrong there, 0.3%
in the last half). On short problems nearly every step is computed: the tables are learned in a few
hundred steps (validation loss 0.0003), at a sixth of the cost per example."""


@dataclass
class DemoConfig:
    """Everything that decides the demo's result (saved beside it; a re-run must match)."""

    task: str = DEFAULT_TASK
    knobs: dict[str, int] = field(default_factory=lambda: dict(DEMO_KNOBS))
    """The long traces: the branches train on them and the evaluation asks them."""
    stage1_knobs: dict[str, int] = field(default_factory=lambda: dict(STAGE1_KNOBS))
    stage1_problems: int = 3000
    train_problems: int = 4000
    validation_problems: int = 100
    test_problems: int = 100
    stage1_steps: int = 600
    """Stage 1, shared by both models: full attention on the short problems."""
    stage1_batch_size: int = 16
    learning_rate: float = 3e-3
    """Stage 1's peak learning rate (cosine, 5% warm-up)."""
    stage1_final_lr_fraction: float = 0.35
    """Where stage 1's cosine ends, as a fraction of its peak. Annealed to zero, stage 1 settles so
    well on the short problems that the branches adapt to the long traces slowly (seed 0, 300 steps:
    validation loss control 0.0032, memento 0.0013; greedy 70.5% / 89%); ending at 0.35 of the peak,
    0.00069 / 0.00048 and 99.5% / 99.5% (BENCHMARKS.md)."""
    branch_steps: int = 300
    """Steps of each branch on the long traces: the memento model under the mask (stage 2), the
    control with full attention. Each branch keeps its best checkpoint by its validation loss."""
    batch_size: int = 4
    """The branches' batch size."""
    control_learning_rate: float = 3e-3
    """The control branch's peak learning rate, chosen by its validation loss: 0.00043 at 3e-3 against
    0.00093 at 1e-3 after 300 steps (greedy 100% / 97.5%; BENCHMARKS.md)."""
    memento_learning_rate: float = 3e-3
    """The memento branch's peak learning rate, chosen by its validation loss: 0.00035 at 3e-3 against
    0.0021 at 1e-3 after 300 steps (greedy 100% / 76.5%; BENCHMARKS.md)."""
    eval_every: int = 100
    hidden_size: int = 128
    num_layers: int = 4
    intermediate_size: int = 256
    max_tokens: int = 1200
    kv_budget_tokens: int = 12288
    max_num_seqs: int = 64
    sampled_problems: int = 32
    """Problems (the first of the test set) sampled at the paper's settings, ``samples_per_problem`` each."""
    samples_per_problem: int = 4
    seed: int = 0


QUICK = DemoConfig(
    knobs={},
    stage1_problems=300,
    train_problems=600,
    validation_problems=16,
    test_problems=16,
    stage1_steps=150,
    branch_steps=60,
    eval_every=30,
    max_tokens=400,
    kv_budget_tokens=4096,
    max_num_seqs=16,
    sampled_problems=4,
    samples_per_problem=2,
)
"""A smoke run of every step (under two minutes on 2 cores): the models are barely trained."""

PAPER_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
"""The paper's evaluation sampling (its section 6)."""

PAPER_TABLE1: tuple[tuple[str, str, tuple[float, float, float], tuple[float, float, float]], ...] = (
    ("Qwen3-8B", "AIME'26", (64.7, 2.59, 28.3), (57.3, 1.02, 9.7)),
    ("Qwen3-8B", "Comp. Math", (49.2, 2.82, 33.1), (45.1, 1.08, 10.7)),
    ("Phi-4-reasoning", "AIME'26", (69.8, 3.04, 28.6), (67.6, 1.17, 11.3)),
    ("Phi-4-reasoning", "Comp. Math", (51.4, 3.48, 36.7), (48.7, 1.25, 13.1)),
    ("Qwen3-32B", "AIME'26", (74.1, 3.83, 35.2), (72.6, 1.67, 14.0)),
    ("Qwen3-32B", "Comp. Math", (58.5, 4.51, 48.5), (56.2, 1.74, 15.7)),
)
"""The paper's Table 1, control and memento rows: (accuracy %, peak KV GB, AUC GB x ktok) each.
Olmo-3-7B-Think is left out: its sliding-window layers keep most of the KV (0.91x peak)."""

PAPER_THROUGHPUT = 1.75
"""Memento / vanilla tokens per second, Qwen3-8B on one B200 (the paper's throughput run, section 4)."""

TARGETS = (
    ("control greedy pass@1 >= 95% (a competent baseline)", lambda c: c["control_pass@1"] >= 0.95),
    # rounded: 98% against 100% is -2.0000000000000018 pp in floating point, and meets the target
    ("memento pass@1 >= control - 2 pp", lambda c: round(c["pass@1_diff_pp"], 9) >= -2.0),
    ("peak KV (memento / control) <= 0.35", lambda c: c["peak_kv_ratio"] <= 0.35),
    ("AUC KV (memento / control) <= 0.35", lambda c: c["auc_kv_ratio"] <= 0.35),
    ("throughput at the same KV budget (memento / control) >= 1.5", lambda c: c["throughput_ratio"] >= 1.5),
)
"""The demo's targets (issue 17), each a check of the greedy memento run's comparison with the control."""


def _prepare_data(config: DemoConfig, data_dir: Path, log: Callable[[str], None]) -> dict[str, Path]:
    """The short problems of stage 1 and the long ones of the branches, each with a validation split."""
    from memento.synth import generate, write_split

    data_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    plan = (
        ("stage1-train", "train", config.stage1_problems, config.stage1_knobs),
        ("stage1-validation", "validation", config.validation_problems, config.stage1_knobs),
        ("train", "train", config.train_problems, config.knobs),
        ("validation", "validation", config.validation_problems, config.knobs),
    )
    for name, split, n, knobs in plan:
        path = files[name] = data_dir / f"{name}.jsonl"
        if not path.exists():
            write_split(path, generate(config.task, split, n, seed=config.seed, **knobs))
    log(
        f"data: {config.stage1_problems} short problems for stage 1, {config.train_problems} long ones for the "
        f"branches, {config.validation_problems} validation problems of each, in {data_dir}"
    )
    return files


def _check_config(config: DemoConfig, out: Path) -> None:
    """Refuse to resume a run made with other settings (its checkpoints would be mixed in)."""
    changed = pin_settings(out / "demo-config.json", asdict(config))
    if changed:
        raise SystemExit(
            f"{out} holds a demo run made with other settings ({', '.join(changed)} differ): "
            f"use another --out, or --fresh to start over there"
        )


def _sft_settings(
    config: DemoConfig, steps: int, learning_rate: float, batch_size: int, final_lr_fraction: float = 0.0
) -> SFTSettings:
    """One SFT stage of the demo: cosine (to ``final_lr_fraction`` of the peak if given)."""
    from memento.train.sft import SFTSettings  # lazily: training imports torch

    schedule: dict[str, Any] = {"lr_scheduler": "cosine"}
    if final_lr_fraction > 0:
        schedule = {
            "lr_scheduler": "cosine_with_min_lr",
            "extra": {"lr_scheduler_kwargs": {"min_lr_rate": final_lr_fraction}},
        }
    return SFTSettings(
        learning_rate=learning_rate,
        max_steps=steps,
        batch_size=batch_size,
        eval_steps=config.eval_every,
        logging_steps=10,
        eval_batch_size=32,
        seed=config.seed,
        **schedule,
    )


def train_stage1(config: DemoConfig, files: dict[str, Path], output_dir: Path, log: Callable[[str], None]) -> Path:
    """Stage 1, shared by both models: a tiny model from scratch, full attention on the short
    problems; returns its best checkpoint (``output_dir/stage1/best``)."""
    from memento.train.pipeline import TrainPlan, run_training

    log(f"stage 1: {config.stage1_steps} steps with full attention on the short problems")
    return run_training(
        TrainPlan(
            train_file=files["stage1-train"],
            eval_file=files["stage1-validation"],
            output_dir=output_dir,
            stage="1",
            tiny_arch="qwen3",
            tiny_options={
                "hidden_size": config.hidden_size,
                "num_hidden_layers": config.num_layers,
                "intermediate_size": config.intermediate_size,
                "seed": config.seed,
            },
            stage1=_sft_settings(
                config,
                config.stage1_steps,
                config.learning_rate,
                config.stage1_batch_size,
                config.stage1_final_lr_fraction,
            ),
        ),
        log=log,
    )["stage1"]


def train_models(config: DemoConfig, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Stage 1 on the short problems, then the memento and control branches on the long traces;
    copies both models into ``out``."""
    from memento.train.pipeline import TrainPlan, run_training

    models = {"control": out / "control-model", "memento": out / "memento-model"}
    done_marker = out / "training" / "done.json"
    if done_marker.exists() and all((m / "config.json").exists() for m in models.values()):
        seconds = json.loads(done_marker.read_text())["training_seconds"]
        log(f"models: reusing {models['control']} and {models['memento']} (trained in {seconds:.0f} s)")
        return {"models": models, "training_seconds": seconds, "reused": True}
    files = _prepare_data(config, out / "data", log)

    long_traces = {"train_file": files["train"], "eval_file": files["validation"], "response_field": "response"}
    start = time.perf_counter()
    stage1 = train_stage1(config, files, out / "training", log)
    # Both branches start from stage 1's best model and train as many steps on the same long traces,
    # each at the learning rate its own validation loss chose: they differ only in the mask.
    log(f"memento: {config.branch_steps} steps under the memento mask on the long traces (stage 2)")
    memento = run_training(
        TrainPlan(
            **long_traces,
            output_dir=out / "training",
            stage="2",
            model_path=stage1,
            stage2=_sft_settings(config, config.branch_steps, config.memento_learning_rate, config.batch_size),
        ),
        log=log,
    )["stage2"]
    log(f"control: {config.branch_steps} steps with full attention on the long traces")
    control = run_training(
        TrainPlan(
            **long_traces,
            output_dir=out / "training" / "control",
            stage="1",
            model_path=stage1,
            stage1=_sft_settings(config, config.branch_steps, config.control_learning_rate, config.batch_size),
        ),
        log=log,
    )["stage1"]
    seconds = time.perf_counter() - start
    for name, best in (("control", control), ("memento", memento)):
        shutil.copytree(best, models[name], dirs_exist_ok=True)
        (models[name] / "training_args.bin").unlink(missing_ok=True)  # a pickle: not needed to load
    done_marker.write_text(json.dumps({"training_seconds": seconds}) + "\n")
    log(f"models: {models['control']} (full attention throughout) and {models['memento']} (stage 2: memento mask)")
    return {"models": models, "training_seconds": seconds, "reused": False}


def evaluate_models(config: DemoConfig, models: dict[str, Path], show_progress: bool = True) -> dict[str, Any]:
    """Greedy: control [vanilla], memento [memento], memento [restart] on every test problem; sampled at
    the paper's settings (``samples_per_problem`` each): control [vanilla] and memento [memento] on the
    first ``sampled_problems``. One KV budget for every run."""
    from memento.engine import SamplingParams
    from memento.eval.run import GREEDY, EvalSettings, Mode, evaluate_model, load_model
    from memento.eval.tasks import TaskSet, synthetic_task_set

    task_set = synthetic_task_set(config.task, config.test_problems, split="test", seed=1, knobs=config.knobs)
    engine = {"kv_budget_tokens": config.kv_budget_tokens, "max_num_seqs": config.max_num_seqs}
    greedy = EvalSettings(sampling=replace(GREEDY, max_tokens=config.max_tokens, seed=config.seed), **engine)
    k = config.samples_per_problem
    sampled = EvalSettings(
        sampling=SamplingParams(**PAPER_SAMPLING, n=k, max_tokens=config.max_tokens, seed=config.seed),
        ks=tuple(sorted({2, k})) if k >= 2 else (),
        **engine,
    )
    sampled_set = TaskSet(task_set.name, task_set.problems[: config.sampled_problems], task_set.grader, task_set.meta)
    plan = (
        ("control", [("vanilla", greedy, task_set, "control"), ("vanilla", sampled, sampled_set, SAMPLED["control"])]),
        (
            "memento",
            [
                ("memento", greedy, task_set, "memento"),
                ("restart", greedy, task_set, "memento"),
                ("memento", sampled, sampled_set, SAMPLED["memento"]),
            ],
        ),
    )
    runs: list[dict[str, Any]] = []
    start = time.perf_counter()
    for model_name, wanted in plan:
        model, tokenizer = load_model(str(models[model_name]))
        for mode, settings, problems, label in wanted:
            if not problems.problems:
                continue
            runs += evaluate_model(
                model, tokenizer, problems, [Mode.parse(mode)], settings, label=label, show_progress=show_progress
            )
    sampled_labels = set(SAMPLED.values())
    return {
        "task": {"task set": task_set.name, "knobs": config.knobs, "test problems": len(task_set.problems)},
        "settings": {"greedy": True, "max_tokens": config.max_tokens, **engine},
        "runs": [r for r in runs if r["label"] not in sampled_labels],
        "baseline": "control [vanilla]",
        "sampled": {
            "settings": {**PAPER_SAMPLING, "samples per problem": k, "problems": len(sampled_set.problems)},
            "runs": [r for r in runs if r["label"] in sampled_labels],
            "baseline": f"{SAMPLED['control']} [vanilla]",
        },
        "evaluation_seconds": time.perf_counter() - start,
    }


SAMPLED = {"control": "control, sampled", "memento": "memento, sampled"}
"""The labels of the sampled runs (the greedy ones are plain ``control`` / ``memento``)."""


def target_lines(results: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """(target, met, measured) for the greedy memento run against the greedy control."""
    from memento.eval.report import baseline_run, comparisons

    by_run = {c["run"]: c for c in comparisons(results)}
    memento = by_run.get("memento [memento]")
    if memento is None:
        return []
    checked = {**memento, "control_pass@1": baseline_run(results)["accuracy"]["pass@1"]}
    measured = (
        f"{100 * checked['control_pass@1']:.1f}%",
        f"{memento['pass@1_diff_pp']:+.1f} pp",
        f"{memento['peak_kv_ratio']:.2f}x",
        f"{memento['auc_kv_ratio']:.2f}x",
        f"{memento['throughput_ratio']:.2f}x",
    )
    return [(name, bool(check(checked)), value) for (name, check), value in zip(TARGETS, measured, strict=True)]


def paper_lines(results: dict[str, Any]) -> list[str]:
    """The paper's Table 1 beside ours: accuracy gap, peak and AUC KV ratios, throughput ratio."""
    from memento.eval.report import comparisons

    ours = {c["run"]: c for c in comparisons(results)}.get("memento [memento]")
    sampled = results.get("sampled", {})
    ours_sampled = (
        {c["run"]: c for c in comparisons(sampled)}.get(f"{SAMPLED['memento']} [memento]")
        if sampled.get("runs")
        else None
    )
    lines = [
        "## Beside the paper (memento against its control)",
        "",
        "| source | accuracy gap | peak KV ratio | AUC KV ratio | throughput ratio |",
        "|---|---|---|---|---|",
    ]
    if ours:
        throughput = f"{ours['throughput_ratio']:.2f}x"
        lines.append(
            f"| this run, greedy ({results['task'].get('task set')}) | {ours['pass@1_diff_pp']:+.1f} pp "
            f"| {ours['peak_kv_ratio']:.2f}x | {ours['auc_kv_ratio']:.2f}x | {throughput} |"
        )
    if ours_sampled:
        lines.append(
            f"| this run, sampled (T {PAPER_SAMPLING['temperature']}, top-p {PAPER_SAMPLING['top_p']}, "
            f"top-k {PAPER_SAMPLING['top_k']}) | {ours_sampled['pass@1_diff_pp']:+.1f} pp "
            f"| {ours_sampled['peak_kv_ratio']:.2f}x | {ours_sampled['auc_kv_ratio']:.2f}x "
            f"| {ours_sampled['throughput_ratio']:.2f}x |"
        )
    for model, bench, control, memento in PAPER_TABLE1:
        lines.append(
            f"| paper, Table 1: {model}, {bench} | {memento[0] - control[0]:+.1f} pp | {memento[1] / control[1]:.2f}x "
            f"| {memento[2] / control[2]:.2f}x | |"
        )
    lines.append(f"| paper, section 4: Qwen3-8B, 1 x B200, AIME'24 x 8 | | | | {PAPER_THROUGHPUT:.2f}x |")
    lines += [
        "",
        "The paper's ratios are ours, from its Table 1's GB figures (accuracy %, peak KV GB, AUC GB x ktok of "
        "the control and memento rows; sampled, 64 samples per problem). Its controls are the base models "
        "trained on the same traces without mementos; here the control is trained on the memento traces "
        "themselves, so its KV counts the same tokens and the ratios measure eviction alone.",
    ]
    return lines


def sampled_lines(results: dict[str, Any]) -> list[str]:
    """The sampled runs' tables (their own baseline: the sampled control)."""
    from memento.eval.report import comparison_table, results_table

    sampled = results.get("sampled", {})
    if not sampled.get("runs"):
        return []
    settings = ", ".join(f"{k} {v}" for k, v in sampled["settings"].items())
    return [
        f"## Sampled at the paper's settings ({settings})",
        "",
        *results_table(sampled),
        "",
        *comparison_table(sampled),
    ]


def run_demo(
    out: Path,
    *,
    quick: bool = False,
    fresh: bool = False,
    config: DemoConfig | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The whole demo; returns the results (also in ``out/results.json`` and ``out/report.md``)."""
    from memento.eval.report import write_report

    config = config or (replace(QUICK) if quick else DemoConfig())
    if fresh and out.exists():
        shutil.rmtree(out)
    _check_config(config, out)
    start = time.perf_counter()
    trained = train_models(config, out, log)
    log("evaluating: greedy control (vanilla), memento (memento), memento (restart); then sampled control and memento")
    results = evaluate_models(config, trained["models"], show_progress)
    results["title"] = "memento demo" + (" (--quick: a smoke run, models barely trained)" if quick else "")
    results["training_seconds"] = trained["training_seconds"]
    results["training_reused"] = trained["reused"]
    results["validation_loss"] = {name: _best_loss(path) for name, path in trained["models"].items()}
    results["total_seconds"] = time.perf_counter() - start
    results["config"] = asdict(config)
    targets = target_lines(results)
    results["targets"] = [{"target": t, "met": met, "measured": m} for t, met, m in targets]
    results["notes"] = _notes(results, targets)
    write_report(results, out)
    return results


def run_seeds(
    out: Path,
    seeds: int,
    *,
    quick: bool = False,
    fresh: bool = False,
    config: DemoConfig | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """The whole demo on ``seeds`` consecutive seeds (from the config's), each in ``out/seed-S``; a
    table of every seed's figures and targets in ``out/seeds.md``, so fragility shows."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    base = config or (replace(QUICK) if quick else DemoConfig())
    everything = []
    for seed in range(base.seed, base.seed + seeds):
        log(f"seed {seed} ({seed - base.seed + 1} of {seeds})")
        results = run_demo(
            out / f"seed-{seed}",
            quick=quick,
            fresh=fresh,
            config=replace(base, seed=seed),
            show_progress=show_progress,
            log=log,
        )
        everything.append(results)
    (out / "seeds.md").write_text("\n".join(seeds_table(everything)) + "\n")
    return everything


def seeds_table(all_results: list[dict[str, Any]]) -> list[str]:
    """One row per seed: greedy accuracies with intervals, the ratios, targets met, times."""
    lines = [
        "# memento demo over seeds",
        "",
        "| seed | control pass@1 [95%] | memento pass@1 [95%] | gap | peak KV | AUC KV | throughput "
        "| restart pass@1 | sampled control / memento pass@1 | targets met | training / evaluation s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for results in all_results:
        by = {f"{r['label']} [{r['mode']['name']}]": r for r in results["runs"]}
        sampled = {r["label"]: r for r in results.get("sampled", {}).get("runs", [])}
        targets = results["targets"]
        measured = [t["measured"] for t in targets]

        def acc(run: dict[str, Any] | None) -> str:
            if run is None:
                return "n/a"
            low, high = run["pass@1_ci95"]
            return f"{100 * run['accuracy']['pass@1']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"

        pair = "n/a"
        if sampled:
            pair = " / ".join(
                f"{100 * sampled[label]['accuracy']['pass@1']:.1f}%" for label in SAMPLED.values() if label in sampled
            )
        restart = by.get("memento [restart]")
        lines.append(
            f"| {results['config']['seed']} | {acc(by.get('control [vanilla]'))} | {acc(by.get('memento [memento]'))} "
            f"| {measured[1]} | {measured[2]} | {measured[3]} | {measured[4]} "
            f"| {100 * restart['accuracy']['pass@1']:.1f}% | {pair} "
            f"| {sum(t['met'] for t in targets)} of {len(targets)} "
            f"| {results['training_seconds']:.0f} / {results['evaluation_seconds']:.0f} |"
            if restart
            else f"| {results['config']['seed']} | {acc(by.get('control [vanilla]'))} | n/a | | | | | | | | |"
        )
    all_met = all(t["met"] for results in all_results for t in results["targets"])
    lines += ["", f"Every target met on every seed: {'yes' if all_met else 'no'}."]
    return lines


def training_story(config: dict[str, Any]) -> str:
    """How the models were trained and why the comparison is fair (for the report)."""
    return (
        f"Both models are one tiny Qwen3 ({config['num_layers']} x {config['hidden_size']}, seed {config['seed']}) "
        f"trained from scratch. Stage 1, shared: {config['stage1_steps']} steps (batch "
        f"{config['stage1_batch_size']}, lr {config['learning_rate']:g}, cosine down to "
        f"{config.get('stage1_final_lr_fraction', 0.0):g} of it) with full attention on short problems of "
        f"the same task ({config['stage1_knobs']}), in the memento format: the model learns the format and the "
        "arithmetic there, because on the long traces full attention can copy most steps from earlier ones and "
        "does not learn to compute them. Then two branches from stage 1's best model, each "
        f"{config['branch_steps']} steps (batch {config['batch_size']}) on the same long traces ({config['knobs']}): "
        f"the **memento** model under the memento mask (stage 2, lr {config['memento_learning_rate']:g}) and the "
        f"**control** with full attention (lr {config['control_learning_rate']:g}). Each branch's learning rate "
        "was chosen by its own validation loss and each keeps its best checkpoint by it, so the control is tuned "
        "as hard as the method; the two see the same data for the same number of steps and differ only in the "
        "mask. The task needs state carried across blocks: each block continues the digit stream and the running "
        "total from the memento before it, and the answer is the total after the last step."
    )


def _best_loss(model_dir: Path) -> float | None:
    """The best validation loss the training summary saved beside a checkpoint (None if absent)."""
    summary = model_dir / "memento_training.json"
    return json.loads(summary.read_text()).get("best_eval_loss") if summary.exists() else None


def _notes(results: dict[str, Any], targets: list[tuple[str, bool, str]]) -> list[str]:
    from memento.eval.metrics import paired_difference_interval

    restart = next((r for r in results["runs"] if r["mode"]["name"] == "restart"), None)
    memento = next((r for r in results["runs"] if r["mode"]["name"] == "memento"), None)
    lines = ["## Targets (memento [memento] against control [vanilla])", ""]
    lines += [f"- {'met' if met else 'NOT met'}: {name} (measured {value})" for name, met, value in targets]
    if restart and memento:
        diff = 100 * (restart["accuracy"]["pass@1"] - memento["accuracy"]["pass@1"])
        reading = (
            "the same model loses accuracy when each memento's KV is recomputed without its block (the paper: "
            "-15 pp on AIME'24); free-running, broken format and loops take part of that, so `memento probe "
            "restart` separates them (accuracy among well-formed completions, teacher-forced loss per block)"
            if diff < 0
            else "no loss from recomputing the mementos without their blocks on this task"
        )
        broken = restart["finish_reasons"].get("format_error", 0)
        looped = restart["finish_reasons"].get("length", 0)
        _, low, high = paired_difference_interval(restart["problem_accuracy"], memento["problem_accuracy"])
        lines.append(
            f"- restart ablation: pass@1 {100 * restart['accuracy']['pass@1']:.1f}% vs memento "
            f"{100 * memento['accuracy']['pass@1']:.1f}% ({diff:+.1f} pp, 95% interval [{100 * low:+.1f}, "
            f"{100 * high:+.1f}] paired over problems; of {len(restart['rows'])} restart samples {broken} broke "
            f"the memento format and {looped} ran to the length limit): {reading}."
        )
    losses = results.get("validation_loss", {})
    if losses:
        lines.append(
            "- best validation loss per completion token: "
            + ", ".join(f"{name} {loss:.2g}" for name, loss in losses.items() if loss is not None)
            + " (the same validation traces; the memento model's under its mask)"
        )
    lines += [
        "",
        f"Training {results['training_seconds']:.0f} s, evaluation {results['evaluation_seconds']:.0f} s, "
        f"total {results['total_seconds']:.0f} s.",
        "",
        "## How the two models were trained, and why the comparison is fair",
        "",
        training_story(results["config"]),
    ]
    lines.insert(0, f"Seed {results['config']['seed']} (data, weights, sampling).\n")
    return ["\n".join(lines), "\n".join(sampled_lines(results)), "\n".join(paper_lines(results))]
