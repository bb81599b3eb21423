"""Two-stage memento SFT on the HF Trainer.

Stage 1 trains with full causal attention (the model learns the format); stage 2 starts from
stage 1's best checkpoint by validation loss and trains with the memento mask (the model learns to
rely on its mementos). Loss is on completion tokens only. Each stage writes HF checkpoints to its
own directory, resumes from the newest checkpoint there if interrupted, logs every logging step to
``log.jsonl``, and saves its best model to ``<stage dir>/best`` (HF format, tokenizer included).

The code takes any HF causal LM whose attention can take a 4D mask (sdpa, eager); the same code
trains the tiny demo models and a real Qwen3 / Llama / Phi / Olmo checkpoint.

Under ``accelerate launch`` / ``torchrun`` (several processes: DDP, over gloo on CPUs; FSDP from
an accelerate config on GPUs, not tested here) the Trainer shards each global batch across the
processes (``batch_size`` is per process) and averages the loss over the completion tokens of the
whole global batch, so a run on N processes with ``batch_size`` B follows the same losses as one
process with N x B. Only the main process writes the log, the best model's tokenizer and the
summary, and every process waits for them before going on (stage 2 reads stage 1's best model).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from memento.chat import tracked_prefix
from memento.format import SpecialTokenIds
from memento.masking import CHAT_MEMENTO, MaskConfig
from memento.modeling import check_attention_implementation, layer_windows
from memento.train.collate import MementoCollator, tokenize_example

BEST_DIR = "best"
LOG_FILE = "log.jsonl"
SUMMARY_FILE = "memento_training.json"


@dataclass
class SFTSettings:
    """Hyper-parameters of one stage (paper defaults where they make sense for a real model)."""

    learning_rate: float = 8e-5
    lr_scheduler: str = "cosine"  # any transformers scheduler name, e.g. constant_with_warmup
    epochs: float = 5.0
    max_steps: int = -1
    batch_size: int = 16
    eval_batch_size: int = 32
    grad_accum: int = 1
    warmup: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_steps: int = 50
    logging_steps: int = 10
    save_total_limit: int = 2
    seed: int = 42
    max_length: int | None = None
    mask: MaskConfig = CHAT_MEMENTO
    """Stage 2's mask (stage 1 is full causal attention)."""
    extra: dict[str, Any] = field(default_factory=dict)  # passed on to TrainingArguments


def prepare_examples(
    records: Iterable[Mapping[str, Any]],
    tokenizer: Any,
    *,
    response_field: str = "response",
    max_length: int | None = None,
    check_with: MementoCollator | None = None,
):
    """Tokenise records (``problem`` + ``response_field``) into a ``datasets.Dataset``.

    With ``check_with``, every example's visibility is decided once here, so a malformed trace
    fails before training starts, naming its record.
    """
    from datasets import Dataset

    rows = []
    for index, record in enumerate(records):
        for name in ("problem", response_field):
            if name not in record:
                raise KeyError(f"record {index} has no field {name!r}")
        example = tokenize_example(tokenizer, record["problem"], record[response_field], max_length=max_length)
        if check_with is not None:
            check_with.visibility(torch.as_tensor(example["input_ids"]).numpy(), index=index)
        rows.append(example)
    if not rows:
        raise ValueError("no training examples")
    return Dataset.from_list(rows)


