"""RL with CISPO on block-masked rollouts (`memento rl`): the paper's third stage, on TRL's GRPOTrainer.

Pinned: ``trl==1.16.0`` (the methods overridden below are private to TRL and change between versions).

What is TRL's and what is ours:

* **Rollouts** come from our engine through TRL's ``rollout_func``
  (:class:`memento.train.rollouts.EngineRollouts`): G completions per prompt, memento mode with
  physical KV eviction, the block cap on, temperature 1.0, per-token log-probs returned.
* **Rewards**: :class:`memento.train.rollouts.CorrectnessReward` (eval's graders). **Advantages**:
  TRL's, with ``scale_rewards="batch"``: reward minus its group's mean, divided by the std over the
  whole batch, as the paper does.
* **Scoring**: TRL's ``_get_per_token_logps_and_entropies`` runs the model with a causal 2D mask; we
  override that one method so the old, reference and current passes all score the exact context the
  sampler saw (:func:`memento.train.scoring.completion_logprobs`: masking.py's mask, logical
  position ids, no padding shift). At step 0 the trainer's log-probs equal the engine's sampling
  log-probs (tested to 1e-4 in float32), so every importance ratio starts at 1.
* **Loss**: ``clip="two_sided"`` (default) overrides ``_compute_loss`` with the paper's CISPO
  (:mod:`memento.train.cispo`: weight clipped to [1 - eps_low, 1 + eps_high] and stop-gradiented,
  every token keeps its gradient, KL beta 0.001, divided by the batch's loss-token count).
  ``clip="trl"`` keeps TRL's ``loss_type="cispo"``, which caps the weight from above only, at an
  absolute ``epsilon_high`` (ScaleRL's 5.0).
* **Forced tokens**: ``<|block_end|>`` tokens the block cap forced get no policy gradient (TRL's
  ``env_mask``, see :mod:`memento.train.rollouts`); format-error rollouts stay in, reward 0.

Each run directory holds HF checkpoints (``checkpoint-N``, resumed from the newest when rerun),
``log.jsonl`` (one line per step: reward, accuracy, KL, clip fractions both sides, response
length, blocks, peak and AUC live KV of the rollouts), ``curves.png`` and ``final/`` (HF model and
tokenizer).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from memento.chat import tracked_prefix
from memento.format import SpecialTokenIds
from memento.masking import CHAT_MEMENTO, MaskConfig, check_block_cap
from memento.train.cispo import cispo_loss
from memento.train.rollouts import CorrectnessReward, EngineRollouts, RolloutSettings
from memento.train.scoring import completion_logprobs
from memento.train.sft import LOG_FILE, QuietTiedKeys, jsonl_log_callback
from memento.train.sft import read_log as read_rl_log

FINAL_DIR = "final"
CURVES_FILE = "curves.png"
SUMMARY_FILE = "memento_rl.json"
CLIP_MODES = ("two_sided", "trl")


@dataclass
class RLSettings:
    """RL hyper-parameters. Defaults follow the paper (section 5 of docs/paper notes) where a tiny
    CPU run can afford them; ``prompts_per_step`` is 240 in the paper."""

    steps: int = 100
    num_generations: int = 8  # G completions per prompt
    prompts_per_step: int = 8  # prompts per optimizer step, over all processes
    batch_size: int = 8  # completions per forward/backward pass and process
    steps_per_generation: int = 1  # optimizer steps fed by one generation (> 1: off-policy, clipping matters)
    num_iterations: int = 1  # passes over each generation
    learning_rate: float = 1e-6
    lr_scheduler: str = "constant_with_warmup"
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    beta: float = 0.001
    clip: str = "two_sided"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2  # with clip="trl": TRL's absolute cap (ScaleRL recommends 5.0)
    temperature: float = 1.0
    max_tokens: int = 512
    max_block_tokens: int | None = 7168  # the paper's 7K block cap; None: off
    mask: MaskConfig = CHAT_MEMENTO
    kv_budget_tokens: int | None = None
    max_num_seqs: int = 64
    grader: str = "exact"
    save_steps: int = 25
    save_total_limit: int = 2
    logging_steps: int = 1
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # passed on to GRPOConfig

    def __post_init__(self) -> None:
        if self.clip not in CLIP_MODES:
            raise ValueError(f"clip must be one of {CLIP_MODES}, not {self.clip!r}")
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (a group needs a baseline), got {self.num_generations}")
        for name in ("steps", "prompts_per_step", "batch_size", "steps_per_generation", "num_iterations", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.epsilon_low < 1 or self.epsilon_high < 0:
            eps = f"{self.epsilon_low}, {self.epsilon_high}"
            raise ValueError(f"need 0 <= epsilon_low < 1 and epsilon_high >= 0, got {eps}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        check_block_cap(self.max_block_tokens)

    def grad_accum(self, num_processes: int) -> int:
        """Micro-batches per optimizer step on each process; the batch must split evenly."""
        completions = self.prompts_per_step * self.num_generations
        per_pass = self.batch_size * num_processes
        if completions % per_pass:
            raise ValueError(
                f"{self.prompts_per_step} prompts x {self.num_generations} completions = {completions} per step "
                f"do not split into micro-batches of {self.batch_size} on {num_processes} process(es)"
            )
        return completions // per_pass

    def rollout_settings(self) -> RolloutSettings:
        return RolloutSettings(
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            max_block_tokens=self.max_block_tokens,
            mask=self.mask,
            kv_budget_tokens=self.kv_budget_tokens,
            max_num_seqs=self.max_num_seqs,
            seed=self.seed,
        )


def _metric_mean(trainer: Any, total: float, count: float) -> float:
    """A token-weighted mean over every process."""
    stats = torch.tensor([total, count], dtype=torch.float64, device=trainer.accelerator.device)
    total, count = trainer.accelerator.reduce(stats, reduction="sum").tolist()
    return total / count if count else 0.0


def _trainer_class():
    """``GRPOTrainer`` scoring under the memento mask, with the paper's CISPO (imported lazily: TRL is slow to load)."""
    from trl import GRPOTrainer

    class MementoGRPOTrainer(QuietTiedKeys, GRPOTrainer):
        """GRPOTrainer whose log-probs see what the sampler saw; see :mod:`memento.train.rl`."""

        def __init__(self, *args: Any, rl_settings: RLSettings, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.rl_settings = rl_settings
            tokenizer = self.processing_class
            self.memento_specials = SpecialTokenIds.from_tokenizer(tokenizer)
            self.memento_mask = rl_settings.mask
            self.memento_prefix = tracked_prefix(rl_settings.mask, None, tokenizer)

        def _get_per_token_logps_and_entropies(
            self,
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            batch_size=None,
            compute_entropy=False,
            compute_aux_loss=False,
            **multimodal: Any,
        ):
            """TRL's inputs are [left-padded prompt | right-padded completion]; each row is cut back
            to its real tokens and scored under the memento mask (see the module docstring)."""
            if any(v is not None for v in multimodal.values()):
                raise ValueError("memento RL scores text-only models")
            prompt_width = input_ids.size(1) - logits_to_keep
            rows = []
            for b in range(input_ids.size(0)):
                prompt = input_ids[b, :prompt_width][attention_mask[b, :prompt_width].bool()].tolist()
                completion = input_ids[b, prompt_width:][attention_mask[b, prompt_width:].bool()].tolist()
                rows.append((prompt, completion))
            step = batch_size or len(rows)
            logps, entropies = [], []
            for start in range(0, len(rows), step):
                chunk = rows[start : start + step]
                with self.accelerator.autocast():
                    lp, ent = completion_logprobs(
                        model,
                        [p for p, _ in chunk],
                        [c for _, c in chunk],
                        specials=self.memento_specials,
                        mask=self.memento_mask,
                        assistant_prefix=self.memento_prefix,
                        pad_token_id=int(self.processing_class.pad_token_id or 0),
                        temperature=self.temperature,
                        compute_entropy=compute_entropy,
                    )
                logps.append(_to_width(lp, logits_to_keep))
                if ent is not None:
                    entropies.append(_to_width(ent, logits_to_keep))
            return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None

        def _compute_loss(self, model, inputs):
            if self.rl_settings.clip == "trl":
                return super()._compute_loss(model, inputs)
            return self._paper_cispo_loss(model, inputs)

        def _paper_cispo_loss(self, model, inputs):
            settings = self.rl_settings
            prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
            completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
            input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
            attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
            mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
            logps, entropies, _ = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True
            )
            old = inputs.get("old_per_token_logps")
            on_policy = old is None
            old = logps.detach() if old is None else old
            # TRL's normaliser for token-level losses: the loss tokens of one accumulation window here.
            mode = "train" if self.model.training else "eval"
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            loss, stats = cispo_loss(
                logps,
                old,
                inputs["advantages"],
                mask,
                eps_low=settings.epsilon_low,
                eps_high=settings.epsilon_high,
                ref_logps=inputs.get("ref_per_token_logps"),
                beta=self.beta,
                normalizer=normalizer,
            )
            metrics = self._metrics[mode]
            tokens = stats.tokens
            metrics["clip_ratio/low"].append(_metric_mean(self, stats.clipped_low, tokens))
            metrics["clip_ratio/high"].append(_metric_mean(self, stats.clipped_high, tokens))
            metrics["kl"].append(_metric_mean(self, stats.kl_sum, tokens))
            live = mask.bool()
            metrics["entropy"].append(_metric_mean(self, float(entropies.detach()[live].sum()), tokens))
            sampled = inputs.get("sampling_per_token_logps")
            if on_policy and sampled is not None and live.any():
                # The policy has not moved since it sampled these: the sampler's and the trainer's
                # log-probs must agree (the memento mask at work; a causal mask would not).
                gap = (logps.detach() - sampled).abs()[live].max()
                metrics["sampler_logp_gap_max"].append(
                    float(self.accelerator.reduce(gap.reshape(1), reduction="max").item())
                )
            return loss

    return MementoGRPOTrainer


