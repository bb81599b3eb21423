"""What the command modules share: the error exit, opening records and tokenizers, records as traces,
progress bars, the options several commands take, each declared once here, and the settings objects
built from a command's options (:func:`settings_from`, :func:`mask_config`).

Nothing here imports torch (memento.masking does): ``memento validate`` uses this module too.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from memento.format import MementoFormatError, MementoTrace, trace_from_record
from memento.records_io import RecordReadError, RecordSource, RecordSourceError, open_records
from memento.stats import is_approximate
from memento.tokens import TextTokenizer, load_tokenizer

if TYPE_CHECKING:
    from memento.masking import MaskConfig  # annotations only: memento.masking imports torch

Record = dict[str, Any] | RecordReadError
"""One record as memento.records_io yields it: the JSON object, or why it could not be read."""
Outcome = MementoTrace[str] | MementoFormatError
"""A record's trace, or the defect that keeps it from being one."""
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

FULL_SCHEMA_FIELDS = ("sentences", "blocks", "block_summaries")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    Console(stderr=True, highlight=False).print(Text(f"error: {message}", style="bold red"), soft_wrap=True)
    raise typer.Exit(code)


def require_exists(*paths: Path | None) -> None:
    """Exit 2 naming the first of ``paths`` that does not exist (None, an option not given, is skipped)."""
    for path in paths:
        if path is not None and not path.exists():
            fail(f"no such file or directory: {path}")


def open_source(file: Path, split: str | None) -> RecordSource:
    try:
        return open_records(file, split=split)
    except RecordSourceError as exc:
        fail(str(exc))


def text_tokenizer(path: Path | None) -> TextTokenizer:
    """The HF tokenizer at ``path`` (exit 2 if it cannot be loaded), or the regex stand-in for None."""
    try:
        return load_tokenizer(path)
    except Exception as exc:  # transformers raises many kinds for an unusable directory
        fail(f"cannot load the tokenizer at {path}: {exc}")


def tokenizer_label(tok: TextTokenizer) -> str:
    if is_approximate(tok):
        return tok.name if "approximate" in tok.name else f"{tok.name} (approximate)"
    return tok.name


def to_trace(label: int, record: Record) -> MementoTrace[str]:
    """The trace of a record; every defect becomes a :class:`MementoFormatError` with the label."""
    if isinstance(record, RecordReadError):
        raise record
    try:
        return trace_from_record(record)
    except MementoFormatError as exc:
        raise exc.for_record(label) from None
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # e.g. blocks: [["a"]]
        raise MementoFormatError(f"malformed record: {type(exc).__name__}: {exc}", record=label) from None


def read_traces(records: Iterable[tuple[int, Record]]) -> Iterator[tuple[Record, Outcome]]:
    """Each record with its trace, or with the defect that keeps it from being one."""
    for label, record in records:
        outcome: Outcome
        try:
            outcome = to_trace(label, record)
        except MementoFormatError as error:
            outcome = error
        yield record, outcome


def schema_of(record: dict[str, Any]) -> str:
    return "full" if any(record.get(name) is not None for name in FULL_SCHEMA_FIELDS) else "default"


def error_line(source: RecordSource, error: MementoFormatError) -> str:
    """``line 12: position 345: reason`` (or ``row 3: reason`` without a position)."""
    parts = []
    if error.record is not None:
        parts.append(source.describe(int(error.record)))
    if error.position is not None:
        parts.append(f"position {error.position}")
    parts.append(error.reason)
    return ": ".join(parts)


def parse_knobs(pairs: list[str]) -> dict[str, int | float]:
    """``KEY=VALUE`` pairs (``--knob``) as a dict of numbers; exit 2 on anything else."""
    knobs: dict[str, int | float] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            fail(f"--knob takes KEY=VALUE, got {pair!r}")
        try:
            knobs[key] = int(value)
        except ValueError:
            try:
                knobs[key] = float(value)
            except ValueError:
                fail(f"--knob {key}: {value!r} is not a number")
    return knobs


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


@contextmanager
def progress_bar(
    label: str,
    console: Console,
    *,
    enabled: bool = True,
    total: int | None = None,
    elapsed: bool = False,
    transient: bool = False,
) -> Iterator[Callable[..., None]]:
    """A progress bar on ``console`` (``label``, bar, done/total, [time so far,] time left), as a
    function ``show(done, total=None)``; when not ``enabled``, a function that does nothing."""
    if not enabled:
        yield lambda done, total=None: None
        return
    columns: list[ProgressColumn] = [TextColumn(label), BarColumn(), MofNCompleteColumn()]
    if elapsed:
        columns.append(TimeElapsedColumn())
    columns.append(TimeRemainingColumn())
    with Progress(*columns, console=console, transient=transient) as progress:
        task = progress.add_task(label, total=total)

        def show(done: int, total: int | None = None) -> None:
            progress.update(task, completed=done, total=total)

        yield show


# ----------------------------------------------------------------------------------------------
# Options taken by several commands
# ----------------------------------------------------------------------------------------------

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
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress")]