def is_main_process() -> bool:
    """True except in the processes other than rank 0 of a multi-process launch (``RANK`` is set by
    torchrun and ``accelerate launch``), for console output before the Trainer exists."""
    return int(os.environ.get("RANK", "0")) == 0


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 for a plain run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_collator(model: Any, tokenizer: Any, stage: int, settings: SFTSettings) -> MementoCollator:
    """The collator for a stage: stage 1 causal, stage 2 the memento mask in the model's form."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, not {stage!r}")
    impl = check_attention_implementation(model)
    specials = SpecialTokenIds.from_tokenizer(tokenizer)
    config = settings.mask if stage == 2 else None
    prefix = tracked_prefix(config, None, tokenizer) if config is not None else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dtype = next(model.parameters()).dtype
    return MementoCollator(
        specials=specials,
        pad_token_id=int(pad),
        mask_config=config,
        attn_implementation=impl,
        assistant_prefix=prefix,
        mask_dtype=dtype,
        windows=layer_windows(model),
    )


class JsonlLogCallback:
    """Appends every Trainer log (loss, eval_loss, learning rate, ...) to a JSONL file."""

    def __init__(self, path: Path, stage: int) -> None:
        self.path = path
        self.stage = stage
        self.start = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and getattr(state, "is_world_process_zero", True):  # one writer under multi-process training
            entry = {"stage": self.stage, "step": state.global_step, "epoch": state.epoch}
            entry["elapsed_s"] = round(time.monotonic() - self.start, 2)
            entry.update({k: v for k, v in logs.items() if isinstance(v, int | float)})
            with self.path.open("a") as fh:
                fh.write(json.dumps(entry) + "\n")
        return control


def jsonl_log_callback(path: Path, stage: int):
    """A TrainerCallback writing every log to ``path`` (stage 3: RL)."""
    from transformers import TrainerCallback

    class _Logger(JsonlLogCallback, TrainerCallback):
        pass

    return _Logger(path, stage)


def tied_keys_restored(model: Any, missing_keys: Iterable[str]) -> list[str]:
    """The keys of ``missing_keys`` that are tied to a loaded weight (the same tensor), so not missing.

    A model with tied embeddings saves ``lm_head.weight`` once, as ``model.embed_tokens.weight``
    (safetensors refuses shared tensors); loading that file back with ``strict=False`` reports the
    head as missing although it *is* the embedding it is tied to.
    """
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    params = dict(model.named_parameters(remove_duplicate=False))
    return [
        key
        for key in missing_keys
        if key in tied and key in params and tied[key] in params and params[key] is params[tied[key]]
    ]


class QuietTiedKeys:
    """Trainer mixin: no false alarm about tied weights when a checkpoint is reloaded.

    With ``load_best_model_at_end`` (or a resume) the Trainer reloads a checkpoint's state dict and
    warns "There were missing keys in the checkpoint model loaded: ['lm_head.weight']" for every
    model with tied embeddings (the tiny models, Qwen3-0.6B...), which a user reads as a broken
    model. Keys that are tied to a loaded weight are not missing: they are dropped from the warning;
    any other missing or unexpected key is still reported.
    """

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        restored = set(tied_keys_restored(self.model, load_result.missing_keys))
        if restored:
            missing = [key for key in load_result.missing_keys if key not in restored]
            load_result = load_result._replace(missing_keys=missing)
        super()._issue_warnings_after_load(load_result)  # type: ignore[misc]


def _trainer_class():
    """The HF Trainer with :class:`QuietTiedKeys`."""
    from transformers import Trainer

    class MementoTrainer(QuietTiedKeys, Trainer):
        pass

    return MementoTrainer


def train_stage(
    model: Any,
    tokenizer: Any,
    train_dataset: Any,
    eval_dataset: Any,
    *,
    stage: int,
    stage_dir: str | Path,
    settings: SFTSettings,
) -> Path:
    """Train one stage; return the directory of its best model (by validation loss)."""
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    collator = make_collator(model, tokenizer, stage, settings)
    cpu = not torch.cuda.is_available()
    distributed = {
        # several processes without a GPU (accelerate launch / torchrun on CPUs): DDP over gloo, not
        # MPI even where torch has it (accelerate's pick); set only then, as transformers takes any
        # ddp_backend for a distributed run
        "ddp_backend": "gloo" if cpu and launched_processes() > 1 else None,
        # every parameter of a causal LM takes part in each forward pass: no extra autograd traversal
        "ddp_find_unused_parameters": False,
    }
    args = TrainingArguments(
        output_dir=str(stage_dir),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup,
        weight_decay=settings.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=settings.max_grad_norm,
        eval_strategy="steps",
        eval_steps=settings.eval_steps,
        save_strategy="steps",
        save_steps=settings.eval_steps,
        save_total_limit=settings.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        prediction_loss_only=True,
        remove_unused_columns=False,
        label_names=["labels"],
        report_to=[],
        seed=settings.seed,
        dataloader_num_workers=0,
        use_cpu=cpu,
        **{**distributed, **settings.extra},
    )
    trainer = _trainer_class()(
        model,
        args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=[jsonl_log_callback(stage_dir / LOG_FILE, stage)],
    )
    last = get_last_checkpoint(str(stage_dir)) if any(stage_dir.glob("checkpoint-*")) else None
    result = trainer.train(resume_from_checkpoint=last)
    best_dir = stage_dir / BEST_DIR
    trainer.save_model(str(best_dir))  # every process (FSDP gathers the weights), the main one writes
    processes = trainer.accelerator.num_processes
    summary = {
        "stage": stage,
        "attention": "full causal" if stage == 1 else "memento mask",
        "mask_config": asdict(settings.mask) if stage == 2 else None,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_eval_loss": trainer.state.best_metric,
        "global_step": trainer.state.global_step,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "resumed_from": last,
        "initialised_from": getattr(model, "name_or_path", None) or None,
        "num_processes": processes,
        "global_batch_size": settings.batch_size * settings.grad_accum * processes,
        "settings": {k: v for k, v in asdict(settings).items() if k != "extra"},
    }
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(best_dir))
        (best_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    trainer.accelerator.wait_for_everyone()  # the best model is complete before any process reads it
    return best_dir


def read_log(stage_dir: str | Path) -> list[dict[str, Any]]:
    """The JSONL log of a stage (for curves and reports)."""
    path = Path(stage_dir) / LOG_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
