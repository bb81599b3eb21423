"""The ``memento`` command line: check memento data and look inside single traces.

``memento validate FILE`` reads every record of a JSONL file, Parquet file or HF dataset directory,
reports each malformed one by its line (JSONL) or row (Parquet, HF) with the position and reason,
and prints statistics (blocks per trace, tokens per block and memento, compression).

``memento inspect FILE --record N`` shows one trace in colour and can draw its attention mask
(who sees what under a given knob setting) to a PNG.

Exit codes: 0 all good, 1 malformed data, 2 usage errors (missing file, unknown format, bad option).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.panel import Panel
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

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
    trace_from_record,
)
from memento.masking import CHAT_MEMENTO, MaskConfig
from memento.records_io import RecordReadError, RecordSource, RecordSourceError, open_records, read_records
from memento.stats import StatsAccumulator, is_approximate, stats_rows
from memento.tokens import TextTokenizer, load_tokenizer

app = typer.Typer(
    name="memento",
    help="MEMENTO: teach language models to manage their own context. Check and inspect memento traces.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

PROGRESS_MIN_RECORDS = 2000
"""Below this many records no progress bar is shown (and only ever on a terminal's stderr)."""

STYLE_DELIMITER = "magenta"
STYLE_BLOCK = "blue"
STYLE_MEMENTO = "bold green"
STYLE_ANSWER = "yellow"
STYLE_PROMPT = "cyan"

FULL_SCHEMA_FIELDS = ("sentences", "blocks", "block_summaries")


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def _fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    Console(stderr=True, highlight=False).print(Text(f"error: {message}", style="bold red"), soft_wrap=True)
    raise typer.Exit(code)


def _open(file: Path, split: str | None) -> RecordSource:
    try:
        return open_records(file, split=split)
    except RecordSourceError as exc:
        _fail(str(exc))


def _tokenizer(path: Path | None) -> TextTokenizer:
    try:
        return load_tokenizer(path)
    except Exception as exc:  # transformers raises many kinds for an unusable directory
        _fail(f"cannot load the tokenizer at {path}: {exc}")


def _tokenizer_label(tok: TextTokenizer) -> str:
    if is_approximate(tok):
        return tok.name if "approximate" in tok.name else f"{tok.name} (approximate)"
    return tok.name


def _to_trace(label: int, record: dict[str, Any] | RecordReadError) -> MementoTrace[str]:
    """The trace of a record; every defect becomes a :class:`MementoFormatError` with the label."""
    if isinstance(record, RecordReadError):
        raise record
    try:
        return trace_from_record(record)
    except MementoFormatError as exc:
        raise exc.for_record(label) from None
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # e.g. blocks: [["a"]]
        raise MementoFormatError(f"malformed record: {type(exc).__name__}: {exc}", record=label) from None


def _schema_of(record: dict[str, Any]) -> str:
    return "full" if any(record.get(name) is not None for name in FULL_SCHEMA_FIELDS) else "default"


def _error_line(source: RecordSource, error: MementoFormatError) -> str:
    """``line 12: position 345: reason`` (or ``row 3: reason`` without a position)."""
    parts = []
    if error.record is not None:
        parts.append(source.describe(int(error.record)))
    if error.position is not None:
        parts.append(f"position {error.position}")
    parts.append(error.reason)
    return ": ".join(parts)


def _error_json(source: RecordSource, error: MementoFormatError) -> dict[str, Any]:
    return {
        "label": error.record,
        "where": source.describe(int(error.record)) if error.record is not None else None,
        "position": error.position,
        "reason": error.reason,
    }


def _stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


@contextmanager
def _progress(source: RecordSource, console: Console, enabled: bool) -> Iterator[Callable[[], None]]:
    """A callback advancing a transient progress bar on stderr, or a no-op when not wanted."""
    total = source.count() if enabled else 0
    if not enabled or total < PROGRESS_MIN_RECORDS:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("validating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("validate", total=total)
        yield lambda: progress.advance(task)


# ----------------------------------------------------------------------------------------------
# validate
# ----------------------------------------------------------------------------------------------


@app.callback()
def _root() -> None:
    """MEMENTO: teach language models to manage their own context. Check and inspect memento traces."""


FileArg = Annotated[
    Path,
    typer.Argument(
        help="Records: a .jsonl/.ndjson/.json(.gz) file, a .parquet file, or an HF dataset directory "
        "(datasets save_to_disk).",
        show_default=False,
    ),
]
TokenizerOpt = Annotated[
    Path | None,
    typer.Option(
        "--tokenizer",
        help="An HF tokenizer directory with the memento tokens; default: the offline regex stand-in "
        "(approximate counts).",
        metavar="DIR",
    ),
]
SplitOpt = Annotated[
    str | None,
    typer.Option("--split", help="Split of an HF DatasetDict directory; default: 'train' or the only split."),
]

# The memento mask: masking.MaskConfig's knobs, declared once for every command that takes them.
MASK_PANEL = "Memento mask"
KeepLastNOpt = Annotated[
    int,
    typer.Option(
        "--keep-last-n",
        help="-1 vanilla (nothing evicted), 0 memento, N keep the N newest finished blocks.",
        rich_help_panel=MASK_PANEL,
    ),
]
MaskDelimitersOpt = Annotated[
    bool,
    typer.Option(
        "--mask-delimiters/--no-mask-delimiters",
        help="Also hide an evicted block's <|block_start|> and <|block_end|> (Phi-4 style).",
        rich_help_panel=MASK_PANEL,
    ),
]
KeepLastBlockOpt = Annotated[
    bool,
    typer.Option(
        "--keep-last-block-for-answer",
        help="Keep the newest finished block visible until the next one starts.",
        rich_help_panel=MASK_PANEL,
    ),
]
RestartOpt = Annotated[
    bool,
    typer.Option(
        "--restart",
        help="Restart ablation: an evicted block's memento is recomputed without it (keep-last-n 0 only).",
        rich_help_panel=MASK_PANEL,
    ),
]


def _mask(base: MaskConfig, code: int = 1, **knobs: Any) -> MaskConfig:
    """``base`` with the mask options given on the command line, or exit ``code`` saying what is wrong."""
    try:
        return dataclasses.replace(base, **knobs)
    except ValueError as exc:
        _fail(str(exc), code=code)


@app.command()
def validate(
    file: FileArg,
    tokenizer: TokenizerOpt = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (stats and errors) on stdout, nothing else.")
    ] = False,
    max_errors: Annotated[
        int,
        typer.Option(
            "--max-errors", min=0, help="Report at most N errors (0: all). Every record is checked regardless."
        ),
    ] = 50,
    split: SplitOpt = None,
) -> None:
    """Check every record of FILE against the memento format and print statistics.

    Each malformed record is reported as `line 12: position 345: reason` (JSONL lines count from 1,
    Parquet/HF rows from 0; positions are character offsets into the response). Both the default
    schema and the full schema (sentences, blocks, block_summaries cross-checked against the
    response) are accepted. Exits 1 if any record is malformed or the file has none.
    """
    source = _open(file, split)
    tok = _tokenizer(tokenizer)
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    acc = StatsAccumulator(tok)
    schemas = {"default": 0, "full": 0}
    shown: list[MementoFormatError] = []
    n_errors = 0
    total = 0
    try:
        with _progress(source, err, enabled=_stderr_is_terminal()) as advance:
            for label, record in source:
                total += 1
                advance()
                try:
                    trace = _to_trace(label, record)
                except MementoFormatError as error:
                    n_errors += 1
                    if max_errors == 0 or n_errors <= max_errors:
                        shown.append(error)
                        if not json_output:
                            out.print(Text(_error_line(source, error), style="red"), soft_wrap=True)
                    continue
                acc.add(trace)
                assert isinstance(record, dict)
                schemas[_schema_of(record)] += 1
    except RecordSourceError as exc:
        _fail(str(exc))

    stats = acc.result()
    stats["schema"] = schemas
    ok = n_errors == 0 and total > 0
    if json_output:
        payload = {
            "file": str(file),
            "format": source.format,
            "ok": ok,
            "records": total,
            "valid": total - n_errors,
            "invalid": n_errors,
            "stats": stats,
            "errors": [_error_json(source, e) for e in shown],
            "errors_truncated": len(shown) < n_errors,
        }
        typer.echo(json.dumps(payload, ensure_ascii=False))
        raise typer.Exit(0 if ok else 1)

    if total == 0:
        out.print(Text(f"✗ no records in {file}", style="bold red"), soft_wrap=True)
        raise typer.Exit(1)
    if n_errors:
        if len(shown) < n_errors:
            out.print(f"… and {n_errors - len(shown):,} more (--max-errors 0 shows all)", soft_wrap=True)
        out.print(
            Text(f"✗ {n_errors:,} of {total:,} records are malformed", style="bold red"),
            soft_wrap=True,
        )
    else:
        out.print(Text(f"✓ all {total:,} records are well-formed", style="bold green"), soft_wrap=True)
    if stats["records"]:
        what = "all records" if not n_errors else f"the {stats['records']:,} well-formed records"
        schema_note = ", ".join(f"{n:,} {name}" for name, n in schemas.items() if n)
        table = Table(title=f"Statistics of {what} ({schema_note} schema)", title_justify="left")
        table.add_column("quantity", style="bold")
        table.add_column("value")
        for name, value in stats_rows(stats):
            if name == "tokenizer":
                value = _tokenizer_label(tok)
            table.add_row(name, value)
        out.print(table)
    raise typer.Exit(1 if n_errors else 0)


# ----------------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------------


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


def _delim(token: str) -> Text:
    return Text(token, style=STYLE_DELIMITER)


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
    out.print(_delim(THINK_START))
    total_block = total_memento = 0
    for i, unit in enumerate(trace.units, start=1):
        b, m = count(unit.block), count(unit.memento)
        total_block += b
        total_memento += m
        ratio = f" · memento/block {m / b:.2f}" if b else ""
        out.print(Rule(Text(f"unit {i} · block {b:,} tokens · memento {m:,} tokens{ratio}"), align="left"))
        block = Text()
        block.append(BLOCK_START, style=STYLE_DELIMITER)
        block.append(unit.block, style=STYLE_BLOCK)
        block.append(BLOCK_END, style=STYLE_DELIMITER)
        out.print(block)
        memento = Text()
        memento.append(SUMMARY_START, style=STYLE_DELIMITER)
        memento.append(unit.memento, style=STYLE_MEMENTO)
        memento.append(SUMMARY_END, style=STYLE_DELIMITER)
        out.print(memento)
    out.print(Rule(style="dim"))
    out.print(_delim(THINK_END))
    answer = trace.final_answer
    out.print(Rule(Text(f"answer · {count(answer):,} tokens"), align="left"))
    out.print(Text(answer, style=STYLE_ANSWER) if answer else Text("(no answer)", style="dim"))
    compression = f"{total_block / total_memento:.2f}×" if total_memento else "-"
    out.print(Rule(style="dim"))
    out.print(
        f"{len(trace.units)} units · {total_block:,} block tokens → {total_memento:,} memento tokens "
        f"(compression {compression}) · tokenizer: {_tokenizer_label(tok)}",
        soft_wrap=True,
    )


def _draw_mask(
    trace: MementoTrace[str],
    tok: TextTokenizer,
    config: Any,
    path: Path,
    *,
    title_head: str,
    max_tokens: int,
    with_prompt: bool,
    out: Console,
) -> None:
    from memento import viz
    from memento.masking import compute_visibility

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
        _fail(f"the tokenised trace is not well-formed under {tok.name}: {exc}", code=1)
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
    keep_last_n: KeepLastNOpt = 0,
    mask_delimiters: MaskDelimitersOpt = False,
    keep_last_block_for_answer: KeepLastBlockOpt = False,
    restart: RestartOpt = False,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="Draw at most this many rows/columns of the mask.")
    ] = 512,
    with_prompt: Annotated[
        bool, typer.Option("--prompt/--no-prompt", help="Include the problem's tokens in the mask.")
    ] = True,
    split: SplitOpt = None,
) -> None:
    """Show one trace of FILE in colour; with --mask-png, draw who sees what.

    Blocks are blue, mementos green, delimiters magenta and the answer yellow, each unit with its
    token counts. A malformed record prints its defect and exits 1.
    """
    config = None
    if mask_png is not None:
        config = _mask(
            MaskConfig(),
            code=2,
            keep_last_n=keep_last_n,
            mask_delimiters=mask_delimiters,
            keep_last_block_for_answer=keep_last_block_for_answer,
            restart=restart,
        )
        if not mask_png.parent.is_dir():
            _fail(f"cannot write {mask_png}: no directory {mask_png.parent}")
    source = _open(file, split)
    tok = _tokenizer(tokenizer)
    out = Console(highlight=False)
    try:
        raw = source.get(record)
    except RecordSourceError as exc:
        _fail(str(exc))
    where = source.describe(record)
    try:
        trace = _to_trace(record, raw)
    except MementoFormatError as error:
        out.print(Text(f"✗ {_error_line(source, error)}", style="bold red"), soft_wrap=True)
        if isinstance(raw, dict):
            context = _defect_context(raw, error)
            if context is not None:
                out.print(context, soft_wrap=True)
        raise typer.Exit(1) from None
    assert isinstance(raw, dict)
    meta = {
        "schema": _schema_of(raw),
        "domain": raw.get("domain"),
        "source": raw.get("source"),
        "difficulty": raw.get("difficulty"),
    }
    _print_trace(out, trace, tok, f"{file.name} · {where}", meta)
    if mask_png is not None:
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