def _to_width(x: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad (or cut) the token axis to ``width`` columns."""
    if x.size(1) >= width:
        return x[:, :width]
    return torch.nn.functional.pad(x, (0, width - x.size(1)))


@contextlib.contextmanager
def _quiet_deprecations() -> Iterator[None]:
    """Silence the transformers deprecations TRL 1.16 triggers on every config and step (``gradient_checkpointing``
    renamed): not ours to fix, and nothing the user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*", category=FutureWarning)
        yield


def grpo_config(out_dir: Path, settings: RLSettings, num_processes: int):
    """TRL's GRPOConfig from our settings."""
    from trl import GRPOConfig

    grad_accum = settings.grad_accum(num_processes)
    extra = dict(settings.extra)
    return GRPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=grad_accum,
        steps_per_generation=grad_accum * settings.steps_per_generation,
        num_iterations=settings.num_iterations,
        num_generations=settings.num_generations,
        max_steps=settings.steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        beta=settings.beta,
        loss_type="cispo",
        epsilon=settings.epsilon_low,
        epsilon_high=settings.epsilon_high,
        scale_rewards="batch",
        temperature=settings.temperature,
        max_completion_length=settings.max_tokens,
        mask_truncated_completions=False,
        disable_dropout=True,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        report_to=[],
        seed=settings.seed,
        data_seed=settings.seed,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        log_completions=False,
        **extra,
    )


