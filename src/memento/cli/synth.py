"""``memento synth TASK --out FILE``: synthetic memento traces (memento.synth), one split per run,
written as JSONL or Parquet in either record schema, with a one-line summary of their shape."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from memento.cli.common import fail, parse_knobs
from memento.records_io import JSONL_SUFFIXES, PARQUET_SUFFIXES
from memento.synth import generate, summarize, write_split

app = typer.Typer()


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
    if schema not in ("default", "full"):
        fail(f"--schema must be 'default' or 'full', not {schema!r}")
    if not out.name.lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
        fail(f"cannot tell the format of {out} from its name: use .jsonl or .parquet")
    knobs = parse_knobs(knob or [])
    try:
        problems = generate(task, split, n, seed=seed, **knobs)
    except ValueError as exc:
        fail(str(exc))
    try:
        count = write_split(out, problems, schema=schema)
    except OSError as exc:
        fail(f"cannot write {out}: {exc}")
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
