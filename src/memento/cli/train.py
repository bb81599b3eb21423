"""``memento train``: two-stage memento SFT (memento.train.pipeline) from record files, on a local
checkpoint or a tiny model built from scratch; the mask options set stage 2's mask."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from memento.cli.common import (
    fail,
    mask_config,
    mask_options,
    require_exists,
    settings_from,
)
from memento.families import default_mask, model_type_mask
from memento.format import MementoFormatError
from memento.modeling import ARCHITECTURES
from memento.train.pipeline import TrainPlan, run_training
from memento.train.sft import SFTSettings, is_main_process

app = typer.Typer()


@app.command("train")
@mask_options("keep_last_n", "mask_delimiters", "keep_last_block_for_answer")
def train_command(
    train_file: Annotated[Path, typer.Option("--train", help="Training records (JSONL, Parquet or HF dataset dir).")],
    eval_file: Annotated[Path, typer.Option("--eval", help="Validation records: picks each stage's best model.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory: stage1/ and stage2/ go here.")],
    stage: Annotated[str, typer.Option("--stage", help="1 (full attention), 2 (memento mask) or both.")] = "both",
    model: Annotated[
        Path | None, typer.Option("--model", help="A local HF checkpoint to start from (stage 2 alone: stage 1's).")
    ] = None,
    tiny: Annotated[
        str | None,
        typer.Option("--tiny", help=f"Build a tiny model from scratch instead: {', '.join(ARCHITECTURES)}."),
    ] = None,
    tiny_hidden: Annotated[int, typer.Option("--tiny-hidden", help="Tiny model hidden size.")] = 128,
    tiny_layers: Annotated[int, typer.Option("--tiny-layers", help="Tiny model layers.")] = 4,
    response_field: Annotated[
        str, typer.Option("--response-field", help="Record field with the completion (control: control_response).")
    ] = "response",
    epochs: Annotated[float, typer.Option("--epochs", help="Epochs per stage.")] = 5.0,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Steps per stage (overrides --epochs if > 0).")] = -1,
    learning_rate: Annotated[float, typer.Option("--lr", help="Peak learning rate (cosine, 5% warm-up).")] = 8e-5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per step and process.")] = 16,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Gradient accumulation steps.")] = 1,
    eval_steps: Annotated[int, typer.Option("--eval-steps", help="Evaluate and checkpoint every N steps.")] = 50,
    logging_steps: Annotated[int, typer.Option("--logging-steps", help="Log the training loss every N steps.")] = 10,
    max_length: Annotated[int | None, typer.Option("--max-length", help="Refuse longer examples.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Training seed.")] = 42,
    **mask_knobs: int | bool,
) -> None:
    """Two-stage memento SFT: stage 1 with full causal attention, stage 2 with the memento mask
    (the mask options set stage 2's).

    Stage 2 starts from stage 1's best checkpoint by validation loss. Each stage writes HF
    checkpoints under OUTPUT/stageN, resumes from the newest one when rerun after an interruption,
    logs losses to OUTPUT/stageN/log.jsonl, and saves its best model (with the tokenizer) to
    OUTPUT/stageN/best. Every example is checked against the memento grammar before training.

    Runs as it is under `accelerate launch` or `torchrun` on several processes (DDP, over gloo
    without a GPU; FSDP from an accelerate config): --batch-size is per process, so the global batch is
    batch size x grad accum x processes; only the main process prints and writes.
    """
    base = default_mask(model) if model is not None else model_type_mask(tiny)  # a tiny arch is its model_type
    settings = settings_from(SFTSettings, locals(), mask=mask_config(base, mask_knobs))
    require_exists(train_file, eval_file, model)
    try:
        plan = settings_from(
            TrainPlan,
            locals(),
            output_dir=output,
            model_path=model,
            tiny_arch=tiny,
            tiny_options={"hidden_size": tiny_hidden, "num_hidden_layers": tiny_layers, "seed": seed},
            stage1=settings,
            stage2=settings,
        )
    except ValueError as exc:
        fail(str(exc))
    console = Console(highlight=False, quiet=not is_main_process())  # one voice under multi-process launches
    try:
        best = run_training(plan, log=lambda line: console.print(line, soft_wrap=True))
    except (MementoFormatError, ValueError, KeyError) as exc:
        fail(str(exc), code=1)
    for name, path in best.items():
        console.print(Text(f"✓ {name}: {path}", style="bold green"), soft_wrap=True)
