"""``memento train`` on 2 CPU processes (``accelerate launch``, torchrun, DDP over gloo) follows the
single-process run: the same losses at every step and the same weights at the end (issue 22).

The launch is the README's, its flags read from there: ``accelerate launch --multi_gpu
--num_processes 2`` with no GPU visible. (``accelerate launch --cpu --num_processes 2`` is *not*
it: on one machine accelerate 1.16 then starts a single process and ignores ``--num_processes``,
unless an MPI hostfile is given.) The README's FSDP config cannot run here (no GPU; on CPUs
accelerate drops FSDP for plain DDP); :func:`test_the_readme_fsdp_config_is_read_by_accelerate`
checks at least that accelerate reads it as meant.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import records, tiny_model
from memento.records_io import write_records
from memento.tiny_tokenizer import build_tiny_tokenizer
from memento.train.collate import tokenize_example
from memento.train.sft import read_log

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

STEPS = 6
TRAINING = [
    *("--tiny", "qwen3", "--tiny-hidden", "32", "--tiny-layers", "1", "--lr", "1e-2"),
    *("--max-steps", str(STEPS), "--eval-steps", str(STEPS), "--logging-steps", "1", "--seed", "7"),
]
"""Both stages, 6 steps each, one evaluation and checkpoint at the end (so each stage's best model is
its last, and the final weights compare). The tiny Qwen3 has no dropout."""

RTOL = 1e-5
"""fp32. The runs do the same arithmetic except where the batch is split: two processes each take
the gradient of half the global batch and DDP sums the halves (gloo all-reduce), where one process
sums the per-token terms in one backward pass, in another order (and with its own thread count);
the loss is reduced over the tokens in two parts likewise. Each such sum differs by a few ulps
(~1e-7 relative), and Adam carries the difference from step to step. Measured: at most 7.5e-8
relative over the 12 logged losses and both validation losses; 1e-5 leaves a 100-fold margin and
is still 40 times below the smallest of the errors this test is meant to catch (its docstring)."""

WEIGHTS_ATOL = 1e-5
"""Absolute, on weights of size ~0.02-1 after 12 Adam steps of lr 1e-2 (each moves a weight by up to
~lr). Measured: 4.5e-7 at most between the correct runs, 1.5e-2 and more for the errors below."""


def readme_launch() -> list[str]:
    """The README's ``accelerate launch`` flags for 2 CPU processes (between ``launch`` and ``-m``)."""
    from test_readme import readme_commands

    command = next(c for c in readme_commands() if c.startswith("CUDA_VISIBLE_DEVICES= accelerate launch "))
    words = shlex.split(command)
    return words[words.index("launch") + 1 : words.index("-m")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """16 training traces of very different lengths (1 block or 5, interleaved) and 4 validation ones.

    Unequal lengths matter: each process averaging its own tokens (instead of the global batch's)
    gives the same loss as the global token average only when every example has as many tokens.
    """
    root = tmp_path_factory.mktemp("ddp-data")
    short, long = records(8, seed=1, blocks=1), records(8, seed=2, blocks=5)
    train = [r for pair in zip(short, long, strict=True) for r in pair]
    write_records(root / "train.jsonl", train)
    write_records(root / "val.jsonl", [*records(2, seed=3, blocks=1), *records(2, seed=4, blocks=5)])
    tok = build_tiny_tokenizer()
    lengths = [sum(tokenize_example(tok, r["problem"], r["response"])["completion_mask"]) for r in train]
    assert max(lengths) > 2 * min(lengths), lengths
    return root


def train(data: Path, out: Path, *, processes: int, batch_size: int) -> float:
    """``memento train`` on ``processes`` CPU processes; returns its wall time in seconds."""
    command_args = ["--train", str(data / "train.jsonl"), "--eval", str(data / "val.jsonl"), "-o", str(out)]
    command_args += [*TRAINING, "--batch-size", str(batch_size)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    if processes == 1:
        command = [str(BIN / "memento"), "train", *command_args]
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)
    else:
        launcher = shutil.which("accelerate", path=str(BIN))
        assert launcher is not None, "accelerate is not installed in the venv"
        flags = readme_launch()
        assert flags[flags.index("--num_processes") + 1] == str(processes)
        command = [launcher, "launch", *flags, "--main_process_port", str(free_port()), "-m", "memento", "train"]
        command += command_args
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    if processes > 1:  # one voice: the other process prints nothing of its own
        assert done.stdout.count("✓ stage2:") == 1, done.stdout[-3000:]
    return time.monotonic() - start


def losses(run: Path, stage: int, key: str = "loss") -> list[tuple[int, float]]:
    return [(e["step"], e[key]) for e in read_log(run / f"stage{stage}") if key in e]


def weights(run: Path, stage: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / f"stage{stage}" / "best" / "model.safetensors"))


