"""The paper-style histograms of a memento dataset: blocks per trace, tokens per block and memento,
compression ratio (block tokens / memento tokens, per unit)."""

from __future__ import annotations

from pathlib import Path

from memento.stats import StatsAccumulator


def draw_histograms(acc: StatsAccumulator, out_dir: str | Path) -> list[Path]:
    """One PNG per statistic in ``out_dir``; returns their paths (statistics with no data are skipped)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    series = {
        "blocks_per_trace": (acc.blocks_per_trace, "blocks per trace"),
        "block_tokens": (acc.block_tokens, "tokens per block"),
        "memento_tokens": (acc.memento_tokens, "tokens per memento"),
        "compression_ratio": ([1 / r for r in acc.unit_ratios if r > 0], "compression (block / memento tokens)"),
    }
    paths = []
    for name, (values, label) in series.items():
        if not values:
            continue
        fig = Figure(figsize=(5, 3.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        integer = name == "blocks_per_trace"
        bins = range(min(values), max(values) + 2) if integer else 40
        ax.hist(values, bins=bins, color="#4477aa", edgecolor="white", align="left" if integer else "mid")
        ax.set_xlabel(label)
        ax.set_ylabel("count")
        ax.set_title(f"{label}: median {sorted(values)[len(values) // 2]:.3g}, n = {len(values)}")
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths
