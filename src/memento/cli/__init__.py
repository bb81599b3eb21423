"""The ``memento`` command line: one module per command group, imported only when its command runs.

- :mod:`~memento.cli.validate`: ``memento validate``, check every record of a file;
- :mod:`~memento.cli.inspect`: ``memento inspect``, one trace in colour and its attention mask;
- :mod:`~memento.cli.synth`: ``memento synth``, synthetic memento traces;
- :mod:`~memento.cli.train`: ``memento train``, two-stage memento SFT;
- :mod:`~memento.cli.rl`: ``memento rl``, RL with CISPO on block-masked rollouts;
- :mod:`~memento.cli.generate`: ``memento generate``, the memento engine on a few prompts;
- :mod:`~memento.cli.evaluate`: ``memento eval`` and ``memento demo``;
- :mod:`~memento.cli.serve`: ``memento serve``, the OpenAI API (embedded engine or vLLM);
- :mod:`~memento.cli.data`: ``memento data build`` and ``memento data stats``;
- :mod:`~memento.cli.probe`: ``memento probe restart|kv|toy``, the dual information stream;
- :mod:`~memento.cli.common`: what they share (error exit, record and tokenizer loading, progress
  bars, the options several commands take).

``memento validate`` thus never imports torch, and ``memento --help`` imports no command at all: it
lists the summaries in :data:`COMMANDS` (tests/test_cli.py checks they match the commands' own).

Exit codes: 0 all good, 1 bad data or a failed run, 2 usage errors (missing file, bad option).
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

import typer
import typer.main
from typer.core import TyperCommand, TyperGroup


class CommandEntry(NamedTuple):
    module: str
    """The module under memento.cli whose Typer ``app`` holds the command."""
    summary: str
    """What ``memento --help`` lists: the first paragraph of the command's help."""


COMMANDS: dict[str, CommandEntry] = {
    "validate": CommandEntry("validate", "Check every record of FILE against the memento format and print statistics."),
    "inspect": CommandEntry("inspect", "Show one trace of FILE in colour; with --mask-png, draw who sees what."),
    "synth": CommandEntry("synth", "Generate synthetic memento traces of TASK and write one split of them to --out."),
    "train": CommandEntry(
        "train",
        "Two-stage memento SFT: stage 1 with full causal attention, stage 2 with the memento mask\n"
        "(the mask options set stage 2's).",
    ),
    "rl": CommandEntry("rl", "RL with CISPO on block-masked rollouts, from a memento SFT checkpoint."),
    "generate": CommandEntry(
        "generate", "Generate with the memento engine: blocks are evicted from the KV pool as their mementos close."
    ),
    "eval": CommandEntry(
        "evaluate", "Evaluate a model under several KV modes: accuracy (pass@k, maj@k), peak/AUC KV, throughput."
    ),
    "demo": CommandEntry(
        "evaluate", "The end-to-end demo: synthetic data, control and memento models, evaluation, report."
    ),
    "serve": CommandEntry(
        "serve", "Serve a model over the OpenAI API (completions, chat, streaming) with in-place KV eviction."
    ),
    "data": CommandEntry("data", "The OpenMementos data pipeline: plain reasoning traces -> memento traces."),
    "probe": CommandEntry(
        "probe", "The dual information stream: restart ablation, KV passcode probe, toy transformer."
    ),
}
"""Every command in the order ``memento --help`` lists them."""


class LazyCommandGroup(TyperGroup):
    """The root command: imports a command's module only when that command is asked for.

    ``self.commands`` holds stand-ins that carry only a name and a summary: the help listing shows
    them (so it imports nothing) and a mistyped command is matched against their names.
    """

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.commands = {name: TyperCommand(name=name, help=entry.summary) for name, entry in COMMANDS.items()}
        self._listing = False

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: typer.Context, cmd_name: str) -> TyperCommand | TyperGroup | None:
        """The command itself, from its module (the stand-in while the help listing is drawn)."""
        if self._listing or cmd_name not in COMMANDS:
            return super().get_command(ctx, cmd_name)
        module = importlib.import_module(f"{__name__}.{COMMANDS[cmd_name].module}")
        return typer.main.get_group(module.app).get_command(ctx, cmd_name)

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        """``memento --help``: the commands are listed from their stand-ins, importing none of them."""
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(
    name="memento",
    help="MEMENTO: teach language models to manage their own context. Check and inspect memento traces.",
    cls=LazyCommandGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """MEMENTO: teach language models to manage their own context. Check and inspect memento traces."""


def main() -> None:
    """Entry point of the ``memento`` console script."""
    app(prog_name="memento")