# ----------------------------------------------------------------------------------------------
# synth
# ----------------------------------------------------------------------------------------------


def _parse_knobs(pairs: list[str]) -> dict[str, int | float]:
    knobs: dict[str, int | float] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            _fail(f"--knob takes KEY=VALUE, got {pair!r}")
        try:
            knobs[key] = int(value)
        except ValueError:
            try:
                knobs[key] = float(value)
            except ValueError:
                _fail(f"--knob {key}: {value!r} is not a number")
    return knobs


@app.command("synth")
def synth_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file: .jsonl(.gz) or .parquet.", show_default=False)],
    task: Annotated[
        str,
        typer.Argument(help="Task family: stream_sum (default), running_sum (the paper's toy task) or pointer_walk."),
    ] = "running_sum",
    split: Annotated[str, typer.Option("--split", help="train, validation or test (never overlapping).")] = "train",
    n: Annotated[int, typer.Option("--n", min=0, help="How many problems.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same problems).")] = 0,
    schema: Annotated[str, typer.Option("--schema", help="Record schema: default or full.")] = "default",
    knob: Annotated[
        list[str] | None,
        typer.Option("--knob", "-k", help="A difficulty knob, e.g. max_blocks=10 (repeatable).", metavar="KEY=VALUE"),
    ] = None,
) -> None:
    """Generate synthetic memento traces of TASK and write one split of them to --out.

    Every block's memento carries exactly the state later blocks need. Splits are assigned by a
    stable hash of each problem, so train, validation and test never share a problem, whatever the
    seed. Prints the count, median blocks, block/memento token ratio and chat length (tokens of the
    character-level tiny tokenizer: one per character, one per special token).
    """
    from memento.records_io import JSONL_SUFFIXES, PARQUET_SUFFIXES
    from memento.synth import generate, summarize, write_split

    if schema not in ("default", "full"):
        _fail(f"--schema must be 'default' or 'full', not {schema!r}")
    if not out.name.lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
        _fail(f"cannot tell the format of {out} from its name: use .jsonl or .parquet")
    knobs = _parse_knobs(knob or [])
    try:
        problems = generate(task, split, n, seed=seed, **knobs)
    except ValueError as exc:
        _fail(str(exc))
    try:
        count = write_split(out, problems, schema=schema)
    except OSError as exc:
        _fail(f"cannot write {out}: {exc}")
    stats = summarize(problems)
    console = Console(highlight=False)
    console.print(
        Text(f"✓ wrote {count:,} {task} {split} problems to {out} (seed {seed}, {schema} schema)", style="bold green"),
        soft_wrap=True,
    )
    if count:
        console.print(
            f"blocks per trace: median {stats['median_blocks']:g} (min {stats['min_blocks']}, "
            f"max {stats['max_blocks']}) · block/memento tokens: median {stats['median_ratio']:.2f} "
            f"(lowest unit {stats['min_unit_ratio']:.2f}) · tokens per chat: median {stats['median_chat_tokens']:g} "
            f"(max {stats['max_chat_tokens']}; control {stats['median_control_chat_tokens']:g}; "
            f"{stats['median_chat_chars']:g} characters)",
            soft_wrap=True,
        )


