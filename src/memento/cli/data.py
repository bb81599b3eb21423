"""``memento data``: the OpenMementos data pipeline. ``data build`` turns plain reasoning traces into
memento traces with any OpenAI-compatible LLM (memento.data.pipeline, resumable); ``data stats``
prints a dataset's statistics and draws the paper-style histograms."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from memento.cli.common import (
    ProgressOpt,
    fail,
    progress_bar,
    read_traces,
    require_exists,
    settings_from,
    stderr_is_terminal,
    text_tokenizer,
    tokenizer_label,
)
from memento.data.llm import LLMConfig
from memento.data.pipeline import PipelineConfig, SegmentSettings, run_pipeline
from memento.data.plots import draw_histograms
from memento.data.summarize import SummarizeSettings
from memento.format import MementoFormatError
from memento.records_io import read_records
from memento.stats import StatsAccumulator, stats_rows

app = typer.Typer()
data_app = typer.Typer(
    help="The OpenMementos data pipeline: plain reasoning traces -> memento traces.", no_args_is_help=True
)
app.add_typer(data_app, name="data")

HfTokenizerOpt = Annotated[Path | None, typer.Option("--tokenizer", help="HF tokenizer for token counts.")]


@data_app.command("build")
def data_build_command(
    input_path: Annotated[Path, typer.Argument(help="JSONL / Parquet / HF dataset of problem + cot (or response).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output directory (shards, merged files).")],
    base_url: Annotated[
        str, typer.Option("--base-url", help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    ],
    model: Annotated[str, typer.Option("--model", help="The model for boundaries and mementos.")],
    api_key_env: Annotated[str, typer.Option("--api-key-env", help="Env var with the API key.")] = "OPENAI_API_KEY",
    judge_model: Annotated[str | None, typer.Option("--judge-model", help="Another model to judge mementos.")] = None,
    judge_base_url: Annotated[str | None, typer.Option("--judge-base-url")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="LLM requests in flight.")] = 16,
    traces_in_flight: Annotated[int, typer.Option("--traces-in-flight", min=1)] = 8,
    max_retries: Annotated[int, typer.Option("--max-retries", min=0)] = 5,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds per LLM request.")] = 120.0,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="LLM answer cache (default: OUT/llm-cache).")
    ] = None,
    shard_size: Annotated[int, typer.Option("--shard-size", min=1)] = 100,
    tokenizer: HfTokenizerOpt = None,
    lam: Annotated[float, typer.Option("--lam", min=0.0, help="Weight of the block-size CV.")] = 0.5,
    min_block_tokens: Annotated[int, typer.Option("--min-block-tokens", min=0)] = 200,
    min_blocks: Annotated[int, typer.Option("--min-blocks", min=1)] = 1,
    max_blocks: Annotated[int | None, typer.Option("--max-blocks", min=1)] = None,
    score_norm: Annotated[
        str,
        typer.Option(
            "--score-norm",
            help="Divide the chosen cut scores by the block count K (blocks: the release) or by K - 1 "
            "(cuts: the paper's text).",
        ),
    ] = "blocks",
    threshold: Annotated[int, typer.Option("--threshold", min=0, max=10, help="Judge score to accept.")] = 8,
    max_rounds: Annotated[int, typer.Option("--max-rounds", min=1, help="Compress + judge rounds.")] = 2,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Only the first N records.")] = None,
    split: Annotated[str | None, typer.Option("--split")] = None,
    price_per_1k_prompt: Annotated[
        float, typer.Option("--price-per-1k-prompt", min=0.0, help="Price of 1,000 prompt tokens (cost reports).")
    ] = 0.0,
    price_per_1k_completion: Annotated[
        float, typer.Option("--price-per-1k-completion", min=0.0, help="Price of 1,000 output tokens.")
    ] = 0.0,
    estimate: Annotated[
        bool,
        typer.Option(
            "--estimate",
            help="Only count the LLM requests and tokens the build will make, and their price; call nothing.",
        ),
    ] = False,
    progress: ProgressOpt = True,
) -> None:
    """Turn plain reasoning traces into memento traces with any OpenAI-compatible LLM. Resumable.

    Writes OUT/default.jsonl and OUT/full.jsonl (the two OpenMementos schemas), OUT/failed.jsonl
    (traces that could not be done, with the reason) and OUT/summary.json. Kill it at any moment and
    run the same command again: finished shards are kept and every LLM answer already received comes
    from the cache.
    """
    require_exists(input_path)
    options = dict(locals())

    def llm(url: str, name: str) -> LLMConfig:
        return settings_from(
            LLMConfig,
            options,
            base_url=url,
            model=name,
            max_concurrency=concurrency,
            timeout_s=timeout,
            cache_dir=cache_dir or output / "llm-cache",
        )

    try:
        config = settings_from(
            PipelineConfig,
            options,
            input=input_path,
            llm=llm(base_url, model),
            judge_llm=llm(judge_base_url or base_url, judge_model) if judge_model else None,
            tokenizer=str(tokenizer) if tokenizer else None,
            segmentation=settings_from(SegmentSettings, options),
            summarize=settings_from(SummarizeSettings, options),
        )
        if estimate:
            _print_estimate(config)
            return
        console = Console(stderr=True)
        with progress_bar("traces", console, enabled=progress and stderr_is_terminal(), elapsed=True) as show:
            summary = asyncio.run(run_pipeline(config, show))
    except ValueError as exc:
        fail(str(exc), code=1)
    llm_stats, this_run = summary["llm"], summary["llm_this_run"]
    runs = f" over {summary['runs']} runs (this one: {this_run['requests']} requests)" if summary["runs"] > 1 else ""
    Console().print(
        f"{summary['default']} memento traces, {summary['failed']} failed, of {summary['records']} records "
        f"({summary['resumed_shards']} of {summary['shards']} shards were already done); LLM: "
        f"{llm_stats['requests']} requests, {llm_stats['cache_hits']} from the cache, {llm_stats['retries']} retries, "
        f"{llm_stats['prompt_tokens'] + llm_stats['completion_tokens']} tokens{runs} -> {output}",
        soft_wrap=True,
    )


def _print_estimate(config: PipelineConfig) -> None:
    """The LLM work of the build, from its inputs and settings, before any call (memento.data.estimate)."""
    from memento.data.estimate import estimate_build
    from memento.data.pipeline import read_inputs
    from memento.tokens import load_tokenizer

    records = (record for _, record in read_inputs(config))
    result = estimate_build(
        records,
        load_tokenizer(config.tokenizer).count,
        boundaries=config.boundaries,
        summarize=config.summarize,
    )
    llm = config.llm
    low, high = result.price(llm.price_per_1k_prompt, llm.price_per_1k_completion)
    table = Table(title=f"memento data build --estimate: {result.records} records, {result.traces} traces")
    for column in ("calls", "requests", "prompt tokens", "output tokens"):
        table.add_column(column, justify="right" if column != "calls" else "left")
    rows = [
        ("boundary scores (exact count)", result.boundaries),
        ("mementos, every one accepted at once", result.mementos_low),
        (f"mementos, {config.summarize.max_rounds} rounds each", result.mementos_high),
    ]
    for name, calls in rows:
        table.add_row(name, f"{calls.requests:,}", f"{calls.prompt_tokens:,}", f"{calls.output_tokens:,}")
    console = Console()
    console.print(table)
    assumed = result.assumptions
    console.print(
        f"{result.sentences:,} sentences, {result.think_tokens:,} thinking tokens, ~{result.blocks:,} blocks "
        f"(assumed: {assumed['block_tokens']} tokens per block, {assumed['memento_tokens']} per memento, "
        f"{assumed['judge_tokens']} per judge answer). Price at {llm.price_per_1k_prompt} / "
        f"{llm.price_per_1k_completion} per 1K prompt / output tokens: {low:,.2f} to {high:,.2f}.",
        soft_wrap=True,
    )


@data_app.command("stats")
def data_stats_command(
    file: Annotated[Path, typer.Argument(help="Memento traces (JSONL, Parquet or HF dataset).")],
    tokenizer: HfTokenizerOpt = None,
    plots: Annotated[Path | None, typer.Option("--plots", help="Directory for the histograms (PNG).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the statistics as JSON.")] = False,
) -> None:
    """Dataset statistics and the paper-style histograms: blocks per trace, tokens per block and
    memento, compression ratio."""
    require_exists(file)
    tok = text_tokenizer(tokenizer)
    acc = StatsAccumulator(tok)
    bad = 0
    for _, outcome in read_traces(read_records(file)):
        if isinstance(outcome, MementoFormatError):
            bad += 1
        else:
            acc.add(outcome)
    result = acc.result()
    result["malformed"] = bad
    if plots is not None:
        result["plots"] = [str(p) for p in draw_histograms(acc, plots)]
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"{file} ({tokenizer_label(tok)})")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    for name, value in stats_rows(result):
        table.add_row(name, value)
    console = Console()
    console.print(table)
    if bad:
        console.print(f"{bad} malformed records skipped (memento validate names them)")
    for path in result.get("plots", []):
        console.print(f"plot: {path}")