# A model and the memento engine (generate, eval, serve)
ModelArg = Annotated[Path, typer.Argument(help="A local HF checkpoint directory (model + tokenizer).")]
KvBudgetOpt = Annotated[int, typer.Option("--kv-budget-tokens", min=1, help="KV pool size in tokens.")]
MaxNumSeqsOpt = Annotated[int, typer.Option("--max-num-seqs", min=1, help="Most sequences running at once.")]
MaxBlockTokensOpt = Annotated[
    int | None, typer.Option("--max-block-tokens", min=1, help="Force <|block_end|> after this many tokens.")
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto, float32 or bfloat16.")]

# Sampling (generate, eval)
TemperatureOpt = Annotated[float, typer.Option("--temperature", min=0.0, help="0 is greedy.")]
TopPOpt = Annotated[float, typer.Option("--top-p")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="-1: off.")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", min=1)]

# The memento mask: masking.MaskConfig's knobs (inspect, train, generate, serve), in a help panel of
# their own; a command takes them with @mask_options and builds its MaskConfig with mask_config.
MASK_PANEL = "Memento mask"
KeepLastNOpt = Annotated[
    int | None,
    typer.Option(
        "--keep-last-n",
        help="-1 vanilla (nothing evicted), 0 memento, N keep the N newest finished blocks. [default: 0]",
        rich_help_panel=MASK_PANEL,
    ),
]
MaskDelimitersOpt = Annotated[
    bool | None,
    typer.Option(
        "--mask-delimiters/--no-mask-delimiters",
        help="Also hide an evicted block's <|block_start|> and <|block_end|>. [default: the model family's: "
        "on for Phi-4, off otherwise]",
        rich_help_panel=MASK_PANEL,
    ),
]
KeepLastBlockOpt = Annotated[
    bool | None,
    typer.Option(
        "--keep-last-block-for-answer",
        help="Keep the newest finished block visible until the next one starts.",
        rich_help_panel=MASK_PANEL,
    ),
]
RestartOpt = Annotated[
    bool | None,
    typer.Option(
        "--restart",
        help="Restart ablation: an evicted block's memento is recomputed without it (keep-last-n 0 only).",
        rich_help_panel=MASK_PANEL,
    ),
]


def _mask_knobs(
    keep_last_n: KeepLastNOpt = None,
    mask_delimiters: MaskDelimitersOpt = None,
    keep_last_block_for_answer: KeepLastBlockOpt = None,
    restart: RestartOpt = None,
) -> None:
    """The mask options as command parameters, for :func:`mask_options` to hand out. None: not given,
    so the command's base setting stands (a model family's default: :mod:`memento.families`)."""


def mask_options(*names: str) -> Callable[[F], F]:
    """Give the decorated command the mask options ``names`` (default: all of them).

    They come after the command's own parameters (the help shows them in the "Memento mask" panel
    anyway), and the command receives them in its ``**mask_knobs`` parameter, which it hands to
    :func:`mask_config`.
    """
    every = inspect.signature(_mask_knobs, eval_str=True).parameters
    options = [every[name].replace(kind=inspect.Parameter.KEYWORD_ONLY) for name in names or every]

    def add(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        *parameters, rest = signature.parameters.values()
        if rest.kind is not inspect.Parameter.VAR_KEYWORD:
            raise TypeError(f"{command.__name__} takes no **mask_knobs: it cannot receive the mask options")
        command.__signature__ = signature.replace(parameters=[*parameters, *options])  # type: ignore[attr-defined]
        return command

    return add


# ----------------------------------------------------------------------------------------------
# Settings objects from a command's options
# ----------------------------------------------------------------------------------------------


def fields_in(target: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` named like a field of ``target``: a dataclass (class or instance),
    or a function, whose fields are then its keyword-only parameters."""
    if dataclasses.is_dataclass(target):
        names = {f.name for f in dataclasses.fields(target) if f.init}
    else:
        parameters = inspect.signature(target).parameters.values()
        names = {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return {name: value for name, value in options.items() if name in names}


def settings_from(cls: type[T], options: Mapping[str, Any], /, **values: Any) -> T:
    """The dataclass ``cls`` built from a command's options: ``options`` is the command's ``locals()``,
    of which the entries named like a field of ``cls`` are taken; ``values`` add (or override) fields.

    A command option named like a settings field *is* that field (``--max-steps`` sets
    ``SFTSettings.max_steps``), so it is spelled once, in the command's signature; ``values`` are the
    fields the command computes or names differently (``stage1=settings``, ``model_path=model``).
    Call it before binding locals of other meaning under a field's name.
    """
    return cls(**{**fields_in(cls, options), **values})


def mask_config(base: MaskConfig, mask_knobs: Mapping[str, Any], code: int = 1) -> MaskConfig:
    """``base`` with the mask options given on the command line (``mask_knobs``: see
    :func:`mask_options`; None = not given), or exit ``code`` saying what is wrong."""
    given = {name: value for name, value in mask_knobs.items() if value is not None}
    try:
        return dataclasses.replace(base, **given)
    except ValueError as exc:
        fail(str(exc), code=code)
