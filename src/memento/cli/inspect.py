"""``memento inspect FILE --record N``: one trace in colour, and with ``--mask-png`` its attention mask
(who sees what under a given knob setting) drawn to a PNG. A malformed record prints its defect and
the response around it, and exits 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.panel import Panel
from rich.rule import Rule
from rich.text import Text

from memento import viz
from memento.cli.common import (
    FileArg,
    SplitOpt,
    TokenizerOpt,
    error_line,
    fail,
    mask_config,
    mask_options,
    open_source,
    schema_of,
    text_tokenizer,
    to_trace,
    tokenizer_label,
)
from memento.format import (
    BLOCK_END,
    BLOCK_START,
    SUMMARY_END,
    SUMMARY_START,
    THINK_END,
    THINK_START,
    MementoFormatError,
    MementoTrace,
    render_response,
)
from memento.masking import MaskConfig, compute_visibility
from memento.records_io import RecordSourceError
from memento.tokens import TextTokenizer

STYLE_DELIMITER = "magenta"
STYLE_BLOCK = "blue"
STYLE_MEMENTO = "bold green"
STYLE_ANSWER = "yellow"
STYLE_PROMPT = "cyan"

app = typer.Typer()


def _defect_context(record: dict[str, Any], error: MementoFormatError, width: int = 60) -> Text | None:
    """The response around a defect's position, with a marker at the position."""
    response = record.get("response")
    if error.position is None or not isinstance(response, str) or error.position > len(response):
        return None
    pos = error.position
    start, stop = max(0, pos - width), min(len(response), pos + width)
    text = Text("response: ", style="bold")
    text.append(("…" if start else "") + repr(response[start:pos])[1:-1], style="dim")
    text.append(" ▶ ", style="bold red")
    text.append(repr(response[pos:stop])[1:-1] + ("…" if stop < len(response) else ""))
    return text


def _delimited(start: str, body: str, stop: str, style: str) -> Text:
    """``start body stop`` with the delimiters in their colour and the body in ``style``."""
    text = Text()
    text.append(start, style=STYLE_DELIMITER)
    text.append(body, style=style)
    text.append(stop, style=STYLE_DELIMITER)
    return text


def _print_trace(out: Console, trace: MementoTrace[str], tok: TextTokenizer, header: str, meta: dict[str, Any]) -> None:
    count = tok.count
    out.print(Rule(Text(header, style="bold")))
    details = " · ".join(f"{k}: {v}" for k, v in meta.items() if v not in (None, ""))
    if details:
        out.print(Text(details, style="dim"), soft_wrap=True)
    out.print(
        Panel(
            Text(trace.prompt),
            title=f"prompt · {count(trace.prompt):,} tokens",
            title_align="left",
            border_style=STYLE_PROMPT,
        )
    )
    out.print(Text(THINK_START, style=STYLE_DELIMITER))
    total_block = total_memento = 0
    for i, unit in enumerate(trace.units, start=1):
        b, m = count(unit.block), count(unit.memento)
        total_block += b
        total_memento += m
        ratio = f" · memento/block {m / b:.2f}" if b else ""
        out.print(Rule(Text(f"unit {i} · block {b:,} tokens · memento {m:,} tokens{ratio}"), align="left"))
        out.print(_delimited(BLOCK_START, unit.block, BLOCK_END, STYLE_BLOCK))
        out.print(_delimited(SUMMARY_START, unit.memento, SUMMARY_END, STYLE_MEMENTO))
    out.print(Rule(style="dim"))
    out.print(Text(THINK_END, style=STYLE_DELIMITER))
    answer = trace.final_answer
    out.print(Rule(Text(f"answer · {count(answer):,} tokens"), align="left"))
    out.print(Text(answer, style=STYLE_ANSWER) if answer else Text("(no answer)", style="dim"))
    compression = f"{total_block / total_memento:.2f}×" if total_memento else "-"
    out.print(Rule(style="dim"))
    out.print(
        f"{len(trace.units)} units · {total_block:,} block tokens → {total_memento:,} memento tokens "
        f"(compression {compression}) · tokenizer: {tokenizer_label(tok)}",
        soft_wrap=True,
    )


