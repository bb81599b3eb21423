"""Synthetic memento data: tasks whose reasoning must carry state from block to block.

See :mod:`memento.synth.tasks` for the task formats. The API::

    from memento.synth import generate, write_split
    problems = generate("running_sum", "train", 1000, seed=0, max_blocks=10)
    write_split("train.jsonl", problems)
"""

from memento.synth.tasks import (
    COMMON_KNOBS,
    DEFAULT_TASK,
    SPLITS,
    TASKS,
    Problem,
    TaskFamily,
    chat_text,
    generate,
    split_of,
    summarize,
    tiny_token_count,
    unit_ratios,
    write_split,
)

__all__ = [
    "COMMON_KNOBS",
    "DEFAULT_TASK",
    "SPLITS",
    "TASKS",
    "Problem",
    "TaskFamily",
    "chat_text",
    "generate",
    "split_of",
    "summarize",
    "tiny_token_count",
    "unit_ratios",
    "write_split",
]
