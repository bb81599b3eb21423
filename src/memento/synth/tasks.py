"""Synthetic memento tasks whose reasoning must carry state from block to block.

Every task is small enough for a ~1M-parameter character-level transformer (see
:mod:`memento.tiny_tokenizer`: one character is one token, each special token is one token), and
every memento holds exactly the state later blocks need, because under the memento mask a block is
invisible once its memento ends.

``running_sum`` (the paper's toy task, made prompt-driven). The prompt lists labelled digits; each
block adds the next few, one step per item, and its memento records the label of the last item
consumed and the running total. By default the total is kept modulo 10 (the prompt says so), which
keeps every step a one-digit sum a ~1M-parameter model learns in minutes; ``modulus=0`` gives plain
sums (three-digit totals with carries: much slower to learn)::

    prompt:   SUM MOD 10: a7 b3 c8 d1 e5 f0 ...
    block 1:  a7:0+7=7 b3:7+3=0 c8:0+8=8
    memento:  c=8
    block 2:  d1:8+1=9 e5:9+5=4 f0:4+0=4
    memento:  f=4
    ...
    answer:   the total (mod 10)

Each step starts with the label and its value exactly as the prompt has them, so reading the value
is a single induction step (find the earlier ``d``, copy what follows); the header is upper case and
the memento ``c=8`` holds no letter but the label, so that earlier ``d`` is unique. (With steps
written ``d:8+1=9`` a 0.6M-parameter model learned the arithmetic and the format but not the
lookup within a 10-minute budget.)

``pointer_walk``. The prompt gives a lookup table (a permutation of letters with no fixed point),
a start node and a number of steps; each block follows a few pointers, one lookup per step, and its
memento records the steps done and the current node::

    prompt:   walk 24 from d: a>c b>e c>b d>a e>d f>g g>h h>j i>f j>i
    block 1:  1:d>a 2:a>c 3:c>b 4:b>e
    memento:  n=4 e
    ...
    answer:   the node reached

``stream_sum`` (the toy task with every step local). The prompt seeds a pseudo-random digit
stream ``x <- a*x + c (mod 10)`` and says how many steps to take; each step writes the next digit
(the product, then the sum), counts the steps left down and adds the digit to the running total,
and each memento records the whole state (``a``, ``c``, the digit, the total, the steps left)::

    prompt:   STREAM a3 c9 x4 n22
    block 1:  3*4=2+9=1 n21 0+1=1 3*1=3+9=2 n20 1+2=3 3*2=6+9=5 n19 3+5=8
    memento:  a3c9x5s8n19
    ...       (the last block takes the 3-5 steps that are left)
    answer:   the total (mod 10)

Nothing has to be looked up far away: each step reads the step before it (or the memento, or the
fixed-length prompt), which is what a ~1M-parameter model learns within minutes on 2 CPU cores,
where running_sum's prompt lookup (an induction head) forms late or not at all.

Splits never overlap: a candidate problem belongs to train, validation or test by a stable hash
(SHA-256) of its task and prompt, whatever the seed or the knobs, and :func:`generate` keeps drawing
candidates until it has ``n`` distinct problems of the requested split.
"""

from __future__ import annotations

import hashlib
import random
import re
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memento.format import SPECIAL_TOKENS, THINK_END, THINK_START, MementoTrace, record_from_trace, render_response
from memento.records_io import write_records
from memento.tiny_tokenizer import ASSISTANT_PREFIX, IM_END, IM_START

SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_PERMILLE: dict[str, tuple[int, int]] = {"train": (0, 800), "validation": (800, 900), "test": (900, 1000)}
"""Each split's range of hash buckets (out of 1000): 80% train, 10% validation, 10% test."""

MAX_CONSECUTIVE_MISSES = 20_000
"""generate() gives up (ValueError) after this many candidates in a row that it could not use."""

COMMON_KNOBS: dict[str, int | float] = {"min_ratio": 4.0}
"""Knobs every task takes: ``min_ratio`` rejects a candidate if any block has fewer than
``min_ratio`` times its memento's characters (tokens). The defaults of every task meet 4.0 by
construction, so at default difficulty nothing is rejected."""

