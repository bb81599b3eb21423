"""Statistics of memento traces: blocks per trace, tokens per block and memento, compression.

:func:`trace_stats` is pure (traces and a tokenizer in, a JSON-ready dict out). For large files,
:class:`StatsAccumulator` takes traces one at a time and keeps only a few integers per unit.

The paper reports, for OpenMementos: median 9 blocks per trace (math, code), 7 (science); average
block ~1,150 tokens, memento ~194 tokens; ~6x compression overall (total block tokens / total
memento tokens); median per-unit memento/block ratio 0.16 (math), 0.18 (code), 0.23 (science).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from memento.format import MementoTrace
from memento.tokens import RegexTokenizer, TextTokenizer


def is_approximate(tokenizer: TextTokenizer) -> bool:
    """True for the regex stand-in, whose counts only approximate a real tokenizer's."""
    return isinstance(tokenizer, RegexTokenizer)


def summarise(values: Sequence[float]) -> dict[str, float | int | None]:
    """mean/median/min/max of ``values`` (None each when there are none)."""
    if not values:
        return {"mean": None, "median": None, "min": None, "max": None}
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


class StatsAccumulator:
    """Collects per-trace and per-unit counts; :meth:`result` gives the :func:`trace_stats` dict."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.blocks_per_trace: list[int] = []
        self.block_tokens: list[int] = []
        self.memento_tokens: list[int] = []
        self.block_chars: list[int] = []
        self.memento_chars: list[int] = []
        self.unit_ratios: list[float] = []
        self.prompt_tokens: list[int] = []
        self.answer_tokens: list[int] = []
        self.answers = 0

    def add(self, trace: MementoTrace[str]) -> None:
        count = self.tokenizer.count
        self.blocks_per_trace.append(len(trace.units))
        for unit in trace.units:
            b, m = count(unit.block), count(unit.memento)
            self.block_tokens.append(b)
            self.memento_tokens.append(m)
            self.block_chars.append(len(unit.block.strip()))
            self.memento_chars.append(len(unit.memento.strip()))
            if b > 0:
                self.unit_ratios.append(m / b)
        self.prompt_tokens.append(count(trace.prompt))
        answer = trace.final_answer
        self.answer_tokens.append(count(answer))
        if answer:
            self.answers += 1

    def result(self) -> dict[str, Any]:
        total_block = sum(self.block_tokens)
        total_memento = sum(self.memento_tokens)
        records = len(self.blocks_per_trace)
        ratio = summarise(self.unit_ratios)
        return {
            "records": records,
            "units": len(self.block_tokens),
            "tokenizer": {"name": self.tokenizer.name, "approximate": is_approximate(self.tokenizer)},
            "blocks_per_trace": summarise(self.blocks_per_trace),
            "block_tokens": {"total": total_block, **summarise(self.block_tokens)},
            "memento_tokens": {"total": total_memento, **summarise(self.memento_tokens)},
            "block_chars": summarise(self.block_chars),
            "memento_chars": summarise(self.memento_chars),
            "compression_ratio": total_block / total_memento if total_memento else None,
            "memento_block_ratio": {"median": ratio["median"], "mean": ratio["mean"]},
            "prompt_tokens": summarise(self.prompt_tokens),
            "answers": {
                "with_answer": self.answers,
                "without_answer": records - self.answers,
                "tokens": summarise(self.answer_tokens),
            },
        }


def trace_stats(traces: Iterable[MementoTrace[str]], tokenizer: TextTokenizer) -> dict[str, Any]:
    """Statistics of text traces, token counts by ``tokenizer`` (see the module docstring).

    Keys: ``records``, ``units``, ``tokenizer`` {name, approximate}, ``blocks_per_trace``
    {mean, median, min, max}, ``block_tokens`` and ``memento_tokens`` {total, mean, median, min, max},
    ``block_chars``/``memento_chars``, ``compression_ratio`` (total block tokens / total memento
    tokens), ``memento_block_ratio`` {median, mean} (per unit), ``prompt_tokens``, ``answers``
    {with_answer, without_answer, tokens}. Statistics of nothing are None.
    """
    acc = StatsAccumulator(tokenizer)
    for trace in traces:
        acc.add(trace)
    return acc.result()


def _fmt(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def stats_rows(stats: dict[str, Any]) -> list[tuple[str, str]]:
    """The statistics as (quantity, value) rows for a table; token counts say which tokenizer."""
    tok = stats["tokenizer"]
    approx = " (approximate)" if tok["approximate"] else ""
    bpt, bt, mt = stats["blocks_per_trace"], stats["block_tokens"], stats["memento_tokens"]
    ratio = stats["memento_block_ratio"]
    answers = stats["answers"]
    compression = stats["compression_ratio"]
    return [
        ("records", _fmt(stats["records"])),
        ("units (block + memento)", _fmt(stats["units"])),
        (
            "blocks per trace",
            f"mean {_fmt(bpt['mean'], 2)} · median {_fmt(bpt['median'])} · min {_fmt(bpt['min'])} · "
            f"max {_fmt(bpt['max'])}",
        ),
        ("tokens per block", f"mean {_fmt(bt['mean'])} · median {_fmt(bt['median'])} · total {_fmt(bt['total'])}"),
        ("tokens per memento", f"mean {_fmt(mt['mean'])} · median {_fmt(mt['median'])} · total {_fmt(mt['total'])}"),
        (
            "compression (block / memento tokens)",
            "-" if compression is None else f"{compression:.2f}×",
        ),
        (
            "memento / block ratio per unit",
            f"median {_fmt(ratio['median'], 3)} · mean {_fmt(ratio['mean'], 3)} (paper: 0.16 math)",
        ),
        ("answers", f"{answers['with_answer']:,} of {stats['records']:,} records have one"),
        ("tokenizer", f"{tok['name']}{approx if tok['name'] and 'approximate' not in tok['name'] else ''}"),
    ]
