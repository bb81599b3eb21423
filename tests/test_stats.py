"""trace_stats: exact counts with the regex tokenizer, computed by hand."""

from __future__ import annotations

import pytest

from memento.format import MementoTrace
from memento.stats import stats_rows, trace_stats
from memento.tokens import RegexTokenizer

# Regex-tokenizer counts (words and punctuation, each with its leading space; trailing space free):
#   " a b c d " -> 4, " x " -> 1, " e f g h i j " -> 6, " y z " -> 2
#   " k l m n o p q r " -> 8, " s t " -> 2
#   " 1 + 2 = 3 " -> 5, " three " -> 1, " u v " -> 2, " w " -> 1, " alpha beta gamma " -> 3, " delta " -> 1
TRACES = [
    MementoTrace.new("p one", [(" a b c d ", " x "), (" e f g h i j ", " y z ")], "1"),
    MementoTrace.new("p two", [(" k l m n o p q r ", " s t ")], "2"),
    MementoTrace.new("p three", [(" 1 + 2 = 3 ", " three "), (" u v ", " w "), (" alpha beta gamma ", " delta ")], ""),
]


def test_trace_stats_exact_values() -> None:
    stats = trace_stats(TRACES, RegexTokenizer())
    assert stats["records"] == 3
    assert stats["units"] == 6
    assert stats["blocks_per_trace"] == {"mean": 2.0, "median": 2, "min": 1, "max": 3}
    assert stats["block_tokens"]["total"] == 4 + 6 + 8 + 5 + 2 + 3 == 28
    assert stats["memento_tokens"]["total"] == 1 + 2 + 2 + 1 + 1 + 1 == 8
    assert stats["block_tokens"]["median"] == 4.5  # sorted 2 3 4 5 6 8
    assert stats["block_tokens"]["min"] == 2 and stats["block_tokens"]["max"] == 8
    assert stats["memento_tokens"]["median"] == 1.0
    assert stats["compression_ratio"] == pytest.approx(28 / 8)
    # per-unit memento/block: 1/4 2/6 2/8 1/5 1/2 1/3 -> sorted .2 .25 .25 .333 .333 .5
    assert stats["memento_block_ratio"]["median"] == pytest.approx((0.25 + 1 / 3) / 2)
    assert stats["memento_block_ratio"]["mean"] == pytest.approx((1 / 4 + 2 / 6 + 2 / 8 + 1 / 5 + 1 / 2 + 1 / 3) / 6)
    assert stats["answers"]["with_answer"] == 2 and stats["answers"]["without_answer"] == 1
    assert stats["prompt_tokens"]["mean"] == 2.0
    assert stats["tokenizer"] == {"name": "regex (approximate)", "approximate": True}


def test_trace_stats_of_nothing_is_none_not_a_crash() -> None:
    stats = trace_stats([], RegexTokenizer())
    assert stats["records"] == 0
    assert stats["compression_ratio"] is None
    assert stats["blocks_per_trace"]["median"] is None
    rows = dict(stats_rows(stats))
    assert rows["compression (block / memento tokens)"] == "-"


def test_stats_rows_format() -> None:
    rows = dict(stats_rows(trace_stats(TRACES, RegexTokenizer())))
    assert rows["records"] == "3"
    assert rows["blocks per trace"] == "mean 2.00 · median 2 · min 1 · max 3"
    assert rows["compression (block / memento tokens)"] == "3.50×"
    assert rows["memento / block ratio per unit"].startswith("median 0.292 · mean 0.311")
    assert rows["tokenizer"] == "regex (approximate)"