def prompt_dataset(problems: Sequence[Mapping[str, str]]):
    """``datasets.Dataset`` of {prompt, answer} (the problem text; the chat template is the rollouts' job)."""
    from datasets import Dataset

    rows = []
    for index, problem in enumerate(problems):
        for name in ("prompt", "answer"):
            if name not in problem:
                raise KeyError(f"problem {index} has no field {name!r}")
        rows.append({"prompt": str(problem["prompt"]), "answer": str(problem["answer"])})
    if not rows:
        raise ValueError("no RL prompts")
    return Dataset.from_list(rows)


def train_rl(
    model_dir: str | Path,
    problems: Sequence[Mapping[str, str]],
    out_dir: str | Path,
    settings: RLSettings | None = None,
    *,
    resume: bool = True,
    show_progress: bool = True,
    reward_funcs: Sequence[Callable[..., list[float]]] | None = None,
) -> Path:
    """RL from a memento SFT checkpoint on ``problems`` ({prompt, answer}); returns ``out_dir/final``.

    ``reward_funcs`` replace the correctness reward (TRL's reward-function signature: prompts,
    completions and every dataset column and rollout field as keyword lists; the rollouts' fields
    include ``completion_text``, the completion with its special tokens).
    """
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_utils import get_last_checkpoint

    settings = settings or RLSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} is not an HF checkpoint (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    # cpu=True where there is no GPU: without it accelerate sees no distributed setup under torchrun on CPUs
    num_processes = PartialState(cpu=not torch.cuda.is_available()).num_processes
    with _quiet_deprecations():
        args = grpo_config(out_dir, settings, num_processes)
    if not show_progress:
        args.disable_tqdm = True
    reward = CorrectnessReward(settings.grader)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL: we pin it
    trainer = _trainer_class()(
        model=model,
        reward_funcs=list(reward_funcs) if reward_funcs else [reward],
        args=args,
        train_dataset=prompt_dataset(problems),
        processing_class=tokenizer,
        rollout_func=EngineRollouts(tokenizer, settings.rollout_settings()),
        callbacks=[jsonl_log_callback(out_dir / LOG_FILE, stage=3)],
        rl_settings=settings,
    )
    last = get_last_checkpoint(str(out_dir)) if resume and any(out_dir.glob("checkpoint-*")) else None
    start = time.monotonic()
    try:
        with _quiet_deprecations():
            result = trainer.train(resume_from_checkpoint=last)
    finally:
        reward.close()
    final = out_dir / FINAL_DIR
    trainer.save_model(str(final))
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(str(final))
        summary = {
            "initialised_from": str(model_dir),
            "resumed_from": last,
            "global_step": trainer.state.global_step,
            "train_runtime_s": result.metrics.get("train_runtime"),
            "wall_s": round(time.monotonic() - start, 1),
            "num_processes": num_processes,
            "settings": {k: v for k, v in asdict(settings).items() if k != "extra"},
        }
        (final / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        log = read_rl_log(out_dir)
        if log:
            plot_curves(log, out_dir / CURVES_FILE)
    return final


CURVES = (
    ("reward", "rewards/correct/mean", "accuracy (reward)"),
    ("kl", "kl", "KL to the reference"),
    ("clip", ("clip_ratio/low", "clip_ratio/high"), "clipped fraction (low, high)"),
    ("length", "rollout/response_tokens", "response tokens"),
    ("blocks", "rollout/blocks", "blocks per response"),
    ("kv", ("rollout/peak_kv", "rollout/auc_kv"), "peak KV, AUC KV (tokens)"),
)


def plot_curves(log: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """A PNG with one panel per curve of the run (steps on x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (_, keys, title) in zip(axes.flat, CURVES, strict=True):
        keys = (keys,) if isinstance(keys, str) else keys
        for key in keys:
            points = [(e["step"], e[key]) for e in log if key in e]
            if points:
                xs, ys = zip(*points, strict=True)
                if key == "rollout/auc_kv":
                    ax2 = ax.twinx()
                    ax2.plot(xs, ys, color="tab:orange", label=key)
                    ax2.set_ylabel("AUC (token-steps)")
                else:
                    ax.plot(xs, ys, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
