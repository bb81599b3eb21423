"""``memento validate FILE``: check every record of a JSONL file, Parquet file or HF dataset directory.

Each malformed record is reported by its line (JSONL) or row (Parquet, HF) with the position and
reason, followed by statistics (blocks per trace, tokens per block and memento, compression), or one
JSON object with ``--json``. No torch: this is the command that checks data before anything heavy.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from memento.cli.common import (
    FileArg,
    SplitOpt,
    TokenizerOpt,
    error_line,
    fail,
    open_source,
    progress_bar,
    read_traces,
    schema_of,
    stderr_is_terminal,
    text_tokenizer,
    tokenizer_label,
)
from memento.format import MementoFormatError
from memento.records_io import RecordSource, RecordSourceError
from memento.stats import StatsAccumulator, stats_rows

PROGRESS_MIN_RECORDS = 2000
"""Below this many records no progress bar is shown (and only ever on a terminal's stderr)."""

app = typer.Typer()


def _error_json(source: RecordSource, error: MementoFormatError) -> dict[str, Any]:
    return {
        "label": error.record,
        "where": source.describe(int(error.record)) if error.record is not None else None,
        "position": error.position,
        "reason": error.reason,
    }


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
    source = open_source(file, split)
    tok = text_tokenizer(tokenizer)
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    acc = StatsAccumulator(tok)
    schemas = {"default": 0, "full": 0}
    shown: list[MementoFormatError] = []
    n_errors = 0
    total = 0
    try:
        expected = source.count() if stderr_is_terminal() else 0
        with progress_bar(
            "validating", err, enabled=expected >= PROGRESS_MIN_RECORDS, total=expected, transient=True
        ) as show:
            for record, outcome in read_traces(source):
                total += 1
                show(total)
                if isinstance(outcome, MementoFormatError):
                    n_errors += 1
                    if max_errors == 0 or n_errors <= max_errors:
                        shown.append(outcome)
                        if not json_output:
                            out.print(Text(error_line(source, outcome), style="red"), soft_wrap=True)
                    continue
                acc.add(outcome)
                assert isinstance(record, dict)
                schemas[schema_of(record)] += 1
    except RecordSourceError as exc:
        fail(str(exc))

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
                value = tokenizer_label(tok)
            table.add_row(name, value)
        out.print(table)
    raise typer.Exit(1 if n_errors else 0)