@pytest.mark.slow
def test_two_processes_follow_the_single_process_run(data: Path, tmp_path: Path) -> None:
    """Per-device batch 2 on 2 processes against batch 4 on 1: the same global batches, so the same
    losses at each of stage 1's and stage 2's steps, the same validation losses, the same final
    weights of both stages (within :data:`RTOL`, :data:`WEIGHTS_ATOL`).

    What it tells apart (measured on this data when the test was written):

    * each process seeing the whole data instead of its shard: both would take the same 2 examples
      per step, i.e. the single-process run with batch 2, which the control below runs: its losses
      differ from batch 4's by 1.4e-3 to 2e-2 relative, its weights by 5e-2;
    * a wrong loss scale. The Trainer divides each process's token-loss sum by the token count of
      the whole global batch and multiplies by the number of processes, since DDP averages the
      gradients. Without the factor the logged losses halve. With each process averaging only its
      own tokens (``average_tokens_across_devices=False``; the lengths differ up to five-fold) the
      losses drift by 4e-4 to 8e-3 relative from the first update on, the weights by 1.5e-2;
    * outputs from two writers (a log line per process) or a stage 2 that read stage 1's best model
      before it was written (it would fail or start from other weights).

    The losses compared are the Trainer's, logged every step by the main process only.
    """
    single, double, control = tmp_path / "single", tmp_path / "double", tmp_path / "control"
    seconds = {
        "2 processes x 2": train(data, double, processes=2, batch_size=2),
        "1 process x 4": train(data, single, processes=1, batch_size=4),
        "1 process x 2 (control)": train(data, control, processes=1, batch_size=2),
    }
    print(f"wall time: {seconds}")
    worst = 0.0
    for stage in (1, 2):
        summary = json.loads((double / f"stage{stage}/best/memento_training.json").read_text())
        assert (summary["num_processes"], summary["global_batch_size"]) == (2, 4)
        assert json.loads((single / f"stage{stage}/best/memento_training.json").read_text())["global_batch_size"] == 4

        expected, got = losses(single, stage), losses(double, stage)
        assert [step for step, _ in got] == list(range(1, STEPS + 1))  # one writer, every step
        assert [step for step, _ in expected] == [step for step, _ in got]
        for (step, a), (_, b) in zip(expected, got, strict=True):
            assert b == pytest.approx(a, rel=RTOL), f"stage {stage} step {step}: {a} (1 process) vs {b} (2)"
            worst = max(worst, abs(a - b) / abs(a))
        (step, a), (other, b) = *losses(single, stage, "eval_loss"), *losses(double, stage, "eval_loss")
        assert step == other == STEPS and b == pytest.approx(a, rel=RTOL), (a, b)

        reference, trained = weights(single, stage), weights(double, stage)
        assert reference.keys() == trained.keys()
        for name, tensor in reference.items():
            torch.testing.assert_close(trained[name], tensor, rtol=0, atol=WEIGHTS_ATOL, msg=name)

        # the control (what unsharded data would give) is told apart at this tolerance
        apart = [abs(a - c) / abs(a) for (_, a), (_, c) in zip(expected, losses(control, stage), strict=True)]
        assert max(apart) > 100 * RTOL, apart
    print(f"largest relative loss difference, 1 vs 2 processes: {worst:.2e}")


def test_the_readme_fsdp_config_is_read_by_accelerate(tmp_path: Path, monkeypatch) -> None:
    """The README's ``fsdp.yaml``, through accelerate's own launcher code (no process started):
    FSDP 2, full state dicts (so ``best/`` is an HF directory), bf16, and a wrap policy that finds
    the decoder layers of a Qwen3 model. It says nothing of training under FSDP, which needs GPUs."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    text = (ROOT / "README.md").read_text()
    config = tmp_path / "fsdp.yaml"
    config.write_text(re.search(r"```yaml\n# fsdp\.yaml\n(.*?)```", text, re.S).group(1))
    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "memento", "train"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert args.use_fsdp and env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert (env["FSDP_VERSION"], env["FSDP_STATE_DICT_TYPE"]) == ("2", "FULL_STATE_DICT")
    for name, value in env.items():
        if name.startswith("FSDP_"):
            monkeypatch.setenv(name, value)
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_auto_wrap_policy(tiny_model(build_tiny_tokenizer()))
    assert plugin.transformer_cls_names_to_wrap == ["Qwen3DecoderLayer"] and not plugin.cpu_ram_efficient_loading