LABELS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
"""Item labels of running_sum, in order: at most 52 items."""

NODES = "abcdefghijklmnopqrstuvwxyz"
"""Node names of pointer_walk: at most 26 nodes."""


# ----------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------


def _sentences(block: str) -> list[str]:
    """A block's steps as sentences (each with its trailing space); joined they give the block."""
    parts = re.findall(r"\s*\S+\s*", block)
    assert "".join(parts) == block
    return parts


@dataclass(frozen=True)
class Problem:
    """One synthetic problem: its prompt, its memento trace and its exact answer string."""

    uid: str
    task: str
    prompt: str
    answer: str
    trace: MementoTrace[str]

    @property
    def difficulty(self) -> int:
        """The number of blocks."""
        return len(self.trace.units)

    def memento_response(self) -> str:
        """The response with blocks and mementos (what the memento model is trained on)."""
        return render_response(self.trace)

    def control_response(self) -> str:
        """The same reasoning without mementos (what the control model is trained on)."""
        blocks = "\n".join(unit.block for unit in self.trace.units)
        return f"{THINK_START}\n{blocks}\n{THINK_END}{self.trace.answer}"

    def record(self, schema: str = "default") -> dict[str, Any]:
        """An OpenMementos record (default or full schema) plus uid, task, answer, control_response.

        In the full schema every step of a block is one sentence.
        """
        record = record_from_trace(
            self.trace,
            schema=schema,
            domain="math",
            source=f"synth:{self.task}",
            difficulty=self.difficulty,
            block_sentences=[_sentences(unit.block) for unit in self.trace.units] if schema == "full" else None,
        )
        record.update(uid=self.uid, task=self.task, answer=self.answer, control_response=self.control_response())
        return record


@dataclass(frozen=True)
class Candidate:
    """What a task family draws: the prompt, the (block, memento) pairs and the answer."""

    prompt: str
    pairs: tuple[tuple[str, str], ...]
    answer: str


@dataclass(frozen=True)
class TaskFamily:
    """A family of synthetic tasks: its knobs (with defaults), a checker for them, and a sampler."""

    name: str
    description: str
    knobs: Mapping[str, int]
    check: Callable[[Mapping[str, int]], None]
    sample: Callable[[random.Random, Mapping[str, int]], Candidate]
    all_knobs: Mapping[str, int | float] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "all_knobs", {**self.knobs, **COMMON_KNOBS})

    def resolve(self, knobs: Mapping[str, Any]) -> dict[str, int | float]:
        """The defaults overridden by ``knobs``; a ValueError for an unknown or out-of-range knob."""
        unknown = sorted(set(knobs) - set(self.all_knobs))
        if unknown:
            known = ", ".join(f"{k}={v}" for k, v in self.all_knobs.items())
            raise ValueError(f"unknown knob(s) for {self.name}: {', '.join(unknown)} (known: {known})")
        params: dict[str, int | float] = dict(self.all_knobs)
        for key, value in knobs.items():
            default = self.all_knobs[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"knob {key} must be a number, not {value!r}")
            if isinstance(default, int) and not (isinstance(value, int) or float(value).is_integer()):
                raise ValueError(f"knob {key} must be an integer, not {value!r}")
            params[key] = int(value) if isinstance(default, int) else float(value)
        if params["min_ratio"] < 0:
            raise ValueError(f"min_ratio must be >= 0, got {params['min_ratio']}")
        self.check({k: int(v) for k, v in params.items() if k in self.knobs})
        return params


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_blocks(knobs: Mapping[str, int]) -> None:
    _need(knobs["min_blocks"] >= 1, f"min_blocks must be >= 1, got {knobs['min_blocks']}")
    _need(
        knobs["max_blocks"] >= knobs["min_blocks"],
        f"max_blocks ({knobs['max_blocks']}) must be >= min_blocks ({knobs['min_blocks']})",
    )


# ----------------------------------------------------------------------------------------------
# running_sum
# ----------------------------------------------------------------------------------------------


