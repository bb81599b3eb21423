"""The OpenMementos pipeline end to end: plain reasoning traces in, memento traces out, resumable.

Per trace (only the text inside ``<think>`` is split and segmented; before and after are kept):
sentences (:mod:`.sentences`) -> LLM boundary scores (:mod:`.boundaries`) -> the exact segmentation
(:mod:`.segment`) -> a memento per block, compressed and judged (:mod:`.summarize`) -> an
OpenMementos record in both schemas.

Crash safety. Input records are grouped into shards of ``shard_size`` by position. A shard's files
(default schema, full schema, metadata, failures) are each written atomically and then its
``done`` marker; a rerun skips the shards that have one. Nothing else is kept between runs but the
LLM client's on-disk cache, so after a kill at any moment the rerun redoes the unfinished shards
with every LLM answer already received taken from the cache: no record is lost or written twice, no
answered call is made again. When every shard is done the merged files are written (atomically).
A trace whose mementos could not all be written (the LLM kept failing) goes to the failures with
the reason, never into the data with a guessed memento.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memento.data.boundaries import BoundarySettings, score_boundaries
from memento.data.llm import LLMClient, LLMConfig
from memento.data.segment import SCORE_NORMS, segment
from memento.data.sentences import split_sentences, split_think
from memento.data.summarize import SummarizeSettings, summarize_trace
from memento.format import MementoTrace, MementoUnit, TraceLayout, record_from_trace
from memento.records_io import RecordReadError, pin_settings, read_records, write_json_atomic, write_records

THINK_START, THINK_END = "<think>", "</think>"


@dataclass
class SegmentSettings:
    """The segmentation objective (:func:`memento.data.segment.segment`). The defaults are the release's
    end-to-end script: the cut scores divided by the block count K (``score_norm="blocks"``), CV
    weight 0.5, K unconstrained, blocks of at least 200 tokens. ``score_norm="cuts"`` (divide by
    K - 1, the mean of the chosen cut scores) is the objective as the paper's text states it."""

    lam: float = 0.5
    min_block_tokens: int = 200
    min_blocks: int = 1
    max_blocks: int | None = None
    score_norm: str = "blocks"

    def __post_init__(self) -> None:
        # Refused here, before any LLM call, rather than by the segmenter after a trace's scoring is paid for.
        if self.score_norm not in SCORE_NORMS:
            raise ValueError(f"score_norm must be one of {', '.join(SCORE_NORMS)}, not {self.score_norm!r}")
        if self.max_blocks is not None and self.max_blocks < self.min_blocks:
            raise ValueError(f"max_blocks ({self.max_blocks}) is below min_blocks ({self.min_blocks})")


@dataclass
class PipelineConfig:
    """Everything a build needs; saved beside the output so a rerun with other settings is refused."""

    input: Path
    output: Path
    llm: LLMConfig
    judge_llm: LLMConfig | None = None
    split: str | None = None
    tokenizer: str | None = None  # an HF tokenizer for token counts (None: the offline regex stand-in)
    shard_size: int = 100
    traces_in_flight: int = 8
    limit: int | None = None
    boundaries: BoundarySettings = field(default_factory=BoundarySettings)
    segmentation: SegmentSettings = field(default_factory=SegmentSettings)
    summarize: SummarizeSettings = field(default_factory=SummarizeSettings)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide the output (not where it goes or how fast)."""
        llm = {"base_url": self.llm.base_url, "model": self.llm.model, "temperature": self.llm.temperature}
        judge = None
        if self.judge_llm is not None:
            judge = {"base_url": self.judge_llm.base_url, "model": self.judge_llm.model}
        return {
            "input": str(self.input),
            "split": self.split,
            "tokenizer": self.tokenizer,
            "shard_size": self.shard_size,
            "limit": self.limit,
            "llm": llm,
            "judge_llm": judge,
            "boundaries": asdict(self.boundaries),
            "segmentation": asdict(self.segmentation),
            "summarize": asdict(self.summarize),
        }


class TraceFailed(Exception):
    """A trace that cannot become a memento trace (recorded with the reason, not guessed)."""


def _source_fields(record: dict[str, Any], label: Any) -> tuple[str, str, str, str, str, int]:
    """(task id, problem, cot, domain, source, difficulty) from either input layout."""
    problem = record.get("problem")
    cot = record.get("cot", record.get("response"))
    if not isinstance(problem, str) or not isinstance(cot, str):
        raise TraceFailed("the record needs text fields 'problem' and 'cot' (or 'response')")
    difficulty = record.get("difficulty")
    return (
        _task_id(record, label),
        problem,
        cot,
        str(record.get("domain") or ""),
        str(record.get("source") or ""),
        int(difficulty) if isinstance(difficulty, int | float) and not isinstance(difficulty, bool) else 0,
    )


def _task_id(record: dict[str, Any] | str, label: Any) -> str:
    """The record's task id (``task_id``, else ``id``), or its position when it has none or is unreadable."""
    if isinstance(record, dict):
        return str(record.get("task_id", record.get("id", label)))
    return str(label)