def _draw_mask(
    trace: MementoTrace[str],
    tok: TextTokenizer,
    config: MaskConfig,
    path: Path,
    *,
    title_head: str,
    max_tokens: int,
    with_prompt: bool,
    out: Console,
) -> None:
    specials = tok.specials
    special_ids = set(specials.by_kind().values())
    prompt_ids = tok.encode(trace.prompt) if with_prompt and trace.prompt else []
    if any(t in special_ids for t in prompt_ids):
        out.print(
            Text("note: the prompt quotes special tokens; it is left out of the mask", style="yellow"),
            soft_wrap=True,
        )
        prompt_ids = []
    ids = prompt_ids + tok.encode(render_response(trace))
    try:
        vis = compute_visibility(ids, specials, config)
    except MementoFormatError as exc:
        fail(f"the tokenised trace is not well-formed under {tok.name}: {exc}", code=1)
    roles = viz.row_roles(vis, viz.token_roles(ids, specials, vis.units))
    summary = viz.mask_summary(vis)
    rows = summary["rows"]
    shown = min(rows, max_tokens)
    counts = f"{summary['tokens']:,} tokens"
    if config.restart:
        counts += f" ({rows:,} rows in the restart layout)"
    title = (
        f"{title_head} · {config.describe()}\n"
        f"{counts} · visible {summary['visible_fraction']:.1%} of causal cells · "
        f"peak live KV {summary['peak_live_kv']:,} vs {summary['vanilla_peak_kv']:,} vanilla "
        f"({summary['peak_ratio']:.2f}×)"
    )
    note = None
    if shown < rows:
        note = f"truncated: the first {shown:,} of {rows:,} rows and columns shown (--max-tokens); counts are over all"
    if not prompt_ids:
        note = (note + "; " if note else "") + "prompt not included"
    row_label = "query (token attending)"
    if config.restart:
        row_label = "query row (restart: expanded layout, recomputed memento rows inserted)"
    viz.draw_mask_png(
        vis,
        roles,
        path,
        title,
        max_tokens=max_tokens,
        ticks=viz.unit_ticks(vis, ids, specials),
        note=note,
        row_label=row_label,
    )
    out.print(
        f"wrote {path}: {counts}, {shown:,} shown · visible {summary['visible_fraction']:.1%} · peak live KV "
        f"{summary['peak_live_kv']:,} vs {summary['vanilla_peak_kv']:,} vanilla ({summary['peak_ratio']:.2f}×)",
        soft_wrap=True,
        highlight=False,
    )


@app.command("inspect")
@mask_options()
def inspect_command(
    file: FileArg,
    record: Annotated[
        int,
        typer.Option(
            "--record",
            "-r",
            help="Which record: the JSONL line number (from 1) or the Parquet/HF row index (from 0), "
            "as `validate` labels them.",
            show_default=False,
        ),
    ],
    tokenizer: TokenizerOpt = None,
    mask_png: Annotated[
        Path | None, typer.Option("--mask-png", help="Draw the attention mask to this PNG.", metavar="PATH")
    ] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="Draw at most this many rows/columns of the mask.")
    ] = 512,
    with_prompt: Annotated[
        bool, typer.Option("--prompt/--no-prompt", help="Include the problem's tokens in the mask.")
    ] = True,
    split: SplitOpt = None,
    **mask_knobs: int | bool,
) -> None:
    """Show one trace of FILE in colour; with --mask-png, draw who sees what.

    Blocks are blue, mementos green, delimiters magenta and the answer yellow, each unit with its
    token counts. A malformed record prints its defect and exits 1.
    """
    config = None
    if mask_png is not None:
        config = mask_config(MaskConfig(), mask_knobs, code=2)
        if not mask_png.parent.is_dir():
            fail(f"cannot write {mask_png}: no directory {mask_png.parent}")
    source = open_source(file, split)
    tok = text_tokenizer(tokenizer)
    out = Console(highlight=False)
    try:
        raw = source.get(record)
    except RecordSourceError as exc:
        fail(str(exc))
    where = source.describe(record)
    try:
        trace = to_trace(record, raw)
    except MementoFormatError as error:
        out.print(Text(f"✗ {error_line(source, error)}", style="bold red"), soft_wrap=True)
        if isinstance(raw, dict):
            context = _defect_context(raw, error)
            if context is not None:
                out.print(context, soft_wrap=True)
        raise typer.Exit(1) from None
    assert isinstance(raw, dict)
    meta = {
        "schema": schema_of(raw),
        "domain": raw.get("domain"),
        "source": raw.get("source"),
        "difficulty": raw.get("difficulty"),
    }
    _print_trace(out, trace, tok, f"{file.name} · {where}", meta)
    if config is not None and mask_png is not None:
        _draw_mask(
            trace,
            tok,
            config,
            mask_png,
            title_head=f"{file.name} {where}",
            max_tokens=max_tokens,
            with_prompt=with_prompt,
            out=out,
        )