def _check_running_sum(knobs: Mapping[str, int]) -> None:
    _check_blocks(knobs)
    _need(knobs["items_per_block"] >= 1, f"items_per_block must be >= 1, got {knobs['items_per_block']}")
    _need(knobs["max_value"] >= 1, f"max_value must be >= 1, got {knobs['max_value']}")
    _need(knobs["modulus"] >= 0, f"modulus must be >= 0 (0: plain sums), got {knobs['modulus']}")
    most = knobs["max_blocks"] * knobs["items_per_block"]
    _need(
        most <= len(LABELS),
        f"max_blocks * items_per_block = {most} items, but running_sum labels at most {len(LABELS)}",
    )


def _sample_running_sum(rng: random.Random, knobs: Mapping[str, int]) -> Candidate:
    blocks = rng.randint(knobs["min_blocks"], knobs["max_blocks"])
    k = knobs["items_per_block"]
    values = [rng.randint(0, knobs["max_value"]) for _ in range(blocks * k)]
    modulus = knobs["modulus"]
    # Upper case: no label letter appears in the header, so "the digit after label d" is unique.
    rule = f"SUM MOD {modulus}: " if modulus else "SUM: "
    prompt = rule + " ".join(f"{LABELS[i]}{v}" for i, v in enumerate(values))
    total = 0
    pairs = []
    for b in range(blocks):
        steps = []
        for i in range(b * k, (b + 1) * k):
            new = (total + values[i]) % modulus if modulus else total + values[i]
            # The label is followed by its value, as in the prompt: reading it is one induction step.
            steps.append(f"{LABELS[i]}{values[i]}:{total}+{values[i]}={new}")
            total = new
        pairs.append((" ".join(steps), f"{LABELS[(b + 1) * k - 1]}={total}"))
    return Candidate(prompt, tuple(pairs), str(total))


RUNNING_SUM = TaskFamily(
    name="running_sum",
    description="add labelled digits; each block adds a few, its memento keeps the last label and the total",
    knobs={"min_blocks": 6, "max_blocks": 8, "items_per_block": 3, "max_value": 9, "modulus": 10},
    check=_check_running_sum,
    sample=_sample_running_sum,
)


# ----------------------------------------------------------------------------------------------
# pointer_walk
# ----------------------------------------------------------------------------------------------


def _check_pointer_walk(knobs: Mapping[str, int]) -> None:
    _check_blocks(knobs)
    _need(knobs["steps_per_block"] >= 1, f"steps_per_block must be >= 1, got {knobs['steps_per_block']}")
    _need(2 <= knobs["nodes"] <= len(NODES), f"nodes must be in 2..{len(NODES)}, got {knobs['nodes']}")


def _derangement(rng: random.Random, n: int) -> list[int]:
    """A uniformly random permutation of range(n) with no fixed point (n >= 2)."""
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        if all(i != p for i, p in enumerate(perm)):
            return perm


def _sample_pointer_walk(rng: random.Random, knobs: Mapping[str, int]) -> Candidate:
    blocks = rng.randint(knobs["min_blocks"], knobs["max_blocks"])
    k = knobs["steps_per_block"]
    names = NODES[: knobs["nodes"]]
    perm = _derangement(rng, len(names))
    table = {names[i]: names[p] for i, p in enumerate(perm)}
    start = rng.choice(names)
    total = blocks * k
    prompt = f"walk {total} from {start}: " + " ".join(f"{a}>{b}" for a, b in table.items())
    node = start
    pairs = []
    for b in range(blocks):
        steps = []
        for step in range(b * k + 1, (b + 1) * k + 1):
            steps.append(f"{step}:{node}>{table[node]}")
            node = table[node]
        pairs.append((" ".join(steps), f"n={(b + 1) * k} {node}"))
    return Candidate(prompt, tuple(pairs), node)


POINTER_WALK = TaskFamily(
    name="pointer_walk",
    description="follow a lookup table from a start node; each block follows a few pointers, "
    "its memento keeps the steps done and the current node",
    knobs={"min_blocks": 6, "max_blocks": 8, "steps_per_block": 4, "nodes": 10},
    check=_check_pointer_walk,
    sample=_sample_pointer_walk,
)