async def build_trace(
    record: dict[str, Any],
    label: Any,
    client: LLMClient,
    judge: LLMClient | None,
    config: PipelineConfig,
    count_tokens: Callable[[str], int],
) -> dict[str, Any]:
    """One input record -> {"default": ..., "full": ..., "meta": ...} (raises TraceFailed)."""
    task_id, problem, cot, domain, source, difficulty = _source_fields(record, label)
    before, inside, after = split_think(cot)
    sentences = [s.text for s in split_sentences(inside)]
    if not sentences:
        raise TraceFailed("nothing inside <think> to segment")
    scores = await score_boundaries(client, problem, sentences, config.boundaries)
    seg = segment(
        [count_tokens(s) for s in sentences],
        scores.scores,
        lam=config.segmentation.lam,
        min_block_tokens=config.segmentation.min_block_tokens,
        min_blocks=config.segmentation.min_blocks,
        max_blocks=config.segmentation.max_blocks,
        score_norm=config.segmentation.score_norm,
    )
    block_sentences = [sentences[a : b + 1] for a, b in seg.blocks]
    blocks = ["".join(parts) for parts in block_sentences]
    mementos = await summarize_trace(client, problem, blocks, config.summarize, judge_client=judge)
    missing = [i for i, m in enumerate(mementos) if m.memento is None]
    if missing:
        reasons = "; ".join(f"block {i + 1}: {mementos[i].error}" for i in missing)
        raise TraceFailed(f"no memento for {len(missing)} of {len(blocks)} blocks ({reasons})")
    head = before[: -len(THINK_START)] if before.endswith(THINK_START) else before
    answer = after[len(THINK_END) :] if after.startswith(THINK_END) else after
    units = tuple(MementoUnit(block=b, memento=m.memento) for b, m in zip(blocks, mementos, strict=True))
    k = len(units)
    trace = MementoTrace(
        prompt=problem,
        units=units,
        answer=answer,
        layout=TraceLayout(head=head, gaps=("\n",) * (k + 1), joins=("",) * k),
    )
    common = {"domain": domain, "source": source, "difficulty": difficulty}
    default = record_from_trace(trace, schema="default", **common)
    full = record_from_trace(trace, schema="full", block_sentences=block_sentences, **common)
    meta = {
        "task_id": task_id,
        "sentences": len(sentences),
        "gap_scores": scores.scores,
        "score_passes": scores.passes,
        "failed_windows": scores.failed_windows,
        "blocks": [list(b) for b in seg.blocks],
        "objective": seg.objective,
        "mean_cut_score": seg.mean_score,
        "cv": seg.cv,
        "mementos": [asdict(m) for m in mementos],
    }
    return {"default": {"task_id": task_id, **default}, "full": {"task_id": task_id, **full}, "meta": meta}


# -- files --------------------------------------------------------------------------------------


def _shard_dir(config: PipelineConfig) -> Path:
    return config.output / "shards"


def _shard_path(config: PipelineConfig, kind: str, shard: int) -> Path:
    return _shard_dir(config) / f"{kind}-{shard:05d}.jsonl"


def _check_settings(config: PipelineConfig) -> None:
    """A rerun into an output made with other settings would mix two datasets: refuse it."""
    config.output.mkdir(parents=True, exist_ok=True)
    _shard_dir(config).mkdir(exist_ok=True)
    changed = pin_settings(config.output / "settings.json", config.fingerprint())
    if changed:
        raise ValueError(
            f"{config.output} was built with other settings ({', '.join(changed)} differ): use another output directory"
        )


def read_inputs(config: PipelineConfig) -> Iterator[tuple[Any, dict[str, Any] | str]]:
    """The build's input records in order, as (label, record); an unreadable one as its error text."""
    for count, (label, record) in enumerate(read_records(config.input, split=config.split)):
        if config.limit is not None and count >= config.limit:
            return
        yield label, str(record) if isinstance(record, RecordReadError) else record


def _read_input(config: PipelineConfig) -> list[tuple[Any, dict[str, Any] | str]]:
    return list(read_inputs(config))


