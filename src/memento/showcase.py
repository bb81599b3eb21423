"""The masking foundation shown on real traces, without training anything (``make demo`` runs the full demo).

It writes a few memento traces of the default synthetic task (:mod:`memento.synth`: a running
sum, each memento carrying the total) as an OpenMementos JSONL file, checks them with ``memento validate``,
prints one with ``memento inspect``, draws its attention mask for several knob settings, and plots
the live KV (keys each token attends to) over the trace: a ramp for vanilla, a sawtooth for
memento. Everything is computed from :mod:`memento.masking`; nothing is assumed.

Usage: ``python -m memento.showcase OUT_DIR``
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from memento.format import MementoTrace, render_response
from memento.masking import MaskConfig, compute_visibility
from memento.synth import DEFAULT_TASK, generate, write_split
from memento.tokens import RegexTokenizer

SETTINGS: dict[str, MaskConfig] = {
    "vanilla": MaskConfig(keep_last_n=-1),
    "memento": MaskConfig(keep_last_n=0),
    "keep-last-1": MaskConfig(keep_last_n=1),
    "restart": MaskConfig(keep_last_n=0, restart=True),
}


def kv_table(trace: MementoTrace[str], tokenizer: RegexTokenizer) -> tuple[Table, dict[str, np.ndarray]]:
    """Peak and area of the live KV of one trace under each setting, relative to vanilla."""
    ids = tokenizer.encode(render_response(trace))
    curves = {}
    for name, config in SETTINGS.items():
        vis = compute_visibility(ids, tokenizer.specials, config)
        curves[name] = vis.live_kv()[vis.output_rows]  # one value per generated token
    table = Table(title=f"Live KV of record 1 ({len(ids)} tokens, regex tokenizer)")
    for column in ("setting", "peak KV", "peak / vanilla", "AUC / vanilla"):
        table.add_column(column, justify="right")
    base = curves["vanilla"]
    for name, curve in curves.items():
        table.add_row(name, str(int(curve.max())), f"{curve.max() / base.max():.2f}", f"{curve.sum() / base.sum():.2f}")
    return table, curves


def plot_curves(curves: dict[str, np.ndarray], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, curve in curves.items():
        ax.plot(np.arange(len(curve)), curve, label=name, linewidth=1.2)
    ax.set_xlabel("token")
    ax.set_ylabel("live KV (tokens attended to)")
    ax.set_title("The memento sawtooth: live KV over one trace")
    ax.legend()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "runs/showcase")
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    problems = generate(DEFAULT_TASK, "test", 8, seed=0)
    traces = [p.trace for p in problems]
    data = out / "traces.jsonl"
    write_split(data, problems)
    console.rule(f"[bold]1. {len(traces)} running-sum memento traces -> {data}")

    def memento_cli(*cli_args: str, show_output: bool = True) -> None:
        command = [sys.executable, "-m", "memento", *cli_args]
        console.print(f"[dim]$ memento {' '.join(cli_args)}")
        subprocess.run(command, check=True, stdout=None if show_output else subprocess.DEVNULL)

    console.rule("[bold]2. memento validate")
    memento_cli("validate", str(data))
    console.rule("[bold]3. memento inspect (record 1) and its attention masks")
    memento_cli("inspect", str(data), "--record", "1", "--mask-png", str(out / "mask-memento.png"))
    for name, flags in {
        "vanilla": ["--keep-last-n", "-1"],
        "keep-last-1": ["--keep-last-n", "1"],
        "restart": ["--restart"],
    }.items():
        png = str(out / f"mask-{name}.png")
        memento_cli("inspect", str(data), "--record", "1", "--mask-png", png, *flags, show_output=False)
    console.rule("[bold]4. live KV: vanilla ramp vs memento sawtooth")
    table, curves = kv_table(traces[0], RegexTokenizer())
    console.print(table)
    plot_curves(curves, out / "live-kv.png")
    console.print(f"Pictures: {', '.join(sorted(p.name for p in out.glob('*.png')))} in {out}/")
    console.print(
        "[dim]The end-to-end demo (training, generation with KV eviction, accuracy) comes with the "
        "training, engine and evaluation issues: see docs/STATUS.md."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