# ----------------------------------------------------------------------------------------------
# stream_sum
# ----------------------------------------------------------------------------------------------


def _check_stream_sum(knobs: Mapping[str, int]) -> None:
    _need(knobs["steps_per_block"] >= 1, f"steps_per_block must be >= 1, got {knobs['steps_per_block']}")
    _need(knobs["min_steps"] >= knobs["steps_per_block"], "min_steps must be >= steps_per_block")
    _need(knobs["max_steps"] >= knobs["min_steps"], "max_steps must be >= min_steps")
    _need(knobs["max_steps"] <= 99, f"max_steps must be <= 99 (two digits), got {knobs['max_steps']}")


def _sample_stream_sum(rng: random.Random, knobs: Mapping[str, int]) -> Candidate:
    steps = rng.randint(knobs["min_steps"], knobs["max_steps"])
    a, c, x = rng.randint(1, 9), rng.randint(0, 9), rng.randint(0, 9)
    k = knobs["steps_per_block"]
    blocks = steps // k
    prompt = f"STREAM a{a} c{c} x{x} n{steps:02d}"
    total, left = 0, steps
    pairs = []
    for b in range(blocks):
        size = k if b < blocks - 1 else steps - k * (blocks - 1)
        lines = []
        for _ in range(size):
            ax = a * x % 10
            new_x = (ax + c) % 10
            new_total = (total + new_x) % 10
            left -= 1
            # The total comes last: the final answer then copies the trace's last digit.
            lines.append(f"{a}*{x}={ax}+{c}={new_x} n{left:02d} {total}+{new_x}={new_total}")
            x, total = new_x, new_total
        pairs.append((" ".join(lines), f"a{a}c{c}x{x}s{total}n{left:02d}"))
    return Candidate(prompt, tuple(pairs), str(total))


STREAM_SUM = TaskFamily(
    name="stream_sum",
    description="sum a pseudo-random digit stream x <- a*x+c (mod 10); each block takes a few steps, "
    "its memento keeps a, c, the current digit, the total and the steps left",
    knobs={"min_steps": 18, "max_steps": 26, "steps_per_block": 3},
    check=_check_stream_sum,
    sample=_sample_stream_sum,
)


TASKS: dict[str, TaskFamily] = {family.name: family for family in (RUNNING_SUM, POINTER_WALK, STREAM_SUM)}
"""Every task family by name."""

DEFAULT_TASK = "stream_sum"
"""The task the benchmarks and the demo use: the one a tiny model learns on 2 CPU cores in minutes
(running_sum needs an induction head that forms late; see BENCHMARKS.md)."""


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def _digest(task: str, prompt: str) -> str:
    return hashlib.sha256(f"memento.synth\n{task}\n{prompt}".encode()).hexdigest()


def split_of(task: str, prompt: str) -> str:
    """The split a problem belongs to, from a SHA-256 of its task and prompt (seed and knobs play no part)."""
    bucket = int(_digest(task, prompt)[:8], 16) % 1000
    for name, (lo, hi) in SPLIT_PERMILLE.items():
        if lo <= bucket < hi:
            return name
    raise AssertionError(bucket)  # pragma: no cover


def unit_ratios(trace: MementoTrace[str]) -> list[float]:
    """Each unit's block characters over its memento characters (characters are tokens here)."""
    return [len(u.block) / len(u.memento) for u in trace.units]


def _family(task: str) -> TaskFamily:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    return TASKS[task]


