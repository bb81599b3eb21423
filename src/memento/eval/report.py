"""report.md and its plots from evaluation results (a dict that is also saved as results.json).

The results hold a list of runs (one model under one mode each, from :func:`memento.eval.run.run_mode`)
and the name of the baseline run (normally a vanilla one): every other run's KV and throughput are
reported as ratios to it, and its accuracy as a difference in points. KV figures for real model sizes
come from :mod:`memento.eval.kvsim` (the same token counts, times each architecture's bytes per token).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memento.eval.kvsim import PRESETS, KVSpec
from memento.eval.metrics import paired_difference_interval

PLOTS = {
    "sawtooth": "kv_sawtooth.png",
    "accuracy_vs_kv": "accuracy_vs_peak_kv.png",
    "structure": "structure.png",
}


def run_name(run: dict[str, Any]) -> str:
    return f"{run['label']} [{run['mode']['name']}]"


def baseline_run(results: dict[str, Any]) -> dict[str, Any]:
    """The run named by ``results['baseline']``, else the first vanilla run, else the first run."""
    runs = results["runs"]
    wanted = results.get("baseline")
    for run in runs:
        if run_name(run) == wanted:
            return run
    if wanted:
        raise ValueError(f"baseline {wanted!r} is not one of the runs: {', '.join(map(run_name, runs))}")
    return next((r for r in runs if r["mode"]["name"] == "vanilla"), runs[0])


def comparisons(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run against the baseline: accuracy difference (pp) and KV / throughput ratios."""
    base = baseline_run(results)
    out = []
    for run in results["runs"]:
        if run is base:
            continue
        paired = _paired(run, base)
        out.append(
            {
                "run": run_name(run),
                "baseline": run_name(base),
                "pass@1_diff_pp": 100 * (run["accuracy"]["pass@1"] - base["accuracy"]["pass@1"]),
                "pass@1_diff_ci95_pp": [100 * paired[1], 100 * paired[2]] if paired else None,
                "peak_kv_ratio": _ratio(run["mean_peak_kv"], base["mean_peak_kv"]),
                "auc_kv_ratio": _ratio(run["mean_auc_kv"], base["mean_auc_kv"]),
                "throughput_ratio": _ratio(run["tokens_per_second"], base["tokens_per_second"]),
            }
        )
    return out


def _paired(run: dict[str, Any], base: dict[str, Any]) -> tuple[float, float, float] | None:
    """The paired difference in accuracy over the same problems (None when they are not the same)."""
    a, b = run.get("problem_accuracy"), base.get("problem_accuracy")
    same = [r["problem"] for r in run.get("rows", []) if r.get("sample", 0) == 0] == [
        r["problem"] for r in base.get("rows", []) if r.get("sample", 0) == 0
    ]
    if not a or not b or len(a) != len(b) or not same:
        return None
    return paired_difference_interval(a, b)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _interval(bounds: list[float] | None) -> str:
    return "" if not bounds else f" [{bounds[0]:+.1f}, {bounds[1]:+.1f}]"


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def accuracy_columns(results: dict[str, Any]) -> list[str]:
    """pass@1 first, then the pass@k / maj@k every run has, in k order."""
    keys = set.intersection(*(set(r["accuracy"]) for r in results["runs"]))
    rest = sorted((k for k in keys if k != "pass@1"), key=lambda k: (int(k.split("@")[1]), not k.startswith("pass")))
    return ["pass@1", *rest]


