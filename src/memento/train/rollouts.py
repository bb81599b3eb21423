"""Rollouts for RL from our engine (memento mode, physical KV eviction) and the reward that grades them.

:class:`EngineRollouts` is TRL's ``rollout_func``: TRL hands it the prompts of this process's
generation batch (each prompt repeated once per completion it wants) and the trainer; it samples
every completion with :class:`memento.engine.LLMEngine` on the policy's own weights (no copy, no
sync: the engine runs the model the optimizer updates), with the block-length cap on and per-token
log-probs returned. It also returns ``env_mask`` (TRL's name): 0 on the ``<|block_end|>`` tokens the
block cap forced. A forced token was not drawn from the policy, so it stays in the context (the
trainer scores the tokens after it with it there) but carries no policy gradient. A rollout the
engine stopped at a format error keeps all its tokens in the loss: the policy sampled each of them,
the defect included, and its reward (no answer: 0) is what teaches the format.

:class:`CorrectnessReward` grades the answer after ``</think>`` with :class:`memento.eval.grading.Grader`
(exact for synthetic tasks, math-verify for math): 1.0 right, 0.0 wrong or missing.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from memento.chat import chat_prompt
from memento.engine import EngineConfig, LLMEngine, SamplingParams
from memento.eval.grading import Grader, answer_text
from memento.eval.run import completion_structure
from memento.masking import CHAT_MEMENTO, MaskConfig


@dataclass
class RolloutSettings:
    """How rollouts are sampled (the paper: temperature 1.0, the block cap on)."""

    temperature: float = 1.0
    max_tokens: int = 512
    max_block_tokens: int | None = None
    mask: MaskConfig = CHAT_MEMENTO
    kv_budget_tokens: int | None = None  # default: every sequence at full length at once
    max_num_seqs: int = 64
    seed: int = 0
    chat: bool = True  # apply the tokenizer's chat template to each prompt


def group_prompts(prompts: Sequence[Any]) -> list[tuple[Any, int]]:
    """Runs of equal consecutive prompts as (prompt, count): one engine request with ``n=count`` each."""
    groups: list[tuple[Any, int]] = []
    for prompt in prompts:
        if groups and groups[-1][0] == prompt:
            groups[-1] = (prompt, groups[-1][1] + 1)
        else:
            groups.append((prompt, 1))
    return groups


class EngineRollouts:
    """TRL ``rollout_func``: ``(prompts, trainer) -> {prompt_ids, completion_ids, logprobs, env_mask, ...}``."""

    def __init__(self, tokenizer: Any, settings: RolloutSettings | None = None) -> None:
        self.tokenizer = tokenizer
        self.settings = settings or RolloutSettings()
        self.calls = 0

    def prompt_ids(self, prompt: str) -> list[int]:
        chat = self.settings.chat and getattr(self.tokenizer, "chat_template", None)
        text = chat_prompt(self.tokenizer, prompt) if chat else prompt
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, Any]:
        model = trainer.accelerator.unwrap_model(trainer.model)
        process = int(trainer.accelerator.process_index)
        out = self.generate(model, prompts, process_index=process)
        log_metric = getattr(trainer, "_log_metric", None)
        if log_metric is not None:
            for name, value in rollout_metrics(out).items():
                log_metric(name, value)
        return out

    def generate(self, model: Any, prompts: list[Any], *, process_index: int = 0) -> dict[str, Any]:
        """Sample one completion per entry of ``prompts`` (equal neighbours share a request)."""
        s = self.settings
        groups = group_prompts(prompts)
        encoded = [self.prompt_ids(p) for p, _ in groups]
        budget = s.kv_budget_tokens or min(len(prompts), s.max_num_seqs) * (s.max_tokens + max(map(len, encoded)))
        config = EngineConfig(
            kv_budget_tokens=budget, max_num_seqs=s.max_num_seqs, mask=s.mask, max_block_tokens=s.max_block_tokens
        )
        # Distinct, reproducible seeds per call, process and request: TRL spreads one prompt's
        # completions over processes, and equal seeds there would draw equal completions.
        rng = np.random.default_rng([s.seed, process_index, self.calls])
        self.calls += 1
        was_training = model.training
        try:
            engine = LLMEngine(model, self.tokenizer, config)
            ids = []
            for prompt_ids, (_, count) in zip(encoded, groups, strict=True):
                params = SamplingParams(
                    n=count,
                    temperature=s.temperature,
                    max_tokens=s.max_tokens,
                    logprobs=0,
                    seed=int(rng.integers(0, 2**62)),
                )
                ids.append(engine.add_request(prompt_ids, params))
            with torch.no_grad():
                done = {r.request_id: r for r in engine.run_to_completion()}
        finally:
            model.train(was_training)
        result: dict[str, list[Any]] = {
            key: []
            for key in (
                "prompt_ids",
                "completion_ids",
                "logprobs",
                "env_mask",
                "completion_text",
                "finish_reason",
                "peak_kv",
                "auc_kv",
                "vanilla_peak_kv",
                "blocks",
                "cap_forced",
            )
        }
        specials = engine.specials
        for prompt_ids, request_id in zip(encoded, ids, strict=True):
            for completion in done[request_id].outputs:
                tokens = list(completion.token_ids)
                keep = [1] * len(tokens)
                for index in completion.cap_forced:
                    keep[index] = 0
                result["prompt_ids"].append(list(prompt_ids))
                result["completion_ids"].append(tokens)
                result["logprobs"].append([float(x) for x in completion.logprobs or []])
                result["env_mask"].append(keep)
                result["completion_text"].append(completion.text or "")
                result["finish_reason"].append(completion.finish_reason)
                result["peak_kv"].append(completion.kv.peak)
                result["auc_kv"].append(completion.kv.auc)
                result["vanilla_peak_kv"].append(len(prompt_ids) + len(tokens) - 1 if tokens else 0)
                result["blocks"].append(len(completion_structure(tokens, specials).block_tokens))
                result["cap_forced"].append(len(completion.cap_forced))
        return result


def rollout_metrics(out: dict[str, Any]) -> dict[str, float]:
    """Per-generation means of the rollouts' KV and structure (logged each step)."""
    n = len(out["completion_ids"])
    if n == 0:
        return {}
    lengths = [len(c) for c in out["completion_ids"]]
    return {
        "rollout/peak_kv": statistics.mean(out["peak_kv"]),
        "rollout/auc_kv": statistics.mean(out["auc_kv"]),
        "rollout/vanilla_peak_kv": statistics.mean(out["vanilla_peak_kv"]),
        "rollout/blocks": statistics.mean(out["blocks"]),
        "rollout/response_tokens": statistics.mean(lengths),
        "rollout/cap_forced_per_response": statistics.mean(out["cap_forced"]),
        "rollout/format_error_fraction": sum(r == "format_error" for r in out["finish_reason"]) / n,
        "rollout/truncated_fraction": sum(r == "length" for r in out["finish_reason"]) / n,
    }


class CorrectnessReward:
    """1.0 when the answer after ``</think>`` is right, else 0.0 (a TRL reward function)."""

    __name__ = "correct"  # TRL names the reward's log columns after it

    def __init__(self, grader: str = "exact", timeout: float = 5.0) -> None:
        self.grader = Grader(grader, timeout)

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        answer: list[str],
        completion_text: list[str] | None = None,
        **_: Any,
    ) -> list[float]:
        # TRL's own decode drops special tokens (</think> with them); the engine's text keeps them.
        texts = completion_text if completion_text is not None else completions
        return [
            1.0 if self.grader.grade(answer_text(str(text)), str(gold)).correct else 0.0
            for text, gold in zip(texts, answer, strict=True)
        ]

    def close(self) -> None:
        self.grader.close()