def _write_shard(config: PipelineConfig, shard: int, results: list[dict[str, Any]]) -> None:
    for kind in ("default", "full", "meta", "failed"):
        rows = [r[kind] for r in results if kind in r]
        write_records(_shard_path(config, kind, shard), rows, format="jsonl")
    write_json_atomic(_shard_path(config, "done", shard).with_suffix(".json"), {"records": len(results)}, indent=1)


def _merge(config: PipelineConfig, shards: int) -> dict[str, int]:
    """The shards, in order, into one file per kind (streamed: the dataset need not fit in memory)."""
    counts = {}
    for kind in ("default", "full", "failed"):

        def rows(kind: str = kind):
            for shard in range(shards):
                for _, record in read_records(_shard_path(config, kind, shard), format="jsonl"):
                    yield record

        counts[kind] = write_records(config.output / f"{kind}.jsonl", rows(), format="jsonl")
    return counts


# -- the run ------------------------------------------------------------------------------------


ACCOUNTING_FILE = "accounting.json"
"""The LLM accounting of every run into an output, summed (rewritten after each shard, so a killed
run loses at most its shards in flight); summary.json reports it."""


def add_stats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two LLM accountings (``LLMStats.as_dict``) summed: counts, tokens, cost and the per-kind tallies."""
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict):
            merged = dict(out.get(key) or {})
            for kind, n in value.items():
                merged[kind] = merged.get(kind, 0) + n
            out[key] = merged
        else:
            out[key] = out.get(key, 0) + value
    return out


def _earlier_accounting(config: PipelineConfig) -> dict[str, Any]:
    path = config.output / ACCOUNTING_FILE
    if not path.exists():
        return {"runs": 0, "llm": {}, "judge_llm": {}}
    return json.loads(path.read_text())


def _token_counter(tokenizer: str | None) -> Callable[[str], int]:
    from memento.tokens import load_tokenizer

    return load_tokenizer(tokenizer).count


async def run_pipeline(config: PipelineConfig, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Build (or finish building) the output; returns counts and the LLM accounting."""
    _check_settings(config)
    items = _read_input(config)
    if not items:
        raise ValueError(f"{config.input} holds no records")
    size = config.shard_size
    shards = (len(items) + size - 1) // size
    done = {s for s in range(shards) if _shard_path(config, "done", s).with_suffix(".json").exists()}
    todo = [s for s in range(shards) if s not in done]
    count_tokens = _token_counter(config.tokenizer)
    gate = asyncio.Semaphore(config.traces_in_flight)
    finished = sum(min(size, len(items) - s * size) for s in done)
    total = len(items)
    earlier = _earlier_accounting(config)
    if progress:
        progress(finished, total)

    async with LLMClient(config.llm) as client:
        judge = LLMClient(config.judge_llm) if config.judge_llm is not None else None
        if judge is not None:
            await judge.__aenter__()
        try:

            async def one(index: int) -> dict[str, Any]:
                nonlocal finished
                label, record = items[index]
                async with gate:
                    try:
                        if isinstance(record, str):
                            raise TraceFailed(f"unreadable record: {record}")
                        result = await build_trace(record, label, client, judge, config, count_tokens)
                    except TraceFailed as err:
                        result = {"failed": {"record": label, "task_id": _task_id(record, label), "reason": str(err)}}
                finished += 1
                if progress:
                    progress(finished, total)
                return result

            def save_accounting() -> dict[str, Any]:
                totals = {
                    "runs": earlier["runs"] + 1,
                    "llm": add_stats(earlier["llm"], client.stats.as_dict()),
                    "judge_llm": add_stats(earlier["judge_llm"], judge.stats.as_dict() if judge else {}),
                }
                write_json_atomic(config.output / ACCOUNTING_FILE, totals, indent=1)
                return totals

            async def shard_job(shard: int) -> None:
                indices = range(shard * size, min((shard + 1) * size, len(items)))
                results = await asyncio.gather(*(one(i) for i in indices))
                _write_shard(config, shard, list(results))
                save_accounting()

            await asyncio.gather(*(shard_job(s) for s in todo))
        finally:
            if judge is not None:
                await judge.__aexit__(None, None, None)
        totals = save_accounting()
        stats = client.stats.as_dict()
        judge_stats = judge.stats.as_dict() if judge is not None else None
    counts = _merge(config, shards)
    summary = {
        "records": total,
        "shards": shards,
        "resumed_shards": len(done),
        **counts,
        "runs": totals["runs"],
        "llm": totals["llm"],
        "llm_this_run": stats,
    }
    if totals["judge_llm"]:
        summary["judge_llm"] = totals["judge_llm"]
    if judge_stats is not None:
        summary["judge_llm_this_run"] = judge_stats
    write_json_atomic(config.output / "summary.json", summary, indent=1)
    return summary
