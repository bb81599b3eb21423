"""A short RL run for ``accelerate launch`` (tests/test_rl.py runs it with 2 CPU processes over gloo).

Usage: accelerate launch --cpu --num_processes 2 tests/rl_launch.py CHECKPOINT OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from memento.synth import generate
from memento.train.rl import RLSettings, train_rl


def length_reward(prompts, completions, **_):
    """Varies within every group, so the policy gets a gradient."""
    return [float(len(text)) / 50 for text in completions]


def main() -> None:
    checkpoint, out = Path(sys.argv[1]), Path(sys.argv[2])
    problems = [{"prompt": p.prompt, "answer": p.answer} for p in generate("running_sum", "train", 8, seed=0)]
    settings = RLSettings(
        steps=2, num_generations=4, prompts_per_step=2, batch_size=2, max_tokens=16, learning_rate=1e-2, save_steps=2
    )
    train_rl(checkpoint, problems, out, settings, show_progress=False, reward_funcs=[length_reward])
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    (out / f"rank{state.process_index}.json").write_text(json.dumps({"processes": state.num_processes}))


if __name__ == "__main__":
    main()