@app.command("train")
def train_command(
    train_file: Annotated[Path, typer.Option("--train", help="Training records (JSONL, Parquet or HF dataset dir).")],
    eval_file: Annotated[Path, typer.Option("--eval", help="Validation records: picks each stage's best model.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory: stage1/ and stage2/ go here.")],
    stage: Annotated[str, typer.Option("--stage", help="1 (full attention), 2 (memento mask) or both.")] = "both",
    model: Annotated[
        Path | None, typer.Option("--model", help="A local HF checkpoint to start from (stage 2 alone: stage 1's).")
    ] = None,
    tiny: Annotated[
        str | None, typer.Option("--tiny", help="Build a tiny model from scratch instead: qwen3, llama or qwen2.")
    ] = None,
    tiny_hidden: Annotated[int, typer.Option("--tiny-hidden", help="Tiny model hidden size.")] = 128,
    tiny_layers: Annotated[int, typer.Option("--tiny-layers", help="Tiny model layers.")] = 4,
    response_field: Annotated[
        str, typer.Option("--response-field", help="Record field with the completion (control: control_response).")
    ] = "response",
    epochs: Annotated[float, typer.Option("--epochs", help="Epochs per stage.")] = 5.0,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Steps per stage (overrides --epochs if > 0).")] = -1,
    learning_rate: Annotated[float, typer.Option("--lr", help="Peak learning rate (cosine, 5% warm-up).")] = 8e-5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per step and device.")] = 16,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Gradient accumulation steps.")] = 1,
    eval_steps: Annotated[int, typer.Option("--eval-steps", help="Evaluate and checkpoint every N steps.")] = 50,
    keep_last_n: KeepLastNOpt = 0,
    mask_delimiters: MaskDelimitersOpt = False,
    keep_last_block_for_answer: KeepLastBlockOpt = False,
    max_length: Annotated[int | None, typer.Option("--max-length", help="Refuse longer examples.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Training seed.")] = 42,
) -> None:
    """Two-stage memento SFT: stage 1 with full causal attention, stage 2 with the memento mask
    (the mask options set stage 2's).

    Stage 2 starts from stage 1's best checkpoint by validation loss. Each stage writes HF
    checkpoints under OUTPUT/stageN, resumes from the newest one when rerun after an interruption,
    logs losses to OUTPUT/stageN/log.jsonl, and saves its best model (with the tokenizer) to
    OUTPUT/stageN/best. Every example is checked against the memento grammar before training.
    """
    from memento.format import MementoFormatError
    from memento.train.pipeline import TrainPlan, run_training
    from memento.train.sft import SFTSettings

    settings = SFTSettings(
        learning_rate=learning_rate,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        eval_steps=eval_steps,
        mask=_mask(
            CHAT_MEMENTO,
            keep_last_n=keep_last_n,
            mask_delimiters=mask_delimiters,
            keep_last_block_for_answer=keep_last_block_for_answer,
        ),
        max_length=max_length,
        seed=seed,
    )
    for path in (train_file, eval_file, model):
        if path is not None and not path.exists():
            _fail(f"no such file or directory: {path}")
    try:
        plan = TrainPlan(
            train_file=train_file,
            eval_file=eval_file,
            output_dir=output,
            stage=stage,
            response_field=response_field,
            model_path=model,
            tiny_arch=tiny,
            tiny_options={"hidden_size": tiny_hidden, "num_hidden_layers": tiny_layers, "seed": seed},
            stage1=settings,
            stage2=settings,
        )
    except ValueError as exc:
        _fail(str(exc))
    console = Console(highlight=False)
    try:
        best = run_training(plan, log=lambda line: console.print(line, soft_wrap=True))
    except (MementoFormatError, ValueError, KeyError) as exc:
        _fail(str(exc), code=1)
    for name, path in best.items():
        console.print(Text(f"✓ {name}: {path}", style="bold green"), soft_wrap=True)


