"""``memento rl``: RL with CISPO on block-masked rollouts (memento.train.rl), from a memento SFT checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from memento.cli.common import (
    MaxBlockTokensOpt,
    MaxNumSeqsOpt,
    MaxTokensOpt,
    ModelArg,
    ProgressOpt,
    fail,
    mask_config,
    mask_options,
    parse_knobs,
    require_exists,
)
from memento.families import default_mask

app = typer.Typer()


@app.command("rl")
@mask_options("keep_last_n", "mask_delimiters", "keep_last_block_for_answer")
def rl_command(
    model: ModelArg,
    task: Annotated[
        str, typer.Option("--task", help="synth:TASK (train split), or a JSONL / Parquet file or HF dataset directory.")
    ] = "synth:stream_sum",
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run directory: checkpoints, log.jsonl, curves.png, final/.")
    ] = Path("runs/rl"),
    problems: Annotated[int, typer.Option("--problems", "-n", min=1, help="Training prompts to draw from.")] = 512,
    knob: Annotated[list[str] | None, typer.Option("--knob", help="A synthetic task knob NAME=VALUE.")] = None,
    problem_field: Annotated[str | None, typer.Option("--problem-field")] = None,
    answer_field: Annotated[str | None, typer.Option("--answer-field")] = None,
    grader: Annotated[str | None, typer.Option("--grader", help="exact, choice or math (default: by task).")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimizer steps.")] = 100,
    generations: Annotated[int, typer.Option("--generations", "-G", min=2, help="Completions per prompt.")] = 8,
    prompts_per_step: Annotated[int, typer.Option("--prompts-per-step", min=1, help="Prompts per step.")] = 8,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Completions per forward pass.")] = 8,
    steps_per_generation: Annotated[
        int, typer.Option("--steps-per-generation", min=1, help="Optimizer steps per generation (>1: off-policy).")
    ] = 1,
    learning_rate: Annotated[float, typer.Option("--lr", help="AdamW learning rate (paper: 1e-6).")] = 1e-6,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", min=0)] = 10,
    beta: Annotated[float, typer.Option("--beta", min=0.0, help="KL coefficient (paper: 0.001).")] = 0.001,
    clip: Annotated[
        str, typer.Option("--clip", help="two_sided (the paper's CISPO) or trl (TRL's upper cap only).")
    ] = "two_sided",
    epsilon_low: Annotated[float, typer.Option("--epsilon-low", min=0.0)] = 0.2,
    epsilon_high: Annotated[
        float, typer.Option("--epsilon-high", min=0.0, help="With --clip trl: the absolute cap (ScaleRL: 5.0).")
    ] = 0.2,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="Rollout temperature.")] = 1.0,
    max_tokens: MaxTokensOpt = 512,
    max_block_tokens: MaxBlockTokensOpt = 7168,
    max_num_seqs: MaxNumSeqsOpt = 64,
    save_steps: Annotated[int, typer.Option("--save-steps", min=1, help="Checkpoint every N steps.")] = 25,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Resume from OUT's newest checkpoint.")] = True,
    progress: ProgressOpt = True,
    **mask_knobs: int | bool,
) -> None:
    """RL with CISPO on block-masked rollouts, from a memento SFT checkpoint.

    Rollouts come from the memento engine (KV eviction, the block cap); the policy is scored under
    the same mask; the loss is the paper's CISPO (importance weight clipped on both sides and
    stop-gradiented, KL to the starting model). Writes OUT/checkpoint-N (resumed when rerun),
    OUT/log.jsonl (one line per step), OUT/curves.png and OUT/final (HF model and tokenizer).
    """
    require_exists(model)
    from memento.eval.tasks import load_task_set
    from memento.train.rl import RLSettings, train_rl

    mask = mask_config(default_mask(model), mask_knobs)
    try:
        task_set = load_task_set(
            task,
            problems,
            grader=grader,
            split=None if Path(task).exists() else "train",  # synthetic tasks: the training split
            knobs=parse_knobs(knob or []),
            problem_field=problem_field,
            answer_field=answer_field,
        )
        settings = RLSettings(
            steps=steps,
            num_generations=generations,
            prompts_per_step=prompts_per_step,
            batch_size=batch_size,
            steps_per_generation=steps_per_generation,
            learning_rate=learning_rate,
            warmup_steps=warmup_steps,
            beta=beta,
            clip=clip,
            epsilon_low=epsilon_low,
            epsilon_high=epsilon_high,
            temperature=temperature,
            max_tokens=max_tokens,
            max_block_tokens=max_block_tokens,
            max_num_seqs=max_num_seqs,
            mask=mask,
            grader=task_set.grader,
            save_steps=save_steps,
            seed=seed,
        )
        problems_list = [{"prompt": p.prompt, "answer": p.answer} for p in task_set.problems]
        final = train_rl(model, problems_list, out, settings, resume=resume, show_progress=progress)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        fail(str(exc), code=1)
    Console().print(f"✓ RL done: {final}  (log: {out / 'log.jsonl'}, curves: {out / 'curves.png'})")
