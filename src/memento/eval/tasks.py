"""Problem sets to evaluate on: the synthetic tasks, or any JSONL / Parquet / HF dataset on disk.

A problem is a prompt (the user turn) and a gold answer. ``synth:NAME`` draws held-out problems of a
synthetic task (graded exactly); a file or dataset directory is read with
:mod:`memento.records_io` and its problem/answer fields picked by name (graded as math unless told).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memento.records_io import RecordReadError, read_records

PROBLEM_FIELDS = ("problem", "question", "prompt")
ANSWER_FIELDS = ("answer", "gold", "target", "solution")


@dataclass(frozen=True)
class EvalProblem:
    uid: str
    prompt: str
    answer: str


@dataclass
class TaskSet:
    """Problems plus how to grade them."""

    name: str
    problems: list[EvalProblem]
    grader: str
    meta: dict[str, Any] = field(default_factory=dict)


def synthetic_task_set(
    task: str, n: int, *, split: str = "test", seed: int = 1, knobs: dict[str, Any] | None = None
) -> TaskSet:
    """``n`` problems of a synthetic task family (disjoint from the other splits by construction)."""
    from memento.synth import generate

    problems = generate(task, split, n, seed=seed, **(knobs or {}))
    return TaskSet(
        name=f"synth:{task}",
        problems=[EvalProblem(p.uid, p.prompt, p.answer) for p in problems],
        grader="exact",
        meta={"task": task, "split": split, "seed": seed, "knobs": dict(knobs or {})},
    )


def _pick(record: dict[str, Any], wanted: str | None, candidates: tuple[str, ...], what: str, where: str) -> str:
    names = (wanted,) if wanted else candidates
    for name in names:
        if name in record and record[name] is not None:
            return str(record[name])
    raise ValueError(
        f"{where}: no {what} field ({' or '.join(names)}); the record has {', '.join(sorted(record)) or 'no fields'}"
        + ("" if wanted else f" (choose one with --{what}-field)")
    )


def file_task_set(
    path: str | Path,
    *,
    n: int | None = None,
    split: str | None = None,
    problem_field: str | None = None,
    answer_field: str | None = None,
    grader: str = "math",
    id_field: str | None = None,
) -> TaskSet:
    """Problems from a JSONL / Parquet file or an HF dataset saved to disk (first ``n`` if given)."""
    problems: list[EvalProblem] = []
    for label, record in read_records(path, split=split):
        if isinstance(record, RecordReadError):
            raise ValueError(f"{path}: {record}")
        where = f"{path} record {label}"
        uid = str(record.get(id_field or "task_id", record.get("id", label)))
        problems.append(
            EvalProblem(
                uid=uid,
                prompt=_pick(record, problem_field, PROBLEM_FIELDS, "problem", where),
                answer=_pick(record, answer_field, ANSWER_FIELDS, "answer", where),
            )
        )
        if n is not None and len(problems) >= n:
            break
    if not problems:
        raise ValueError(f"{path} holds no problems")
    return TaskSet(name=str(path), problems=problems, grader=grader, meta={"path": str(path), "split": split})


def load_task_set(spec: str, n: int | None = None, *, grader: str | None = None, **options: Any) -> TaskSet:
    """``synth:NAME`` (or a bare task family name) or a path; ``grader`` overrides the default."""
    from memento.synth.tasks import TASKS

    name = spec.removeprefix("synth:")
    if spec.startswith("synth:") or (name in TASKS and not Path(spec).exists()):
        if name not in TASKS:
            raise ValueError(f"unknown synthetic task {name!r}; known: {', '.join(TASKS)}")
        synth_options = {k: options[k] for k in ("split", "seed", "knobs") if options.get(k) is not None}
        task_set = synthetic_task_set(name, n or 200, **synth_options)
    elif Path(spec).exists():
        file_options = {k: v for k, v in options.items() if k not in ("seed", "knobs")}
        task_set = file_task_set(spec, n=n, **file_options)
    else:
        raise ValueError(f"{spec!r} is neither synth:TASK nor an existing file or dataset directory")
    if grader is not None:
        task_set.grader = grader
    return task_set