@app.command("generate")
def generate_command(
    model: Annotated[Path, typer.Argument(help="A local HF checkpoint directory (model + tokenizer).")],
    prompts_file: Annotated[
        Path | None,
        typer.Option("--prompts", help="Records with a 'problem' (or 'prompt') field: JSONL, Parquet or HF dataset."),
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="A prompt (repeatable).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write one JSON line per sample here.")] = None,
    chat: Annotated[bool, typer.Option("--chat/--raw", help="Wrap each prompt in the chat template.")] = True,
    kv_budget_tokens: Annotated[int, typer.Option("--kv-budget-tokens", min=1, help="KV pool size in tokens.")] = 32768,
    max_num_seqs: Annotated[int, typer.Option("--max-num-seqs", min=1, help="Most sequences running at once.")] = 64,
    keep_last_n: KeepLastNOpt = 0,
    mask_delimiters: MaskDelimitersOpt = False,
    keep_last_block_for_answer: KeepLastBlockOpt = False,
    restart: RestartOpt = False,
    max_block_tokens: Annotated[
        int | None, typer.Option("--max-block-tokens", min=1, help="Force <|block_end|> after this many tokens.")
    ] = None,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="-1: off.")] = -1,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1)] = 1024,
    n: Annotated[int, typer.Option("--n", min=1, help="Samples per prompt.")] = 1,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="auto, float32 or bfloat16.")] = "auto",
) -> None:
    """Generate with the memento engine: blocks are evicted from the KV pool as their mementos close.

    Prints each completion (or writes JSON lines with the text, tokens, finish reason and KV
    accounting) and a summary: tokens/s, peak and AUC of the pool, evictions, preemptions.
    """
    import time

    from memento.chat import chat_prompt
    from memento.engine import LLM, SamplingParams

    texts = list(prompt or [])
    if prompts_file is not None:
        if not prompts_file.exists():
            _fail(f"no such file or directory: {prompts_file}")
        for label, record in read_records(prompts_file):
            if isinstance(record, RecordReadError):
                _fail(f"{prompts_file}: {record}", code=1)
            text = record.get("problem", record.get("prompt"))
            if not isinstance(text, str):
                _fail(f"{prompts_file} record {label}: no 'problem' or 'prompt' text field", code=1)
            texts.append(text)
    if not texts:
        _fail("give --prompt or --prompts")
    mask = _mask(
        CHAT_MEMENTO,
        keep_last_n=keep_last_n,
        mask_delimiters=mask_delimiters,
        keep_last_block_for_answer=keep_last_block_for_answer,
        restart=restart,
    )
    if not model.exists():
        _fail(f"no such file or directory: {model}")
    try:
        params = SamplingParams(
            n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed
        )
        llm = LLM(
            model,
            dtype=dtype,
            kv_budget_tokens=kv_budget_tokens,
            max_num_seqs=max_num_seqs,
            mask=mask,
            max_block_tokens=max_block_tokens,
        )
        tokenizer = llm.engine.tokenizer
        inputs = [chat_prompt(tokenizer, t) if chat else t for t in texts]
        start = time.perf_counter()
        results = llm.generate(inputs, params)
    except ValueError as exc:
        _fail(str(exc), code=1)
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


