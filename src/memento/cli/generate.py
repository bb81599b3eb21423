"""``memento generate``: run the memento engine (memento.engine.LLM) on prompts given on the command
line or read from records, and print the completions (or write them as JSON lines) with the KV
accounting: tokens/s, pool peak, evictions, preemptions."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from memento.chat import chat_prompt
from memento.cli.common import (
    DtypeOpt,
    KvBudgetOpt,
    MaxBlockTokensOpt,
    MaxNumSeqsOpt,
    MaxTokensOpt,
    ModelArg,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    fail,
    fields_in,
    mask_config,
    mask_options,
    require_exists,
    settings_from,
)
from memento.engine import LLM, EngineConfig, SamplingParams
from memento.families import default_mask
from memento.records_io import RecordReadError, read_records

app = typer.Typer()


def _read_prompts(path: Path) -> list[str]:
    """The 'problem' (or 'prompt') text of every record of ``path``; exit 1 on a record without one."""
    require_exists(path)
    texts = []
    for label, record in read_records(path):
        if isinstance(record, RecordReadError):
            fail(f"{path}: {record}", code=1)
        text = record.get("problem", record.get("prompt"))
        if not isinstance(text, str):
            fail(f"{path} record {label}: no 'problem' or 'prompt' text field", code=1)
        texts.append(text)
    return texts


@app.command("generate")
@mask_options()
def generate_command(
    model: ModelArg,
    prompts_file: Annotated[
        Path | None,
        typer.Option("--prompts", help="Records with a 'problem' (or 'prompt') field: JSONL, Parquet or HF dataset."),
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="A prompt (repeatable).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write one JSON line per sample here.")] = None,
    chat: Annotated[bool, typer.Option("--chat/--raw", help="Wrap each prompt in the chat template.")] = True,
    kv_budget_tokens: KvBudgetOpt = 32768,
    max_num_seqs: MaxNumSeqsOpt = 64,
    max_block_tokens: MaxBlockTokensOpt = None,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = -1,
    max_tokens: MaxTokensOpt = 1024,
    n: Annotated[int, typer.Option("--n", min=1, help="Samples per prompt.")] = 1,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    dtype: DtypeOpt = "auto",
    **mask_knobs: int | bool,
) -> None:
    """Generate with the memento engine: blocks are evicted from the KV pool as their mementos close.

    Prints each completion (or writes JSON lines with the text, tokens, finish reason and KV
    accounting) and a summary: tokens/s, peak and AUC of the pool, evictions, preemptions.
    """
    texts = list(prompt or [])
    if prompts_file is not None:
        texts += _read_prompts(prompts_file)
    if not texts:
        fail("give --prompt or --prompts")
    mask = mask_config(default_mask(model), mask_knobs)
    require_exists(model)
    try:
        params = settings_from(SamplingParams, locals())
        llm = LLM(model, dtype=dtype, **fields_in(EngineConfig, locals()))
        tokenizer = llm.engine.tokenizer
        inputs = [chat_prompt(tokenizer, t) if chat else t for t in texts]
        start = time.perf_counter()
        results = llm.generate(inputs, params)
    except ValueError as exc:
        fail(str(exc), code=1)
    seconds = time.perf_counter() - start
    console = Console(highlight=False)
    sink = output.open("w") if output is not None else None
    try:
        for text, result in zip(texts, results, strict=True):
            for out in result.outputs:
                row = {
                    "prompt": text,
                    "index": out.index,
                    "text": out.text,
                    "token_ids": out.token_ids,
                    "finish_reason": out.finish_reason,
                    "error": out.error,
                    "peak_kv": out.kv.peak,
                    "auc_kv": out.kv.auc,
                    "evictions": out.kv.evictions,
                    "evicted_tokens": out.kv.evicted_tokens,
                    "preemptions": out.kv.preemptions,
                }
                if sink is not None:
                    sink.write(json.dumps(row) + "\n")
                else:
                    console.print(Text(f"── {text} [{out.index}] ({out.finish_reason})", style="bold"), soft_wrap=True)
                    console.print(out.text, soft_wrap=True, markup=False)
    finally:
        if sink is not None:
            sink.close()
    stats = llm.engine.stats
    tokens = stats.generated_tokens
    console.print(
        f"{len(texts)} prompts x {n}: {tokens} tokens in {seconds:.1f} s ({tokens / seconds:.0f} tokens/s); "
        f"pool peak {stats.peak_kv} tokens ({stats.peak_kv * llm.engine.geometry.bytes_per_token / 2**20:.1f} MiB), "
        f"{stats.evictions} evictions ({stats.evicted_tokens} tokens), {stats.preemptions} preemptions",
        soft_wrap=True,
    )