def results_table(results: dict[str, Any]) -> list[str]:
    """The main table: accuracy, KV in tokens and bytes, throughput, finish reasons, per run."""
    columns = accuracy_columns(results)
    head = [
        "run",
        *(f"{c} [95% interval]" if c == "pass@1" else c for c in columns),
        "mean peak KV (tokens)",
        "mean AUC KV (token-steps)",
        "peak KV (KiB, this model)",
    ]
    head += ["tokens/s", "mean tokens", "finish reasons"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in results["runs"]:
        cells = [run_name(run)]
        cells += [f"{100 * run['accuracy'][c]:.1f}%" for c in columns]
        low, high = run.get("pass@1_ci95") or (None, None)
        cells[1] += f" [{100 * low:.1f}, {100 * high:.1f}]" if low is not None else ""
        cells += [
            f"{run['mean_peak_kv']:.0f}",
            f"{run['mean_auc_kv']:,.0f}",
            f"{run['mean_peak_kv'] * run['bytes_per_token'] / 1024:.1f}",
            f"{run['tokens_per_second']:,.0f}",
            f"{run['mean_tokens']:.0f}",
            ", ".join(f"{k} {v}" for k, v in sorted(run["finish_reasons"].items())),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def comparison_table(results: dict[str, Any]) -> list[str]:
    rows = comparisons(results)
    if not rows:
        return []
    lines = [
        f"Against the baseline **{rows[0]['baseline']}**:",
        "",
        "| run | pass@1 difference [95% interval, paired] | peak KV ratio | AUC KV ratio | throughput ratio |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['run']} | {row['pass@1_diff_pp']:+.1f} pp{_interval(row['pass@1_diff_ci95_pp'])} "
            f"| {_fmt(row['peak_kv_ratio'], '.2f')}x "
            f"| {_fmt(row['auc_kv_ratio'], '.2f')}x | {_fmt(row['throughput_ratio'], '.2f')}x |"
        )
    return lines


def real_size_table(results: dict[str, Any], specs: list[KVSpec]) -> list[str]:
    """Mean peak (GB) and AUC (GB x ktok) each run's traces would need at real model sizes."""
    if not specs:
        return []
    head = ["run", *(f"{s.name} peak GB / AUC GB·ktok" for s in specs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in results["runs"]:
        cells = [run_name(run)]
        for spec in specs:
            peak = run["mean_peak_kv"] * spec.bytes_per_token / 1e9
            auc = run["mean_auc_kv"] * spec.bytes_per_token / 1e9 / 1000
            cells.append(f"{peak:.3g} / {auc:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    per_token = ", ".join(f"{s.name} {s.bytes_per_token // 1024} KiB" for s in specs)
    lines += ["", f"Bytes per token: {per_token} (2 x layers x KV heads x head_dim x 2 bytes, bf16)."]
    return lines


def write_report(results: dict[str, Any], out_dir: str | Path, kv_models: list[str] | None = None) -> Path:
    """Write results.json, the plots and report.md into ``out_dir``; return report.md's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {**results, "comparisons": comparisons(results)}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    specs = [PRESETS[name] for name in (kv_models if kv_models is not None else ["qwen3-8b"])]
    plots = draw_plots(results, out)

    lines = [f"# {results.get('title', 'Evaluation')}", ""]
    task = results.get("task", {})
    if task:
        lines += [", ".join(f"{k}: {v}" for k, v in task.items()), ""]
    settings = results.get("settings", {})
    if settings:
        lines += ["Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), ""]
    lines += ["## Results", "", *results_table(results), ""]
    lines += [*comparison_table(results), ""]
    for note in results.get("notes", []):
        lines += [note, ""]
    lines += ["## KV at real model sizes (the same traces)", "", *real_size_table(results, specs), ""]
    if plots:
        lines += ["## Plots", ""]
        for title, name in plots:
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def draw_plots(results: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    """The KV sawtooth, accuracy vs peak KV, and the block / memento length distributions."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawn: list[tuple[str, str]] = []
    runs = results["runs"]
    base = baseline_run(results)

    # 1. Live KV over decode steps for one request, each run on the same problem.
    fig = Figure(figsize=(9, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    problem = base["curves"][0]["problem"] if base.get("curves") else None
    for run in runs:
        curve = next((c["live_kv"] for c in run.get("curves", []) if c["problem"] == problem), None)
        if curve:
            ax.plot(range(1, len(curve) + 1), curve, label=run_name(run), linewidth=1.2)
    if ax.lines:
        ax.set_xlabel("decode step")
        ax.set_ylabel("live KV (tokens)")
        ax.set_title(f"Live KV of one request (problem {problem})")
        ax.legend(fontsize=8)
        fig.savefig(out / PLOTS["sawtooth"], dpi=110)
        drawn.append(("Live KV over decode steps, one request", PLOTS["sawtooth"]))

    # 2. Accuracy against mean peak KV, one point per run.
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for run in [*runs, *results.get("sampled", {}).get("runs", [])]:  # the demo's sampled runs too
        accuracy = 100 * run["accuracy"]["pass@1"]
        low, high = run.get("pass@1_ci95") or (run["accuracy"]["pass@1"],) * 2
        error = [[max(0.0, accuracy - 100 * low)], [max(0.0, 100 * high - accuracy)]]
        ax.errorbar(run["mean_peak_kv"], accuracy, yerr=error, fmt="o", markersize=6, capsize=3)
        ax.annotate(run_name(run), (run["mean_peak_kv"], 100 * run["accuracy"]["pass@1"]), fontsize=8)
    ax.set_xlabel("mean peak KV per request (tokens)")
    ax.set_ylabel("pass@1 (%), 95% interval")
    ax.set_xlim(left=0)
    ax.set_ylim(-2, 102)
    ax.set_title("Accuracy vs peak KV")
    fig.savefig(out / PLOTS["accuracy_vs_kv"], dpi=110)
    drawn.append(("Accuracy vs peak KV", PLOTS["accuracy_vs_kv"]))

    # 3. Blocks per completion and tokens per block / memento, for runs that wrote blocks.
    with_blocks = [r for r in runs if any(row["blocks"] for row in r.get("rows", []))]
    if with_blocks:
        fig = Figure(figsize=(12, 3.8), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, 3)
        series = {
            run_name(run): (
                [r["blocks"] for r in run["rows"]],
                [n for r in run["rows"] for n in r["block_tokens"]],
                [n for r in run["rows"] for n in r["memento_tokens"]],
            )
            for run in with_blocks
        }
        for i, ax in enumerate(axes):  # one set of bin edges per panel, so the runs' bars line up
            values = [v for s in series.values() for v in s[i]]
            top = max(values, default=1)
            step = 1 if i == 0 or top <= 40 else max(1, top // 40)
            bins = list(range(0, top + step + 1, step))
            for name, data in series.items():
                ax.hist(data[i], bins=bins, alpha=0.5, label=name)
        for ax, title in zip(axes, ("blocks per completion", "tokens per block", "tokens per memento"), strict=True):
            ax.set_title(title)
            ax.set_ylabel("count")
        axes[0].legend(fontsize=7)
        fig.savefig(out / PLOTS["structure"], dpi=110)
        drawn.append(("Blocks and memento lengths", PLOTS["structure"]))
    return drawn


def runs_table(runs: list[dict[str, Any]], title: str | None = None):
    """The runs as a rich table for the terminal (names escaped: ``[vanilla]`` is not markup)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title) if title else None)
    for column in ("run", "pass@1", "mean peak KV", "mean AUC KV", "tokens/s", "finish reasons"):
        table.add_column(column, justify="left" if column in ("run", "finish reasons") else "right")
    for run in runs:
        table.add_row(
            escape(run_name(run)),
            f"{100 * run['accuracy']['pass@1']:.1f}%",
            f"{run['mean_peak_kv']:.0f}",
            f"{run['mean_auc_kv']:,.0f}",
            f"{run['tokens_per_second']:,.0f}",
            ", ".join(f"{k} {v}" for k, v in sorted(run["finish_reasons"].items())),
        )
    return table