@app.command("eval")
def eval_command(
    model: Annotated[Path, typer.Argument(help="A local HF checkpoint directory (model + tokenizer).")],
    task: Annotated[
        str, typer.Option("--task", help="synth:TASK, or a JSONL / Parquet file or HF dataset directory.")
    ] = "synth:stream_sum",
    out: Annotated[Path, typer.Option("--out", "-o", help="Where report.md, results.json and plots go.")] = Path(
        "runs/eval"
    ),
    modes: Annotated[
        str, typer.Option("--modes", help="Comma-separated: memento, vanilla, restart, keep-N.")
    ] = "memento,vanilla,restart",
    problems: Annotated[
        int | None, typer.Option("--problems", "-n", min=1, help="Problems (default: synth 200, files all).")
    ] = None,
    samples: Annotated[int, typer.Option("--samples", "-k", min=1, help="Samples per problem.")] = 1,
    ks: Annotated[str, typer.Option("--ks", help="Comma-separated k for pass@k / maj@k (default: samples).")] = "",
    grader: Annotated[str | None, typer.Option("--grader", help="exact, choice or math (default: by task).")] = None,
    grader_timeout: Annotated[float, typer.Option("--grader-timeout", min=0.1, help="Seconds per answer.")] = 5.0,
    problem_field: Annotated[str | None, typer.Option("--problem-field")] = None,
    answer_field: Annotated[str | None, typer.Option("--answer-field")] = None,
    knob: Annotated[list[str] | None, typer.Option("--knob", help="A synthetic task knob NAME=VALUE.")] = None,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="-1: off.")] = -1,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1)] = 1024,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    kv_budget_tokens: Annotated[
        int | None, typer.Option("--kv-budget-tokens", min=1, help="KV pool in tokens, the same for every mode.")
    ] = None,
    max_num_seqs: Annotated[int, typer.Option("--max-num-seqs", min=1)] = 64,
    max_block_tokens: Annotated[int | None, typer.Option("--max-block-tokens", min=1)] = None,
    kv_model: Annotated[
        list[str] | None, typer.Option("--kv-model", help="Real sizes to report KV for: qwen3-8b, qwen3-32b, ...")
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or bfloat16.")] = "float32",
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Evaluate a model under several KV modes: accuracy (pass@k, maj@k), peak/AUC KV, throughput.

    Every mode runs the same problems with the same sampling settings and seeds. Writes
    OUT/results.json (every sample), OUT/report.md and PNG plots (the KV sawtooth, accuracy vs peak
    KV, block and memento lengths).
    """
    from memento.eval.kvsim import PRESETS
    from memento.eval.report import runs_table, write_report
    from memento.eval.run import EvalSettings, Mode, evaluate_model, load_model
    from memento.eval.tasks import load_task_set

    if not model.exists():
        _fail(f"no such file or directory: {model}")
    try:
        mode_list = [Mode.parse(m) for m in modes.split(",") if m.strip()]
        if not mode_list:
            _fail("give at least one mode")
        kv_models = [m.lower() for m in (kv_model or ["qwen3-8b"])]
        unknown = [m for m in kv_models if m not in PRESETS]
        if unknown:
            _fail(f"unknown --kv-model {', '.join(unknown)}: one of {', '.join(PRESETS)}")
        settings = EvalSettings(
            samples=samples,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_tokens=max_tokens,
            seed=seed,
            kv_budget_tokens=kv_budget_tokens,
            max_num_seqs=max_num_seqs,
            max_block_tokens=max_block_tokens,
            grader_timeout=grader_timeout,
            ks=tuple(int(k) for k in ks.split(",") if k.strip()),
        )
        task_set = load_task_set(
            task,
            problems,
            grader=grader,
            knobs=_parse_knobs(knob or []),
            problem_field=problem_field,
            answer_field=answer_field,
        )
        loaded, tokenizer = load_model(str(model), dtype)
        runs = evaluate_model(
            loaded, tokenizer, task_set, mode_list, settings, label=model.name, show_progress=progress
        )
    except ValueError as exc:
        _fail(str(exc), code=1)
    results = {
        "title": f"Evaluation of {model}",
        "task": {"task set": task_set.name, "problems": len(task_set.problems), "grader": task_set.grader},
        "settings": {k: v for k, v in settings.__dict__.items() if k != "curves_kept"},
        "runs": runs,
    }
    report = write_report(results, out, kv_models)
    Console().print(runs_table(runs))
    Console().print(f"report: {report}")


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where everything goes.")] = Path("runs/demo"),
    quick: Annotated[
        bool, typer.Option("--quick", help="A smoke run of every step (under a minute on 2 cores).")
    ] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete OUT first instead of resuming.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """The end-to-end demo: synthetic data, control and memento models, evaluation, report.

    Trains a tiny Qwen3 on memento traces (stage 1 with full attention, then the same number of
    steps under the memento mask for the memento model and with full attention for the control),
    evaluates control, memento and restart at one KV budget, and writes
    OUT/report.md, OUT/results.json, plots and both checkpoints (OUT/control-model, OUT/memento-model).
    """
    from rich.markup import escape

    from memento.demo import run_demo
    from memento.eval.report import runs_table

    console = Console(highlight=False)
    results = run_demo(out, quick=quick, fresh=fresh, show_progress=progress, log=lambda m: console.print(escape(m)))
    console.print(runs_table(results["runs"], results.get("title")))
    for target in results["targets"]:
        mark = "[green]met[/green]" if target["met"] else "[red]NOT met[/red]"
        console.print(f"{mark}  {escape(target['target'])}: {target['measured']}")
    console.print(f"report: {out / 'report.md'}   models: {out / 'control-model'}, {out / 'memento-model'}")


@app.command("serve")
def serve_command(
    model: Annotated[Path, typer.Argument(help="A local HF checkpoint directory (model + tokenizer).")],
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    served_model_name: Annotated[
        str | None, typer.Option("--served-model-name", help="The name clients ask for (default: the directory).")
    ] = None,
    kv_budget_tokens: Annotated[int, typer.Option("--kv-budget-tokens", min=1, help="KV pool size in tokens.")] = 32768,
    max_num_seqs: Annotated[int, typer.Option("--max-num-seqs", min=1, help="Most sequences running at once.")] = 64,
    keep_last_n: KeepLastNOpt = 0,
    mask_delimiters: MaskDelimitersOpt = False,
    keep_last_block_for_answer: KeepLastBlockOpt = False,
    restart: RestartOpt = False,
    max_block_tokens: Annotated[
        int | None, typer.Option("--max-block-tokens", min=1, help="Force <|block_end|> after this many tokens.")
    ] = None,
    max_pending_requests: Annotated[
        int, typer.Option("--max-pending-requests", min=1, help="Requests in flight before answering 429.")
    ] = 256,
    shutdown_timeout: Annotated[
        float, typer.Option("--shutdown-timeout", min=0, help="Seconds in-flight requests get to finish on shutdown.")
    ] = 30.0,
    dtype: Annotated[str, typer.Option("--dtype", help="auto, float32 or bfloat16.")] = "auto",
    torch_threads: Annotated[
        int,
        typer.Option(
            "--torch-threads",
            min=0,
            help="CPU threads for the model; 0: all cores but one (the HTTP side needs one: BENCHMARKS.md).",
        ),
    ] = 0,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="engine: the embedded engine (this server); vllm: vLLM's own OpenAI server with memento eviction.",
        ),
    ] = "engine",
    block_size: Annotated[
        int, typer.Option("--block-size", min=1, help="vLLM backend: tokens per KV page (CPU: a multiple of 32).")
    ] = 128,
    vllm_args: Annotated[
        list[str] | None,
        typer.Option("--vllm-arg", help="vLLM backend: one more `vllm serve` flag (--vllm-arg=--max-model-len=4096)."),
    ] = None,
) -> None:
    """Serve a model over the OpenAI API (completions, chat, streaming) with in-place KV eviction.

    /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics (Prometheus). Chat
    answers carry the reasoning (blocks and mementos) in reasoning_content and the answer in content;
    usage adds the request's peak KV and evicted tokens. With --backend vllm the same settings run
    inside `vllm serve` (memento.vllm; pip install 'memento[vllm]'), whose routes and metrics are vLLM's.
    """
    if not model.exists():
        _fail(f"no such file or directory: {model}")
    if backend not in ("engine", "vllm"):
        _fail(f"--backend must be engine or vllm, not {backend!r}")
    mask = _mask(
        CHAT_MEMENTO,
        keep_last_n=keep_last_n,
        mask_delimiters=mask_delimiters,
        keep_last_block_for_answer=keep_last_block_for_answer,
        restart=restart,
    )
    if backend == "vllm":
        _serve_with_vllm(
            model,
            host=host,
            port=port,
            served_model_name=served_model_name,
            kv_budget_tokens=kv_budget_tokens,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            dtype=dtype,
            mask=mask,
            max_block_tokens=max_block_tokens,
            extra=vllm_args or [],
        )
        return
    import uvicorn

    from memento.engine import EngineConfig
    from memento.serve.server import build_app

    try:
        config = EngineConfig(
            kv_budget_tokens=kv_budget_tokens,
            max_num_seqs=max_num_seqs,
            mask=mask,
            max_block_tokens=max_block_tokens,
        )
        server_app = build_app(
            model,
            config,
            model_name=served_model_name,
            dtype=dtype,
            max_pending_requests=max_pending_requests,
            shutdown_timeout=shutdown_timeout,
        )
    except ValueError as exc:
        _fail(str(exc), code=1)
    import os

    import torch

    threads = torch_threads or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    Console(stderr=True).print(f"serving {model} on http://{host}:{port}/v1 ({mask.mode}, {threads} torch threads)")
    uvicorn.run(server_app, host=host, port=port, log_level="info", timeout_graceful_shutdown=int(shutdown_timeout))


def _serve_with_vllm(model: Path, *, mask: MaskConfig, max_block_tokens, extra, **options) -> None:
    """Replace this process with `vllm serve` running the memento backend (memento.vllm.serve)."""
    from memento.vllm.config import MementoSettings
    from memento.vllm.serve import check_vllm_available, exec_vllm_serve, vllm_serve_argv

    try:
        settings = MementoSettings(mask=mask, max_block_tokens=max_block_tokens)
        check_vllm_available()
    except (ValueError, RuntimeError) as exc:
        _fail(str(exc), code=1)
    argv = vllm_serve_argv(model, settings, extra=extra, **options)
    Console(stderr=True).print("exec: " + " ".join(argv))
    exec_vllm_serve(argv)


data_app = typer.Typer(
    help="The OpenMementos data pipeline: plain reasoning traces -> memento traces.", no_args_is_help=True
)
app.add_typer(data_app, name="data")


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
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="HF tokenizer for token counts.")] = None,
    lam: Annotated[float, typer.Option("--lam", min=0.0, help="Weight of the block-size CV.")] = 0.5,
    min_block_tokens: Annotated[int, typer.Option("--min-block-tokens", min=0)] = 200,
    min_blocks: Annotated[int, typer.Option("--min-blocks", min=1)] = 1,
    max_blocks: Annotated[int | None, typer.Option("--max-blocks", min=1)] = None,
    threshold: Annotated[int, typer.Option("--threshold", min=0, max=10, help="Judge score to accept.")] = 8,
    max_rounds: Annotated[int, typer.Option("--max-rounds", min=1, help="Compress + judge rounds.")] = 2,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Only the first N records.")] = None,
    split: Annotated[str | None, typer.Option("--split")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Turn plain reasoning traces into memento traces with any OpenAI-compatible LLM. Resumable.

    Writes OUT/default.jsonl and OUT/full.jsonl (the two OpenMementos schemas), OUT/failed.jsonl
    (traces that could not be done, with the reason) and OUT/summary.json. Kill it at any moment and
    run the same command again: finished shards are kept and every LLM answer already received comes
    from the cache.
    """
    import asyncio

    from memento.data.boundaries import BoundarySettings
    from memento.data.llm import LLMConfig
    from memento.data.pipeline import PipelineConfig, SegmentSettings, run_pipeline
    from memento.data.summarize import SummarizeSettings

    if not input_path.exists():
        _fail(f"no such file or directory: {input_path}")

    def llm(url: str, name: str) -> LLMConfig:
        return LLMConfig(
            base_url=url,
            model=name,
            api_key_env=api_key_env,
            max_concurrency=concurrency,
            max_retries=max_retries,
            timeout_s=timeout,
            cache_dir=cache_dir or output / "llm-cache",
        )

    try:
        config = PipelineConfig(
            input=input_path,
            output=output,
            llm=llm(base_url, model),
            judge_llm=llm(judge_base_url or base_url, judge_model) if judge_model else None,
            split=split,
            tokenizer=str(tokenizer) if tokenizer else None,
            shard_size=shard_size,
            traces_in_flight=traces_in_flight,
            limit=limit,
            boundaries=BoundarySettings(),
            segmentation=SegmentSettings(lam, min_block_tokens, min_blocks, max_blocks),
            summarize=SummarizeSettings(threshold=threshold, max_rounds=max_rounds),
        )
        console = Console(stderr=True)
        if progress and _stderr_is_terminal():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

            with Progress(
                "traces", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=console
            ) as bar:
                task = bar.add_task("build", total=None)
                summary = asyncio.run(
                    run_pipeline(config, lambda done, total: bar.update(task, completed=done, total=total))
                )
        else:
            summary = asyncio.run(run_pipeline(config))
    except ValueError as exc:
        _fail(str(exc), code=1)
    llm_stats = summary["llm"]
    Console().print(
        f"{summary['default']} memento traces, {summary['failed']} failed, of {summary['records']} records "
        f"({summary['resumed_shards']} of {summary['shards']} shards were already done); LLM: "
        f"{llm_stats['requests']} requests, {llm_stats['cache_hits']} from the cache, {llm_stats['retries']} retries, "
        f"{llm_stats['prompt_tokens'] + llm_stats['completion_tokens']} tokens -> {output}",
        soft_wrap=True,
    )


@data_app.command("stats")
def data_stats_command(
    file: Annotated[Path, typer.Argument(help="Memento traces (JSONL, Parquet or HF dataset).")],
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="HF tokenizer for token counts.")] = None,
    plots: Annotated[Path | None, typer.Option("--plots", help="Directory for the histograms (PNG).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the statistics as JSON.")] = False,
) -> None:
    """Dataset statistics and the paper-style histograms: blocks per trace, tokens per block and
    memento, compression ratio."""
    if not file.exists():
        _fail(f"no such file or directory: {file}")
    tok = _tokenizer(tokenizer)
    acc = StatsAccumulator(tok)
    bad = 0
    for label, record in read_records(file):
        try:
            acc.add(_to_trace(label, record))
        except MementoFormatError:
            bad += 1
    result = acc.result()
    result["malformed"] = bad
    if plots is not None:
        from memento.data.plots import draw_histograms

        result["plots"] = [str(p) for p in draw_histograms(acc, plots)]
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"{file} ({_tokenizer_label(tok)})")
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


def main() -> None:
    """Entry point of the ``memento`` console script."""
    app(prog_name="memento")


if __name__ == "__main__":
    main()
