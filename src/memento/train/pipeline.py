"""``memento train``: data files in, stage 1 and/or stage 2 out, in HF format.

Stage 1 (full causal attention) writes ``OUT/stage1/best``; stage 2 (the memento mask) starts from
stage 1's best model (or from ``--model`` when run alone) and writes ``OUT/stage2/best``. A new
model is either a local HF checkpoint (the memento tokens are added and initialised if missing) or
a freshly built tiny model with the tiny character-level tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memento.records_io import RecordReadError, read_records
from memento.train.sft import SFTSettings, make_collator, prepare_examples, train_stage

STAGES = ("1", "2", "both")


@dataclass
class TrainPlan:
    """What to train, from what, on which data, and where to put it."""

    train_file: Path
    eval_file: Path
    output_dir: Path
    stage: str = "both"
    response_field: str = "response"
    model_path: Path | None = None
    tiny_arch: str | None = None
    tiny_options: dict[str, Any] = field(default_factory=dict)
    stage1: SFTSettings = field(default_factory=SFTSettings)
    stage2: SFTSettings = field(default_factory=SFTSettings)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, not {self.stage!r}")
        if (self.model_path is None) == (self.tiny_arch is None):
            raise ValueError("give exactly one of a model directory or a tiny architecture")
        if self.stage == "2" and self.model_path is None:
            raise ValueError("stage 2 alone starts from a trained (stage 1) model: give its directory")


def load_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSONL/Parquet/HF-dataset file; an unreadable record is an error naming it."""
    records = []
    for _label, record in read_records(path):
        if isinstance(record, RecordReadError):
            raise ValueError(f"{path}: {record}")
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def initial_model(plan: TrainPlan) -> tuple[Any, Any, list[str]]:
    """(model, tokenizer, notes): a tiny model built from scratch or a local checkpoint."""
    from memento.modeling import add_memento_tokens, build_tiny_model, load_model_and_tokenizer

    if plan.tiny_arch is not None:
        from memento.tiny_tokenizer import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer, arch=plan.tiny_arch, **plan.tiny_options)
        return model, tokenizer, [f"tiny {plan.tiny_arch} model built from scratch"]
    assert plan.model_path is not None
    model, tokenizer = load_model_and_tokenizer(plan.model_path)
    report = add_memento_tokens(tokenizer, model)
    return model, tokenizer, [str(report)] if report.num_added else []


def run_training(plan: TrainPlan, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Run the planned stages; return the best model directory of each stage run."""
    from transformers import AutoModelForCausalLM

    model, tokenizer, notes = initial_model(plan)
    for note in notes:
        log(note)
    train_records = load_records(plan.train_file)
    eval_records = load_records(plan.eval_file)
    # Every example is checked under the memento rule up front, whichever stage runs, so bad data
    # fails before any training with the record that is wrong.
    checker = make_collator(model, tokenizer, stage=2, settings=plan.stage2)
    max_length = plan.stage1.max_length or plan.stage2.max_length

    def examples(records: list[dict[str, Any]]):
        return prepare_examples(
            records, tokenizer, response_field=plan.response_field, max_length=max_length, check_with=checker
        )

    train_set, eval_set = examples(train_records), examples(eval_records)
    log(f"{len(train_set)} training and {len(eval_set)} validation examples ({plan.response_field})")
    out: dict[str, Path] = {}
    if plan.stage in ("1", "both"):
        log("stage 1: full causal attention")
        out["stage1"] = train_stage(
            model, tokenizer, train_set, eval_set, stage=1, stage_dir=plan.output_dir / "stage1", settings=plan.stage1
        )
        log(f"stage 1 best model: {out['stage1']}")
    if plan.stage in ("2", "both"):
        if "stage1" in out:
            impl = model.config._attn_implementation
            model = AutoModelForCausalLM.from_pretrained(out["stage1"], attn_implementation=impl)
        log("stage 2: memento mask" + (" (from stage 1's best model)" if "stage1" in out else ""))
        out["stage2"] = train_stage(
            model, tokenizer, train_set, eval_set, stage=2, stage_dir=plan.output_dir / "stage2", settings=plan.stage2
        )
        log(f"stage 2 best model: {out['stage2']}")
    return out