def generate(task: str, split: str, n: int, seed: int = 0, **knobs: Any) -> list[Problem]:
    """``n`` distinct problems of ``task`` in ``split``, deterministic in (task, seed, knobs).

    Candidates are drawn from one stream per (task, seed) and kept when they hash into ``split``,
    are new, and meet ``min_ratio``. A ValueError names an unknown task, split or knob, a bad ``n``,
    or an ``n`` the knobs' problem space cannot supply.
    """
    family = _family(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    params = family.resolve(knobs)
    task_knobs = {k: int(v) for k, v in params.items() if k in family.knobs}
    min_ratio = float(params["min_ratio"])
    rng = random.Random(int.from_bytes(hashlib.sha256(f"memento.synth/{task}/{seed}".encode()).digest()[:8], "big"))
    problems: list[Problem] = []
    seen: set[str] = set()
    misses: Counter[str] = Counter()
    in_a_row = 0
    while len(problems) < n:
        cand = family.sample(rng, task_knobs)
        digest = _digest(task, cand.prompt)
        uid = f"{task}-{digest[:16]}"
        trace = MementoTrace.new(cand.prompt, cand.pairs, cand.answer)
        if split_of(task, cand.prompt) != split:
            reason = "in another split"
        elif uid in seen:
            reason = "duplicates"
        elif min(unit_ratios(trace)) < min_ratio:
            reason = f"a block under {min_ratio:g}x its memento"
        else:
            seen.add(uid)
            problems.append(Problem(uid=uid, task=task, prompt=cand.prompt, answer=cand.answer, trace=trace))
            in_a_row = 0
            continue
        misses[reason] += 1
        in_a_row += 1
        if in_a_row >= MAX_CONSECUTIVE_MISSES:
            why = ", ".join(f"{count:,} {reason}" for reason, count in misses.most_common())
            raise ValueError(
                f"cannot find {n} distinct {task} problems for {split} with knobs {task_knobs} and "
                f"min_ratio={min_ratio:g}: found {len(problems)}, then {in_a_row:,} candidates in a row were "
                f"unusable ({why}); raise the difficulty knobs or lower n"
            )
    return problems


def write_split(path: str | Path, problems: Iterable[Problem], schema: str = "default") -> int:
    """Write the problems' records to ``path`` (.jsonl or .parquet, by suffix); returns the count."""
    if schema not in ("default", "full"):
        raise ValueError(f"schema must be 'default' or 'full', not {schema!r}")
    return write_records(path, (p.record(schema) for p in problems))


# ----------------------------------------------------------------------------------------------
# Lengths
# ----------------------------------------------------------------------------------------------


def chat_text(problem: Problem, *, control: bool = False) -> str:
    """The whole ChatML conversation the tiny models train on (as the tiny tokenizer's template)."""
    response = problem.control_response() if control else problem.memento_response()
    return f"{IM_START}user\n{problem.prompt}{IM_END}\n{ASSISTANT_PREFIX}{response}{IM_END}\n"


_SPECIAL_IN_CHAT = re.compile("|".join(re.escape(t) for t in (*SPECIAL_TOKENS, IM_START, IM_END)))


def tiny_token_count(text: str) -> int:
    """Tokens under the character-level tiny tokenizer: one per character, one per special token."""
    specials = _SPECIAL_IN_CHAT.findall(text)
    return len(text) - sum(len(s) for s in specials) + len(specials)


def summarize(problems: Sequence[Problem]) -> dict[str, Any]:
    """Medians (and extremes) of blocks, block/memento ratios and chat lengths, for a report."""
    if not problems:
        return {"count": 0}
    blocks = [len(p.trace.units) for p in problems]
    unit = [r for p in problems for r in unit_ratios(p.trace)]
    overall = [sum(len(u.block) for u in p.trace.units) / sum(len(u.memento) for u in p.trace.units) for p in problems]
    chats = [chat_text(p) for p in problems]
    tokens = [tiny_token_count(c) for c in chats]
    control_tokens = [tiny_token_count(chat_text(p, control=True)) for p in problems]
    return {
        "count": len(problems),
        "median_blocks": statistics.median(blocks),
        "min_blocks": min(blocks),
        "max_blocks": max(blocks),
        "median_ratio": statistics.median(overall),
        "median_unit_ratio": statistics.median(unit),
        "min_unit_ratio": min(unit),
        "median_chat_tokens": statistics.median(tokens),
        "max_chat_tokens": max(tokens),
        "median_control_chat_tokens": statistics.median(control_tokens),
        "median_chat_chars": statistics.median(len(c) for c in chats),
    }
