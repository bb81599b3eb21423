"""Run one model through the engine on a task set, once per mode, and grade every sample.

A *mode* is how the same model's KV is managed at inference: ``memento`` (keep_last_n=0: each
block evicted once its memento ends), ``vanilla`` (nothing evicted), ``keep-N`` (the N most recent
blocks kept) and ``restart`` (the ablation: a memento's KV recomputed without its block). Every
mode runs the same prompts with the same sampling settings and seeds, so differences between
modes are the KV policy's alone.

Each run records, per sample: the answer, whether it is right, its tokens, finish reason, live-KV
peak and AUC (measured by the engine at every decode step), the blocks and memento lengths it
wrote; and per run: pass@1 (with its 95% interval over problems) / pass@k / maj@k, each problem's
accuracy (for paired comparisons), throughput and the engine's counters.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from memento.chat import chat_prompt
from memento.engine import EngineConfig, LLMEngine, SamplingParams
from memento.eval.grading import Grader, answer_text
from memento.eval.metrics import accuracy_summary, kv_summary, pass_at_1_interval, problem_accuracies
from memento.eval.tasks import TaskSet
from memento.format import SpecialTokenIds
from memento.masking import MaskConfig


@dataclass(frozen=True)
class Mode:
    """A KV policy for the engine: masking.py's setting under its mode name (:attr:`MaskConfig.mode`)."""

    name: str
    mask: MaskConfig

    @classmethod
    def parse(cls, name: str, family_mask: MaskConfig | None = None) -> Mode:
        """``memento``, ``vanilla``, ``restart`` or ``keep-N`` (N >= 1), tracked from the assistant's turn.

        ``family_mask``: the model family's default (:func:`memento.families.default_mask`); a family
        that masks the delimiters (Phi-4) has them masked in its evicting modes (``memento`` reads
        ``memento+delimiters``), as it was trained. Restart evicts them anyway; vanilla evicts nothing.
        """
        mask = MaskConfig.from_mode(name, require_assistant_section=True)
        if family_mask is not None and family_mask.mask_delimiters and mask.evicts and not mask.restart:
            mask = replace(mask, mask_delimiters=True)
        return cls(mask.mode, mask)


GREEDY = SamplingParams(temperature=0.0, max_tokens=1024, seed=0)
"""Eval's default sampling: one greedy sample per problem, up to 1024 tokens, seed 0."""
_RECORDED_SAMPLING = ("temperature", "top_p", "top_k", "max_tokens", "seed")
"""The sampling knobs results.json always records (with ``samples``, ``n``)."""


@dataclass
class EvalSettings:
    """Sampling and engine settings shared by every mode of a run."""

    sampling: SamplingParams = field(default_factory=lambda: replace(GREEDY))
    """How each problem is sampled (``n`` samples); problem ``i`` draws from seed ``seed + i * n``
    (:meth:`problem_sampling`) in every mode, so a seed is required."""
    kv_budget_tokens: int | None = None
    """The KV pool in tokens (the same for every mode). None: room for ``max_num_seqs`` full requests."""
    max_num_seqs: int = 64
    max_block_tokens: int | None = None
    grader_timeout: float = 5.0
    ks: tuple[int, ...] = ()
    """k for pass@k / maj@k (default: ``samples``); pass@1 is always reported."""
    curves_kept: int = 4
    """Live-KV curves kept in the results (the first problems' first samples), for plots."""
    chat: bool = True
    """Wrap each problem in the tokenizer's chat template (as the models are trained)."""

    def __post_init__(self) -> None:
        if self.sampling.seed is None:
            raise ValueError("eval's sampling needs a seed: every mode samples each problem with the same one")
        bad = [k for k in self.ks if not 1 <= k <= self.samples]
        if bad:
            raise ValueError(f"k must be in 1..samples ({self.samples}), got {bad}")

    @property
    def samples(self) -> int:
        """Samples per problem (``sampling.n``)."""
        return self.sampling.n

    def problem_sampling(self, index: int) -> SamplingParams:
        """The sampling of the ``index``-th problem: :attr:`sampling` with that problem's own seed."""
        assert self.sampling.seed is not None
        return replace(self.sampling, seed=self.sampling.seed + index * self.samples)

    def results_settings(self) -> dict[str, Any]:
        """The settings as results.json records them: ``samples`` (``sampling.n``), the sampling
        knobs ``temperature``, ``top_p``, ``top_k``, ``max_tokens`` and ``seed`` (with any other
        :class:`SamplingParams` field set away from its default, e.g. ``stop``), then the rest but
        ``curves_kept``."""
        sampling, default = asdict(self.sampling), asdict(SamplingParams())
        recorded = {"samples": sampling.pop("n")}
        recorded |= {k: v for k, v in sampling.items() if k in _RECORDED_SAMPLING or v != default[k]}
        recorded |= {k: v for k, v in self.__dict__.items() if k not in ("sampling", "curves_kept")}
        return recorded


@dataclass
class Structure:
    """The memento structure a completion wrote: tokens per block and per memento."""

    block_tokens: list[int] = field(default_factory=list)
    memento_tokens: list[int] = field(default_factory=list)


def completion_structure(token_ids: list[int], specials: SpecialTokenIds) -> Structure:
    """Count the tokens inside each ``<|block_start|>..<|block_end|>`` and ``<|summary_start|>..<|summary_end|>``."""
    out = Structure()
    opened: tuple[str, int] | None = None
    for i, token in enumerate(token_ids):
        if token == specials.block_start:
            opened = ("block", i)
        elif token == specials.summary_start:
            opened = ("memento", i)
        elif opened and token in (specials.block_end, specials.summary_end):
            kind, start = opened
            if (kind == "block") == (token == specials.block_end):
                (out.block_tokens if kind == "block" else out.memento_tokens).append(i - start - 1)
            opened = None
    return out


def _prompt_ids(tokenizer: Any, text: str, chat: bool) -> list[int]:
    if chat and getattr(tokenizer, "chat_template", None):
        text = chat_prompt(tokenizer, text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def run_mode(
    model: Any,
    tokenizer: Any,
    task_set: TaskSet,
    mode: Mode,
    settings: EvalSettings,
    *,
    label: str,
    grader: Grader,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Generate ``settings.samples`` completions per problem under ``mode``; grade and measure them."""
    prompts = [_prompt_ids(tokenizer, p.prompt, settings.chat) for p in task_set.problems]
    budget = settings.kv_budget_tokens or settings.max_num_seqs * (
        settings.sampling.max_tokens + max(map(len, prompts))
    )
    engine = LLMEngine(
        model,
        tokenizer,
        EngineConfig(
            kv_budget_tokens=budget,
            max_num_seqs=settings.max_num_seqs,
            mask=mode.mask,
            max_block_tokens=settings.max_block_tokens,
        ),
    )
    ids = [engine.add_request(prompt, settings.problem_sampling(index)) for index, prompt in enumerate(prompts)]
    done: dict[str, Any] = {}
    total = len(ids) * settings.samples
    start = time.perf_counter()
    with _progress(f"{label} [{mode.name}]", total, show_progress) as advance:
        while engine.has_unfinished():
            for request in engine.step():
                done[request.request_id] = request
                advance(len(request.outputs))
    seconds = time.perf_counter() - start

    specials = engine.specials
    rows: list[dict[str, Any]] = []
    per_problem: list[list[tuple[str | None, bool]]] = []
    curves: list[dict[str, Any]] = []
    for problem, prompt, request_id in zip(task_set.problems, prompts, ids, strict=True):
        graded = []
        for out in done[request_id].outputs:
            answer = answer_text(out.text or "")
            grade = grader.grade(answer, problem.answer)
            structure = completion_structure(out.token_ids, specials)
            kv = kv_summary(out.kv.live_kv)
            n_out = len(out.token_ids)
            rows.append(
                {
                    "problem": problem.uid,
                    "sample": out.index,
                    "gold": problem.answer,
                    "answer": answer,
                    "key": grade.key,
                    "correct": grade.correct,
                    "grade_timed_out": grade.timed_out,
                    "finish_reason": out.finish_reason,
                    "prompt_tokens": len(prompt),
                    "tokens": n_out,
                    **kv,
                    # The same tokens with nothing evicted: the prompt plus every token so far.
                    "vanilla_peak_kv": len(prompt) + n_out - 1 if n_out else 0,
                    "vanilla_auc_kv": n_out * len(prompt) + n_out * (n_out - 1) // 2,
                    "evicted_tokens": out.kv.evicted_tokens,
                    "blocks": len(structure.block_tokens),
                    "block_tokens": structure.block_tokens,
                    "memento_tokens": structure.memento_tokens,
                }
            )
            graded.append((grade.key, grade.correct))
            if len(curves) < settings.curves_kept and out.index == 0:
                curves.append({"problem": problem.uid, "live_kv": list(out.kv.live_kv)})
        per_problem.append(graded)

    ks = settings.ks or (settings.samples,)
    generated = sum(r["tokens"] for r in rows)
    stats = engine.stats
    bytes_per_token = engine.geometry.bytes_per_token
    return {
        "label": label,
        "mode": asdict(mode),
        "problems": len(task_set.problems),
        "samples": settings.samples,
        "accuracy": accuracy_summary(per_problem, ks),
        "pass@1_ci95": list(pass_at_1_interval([[ok for _, ok in graded] for graded in per_problem])),
        "problem_accuracy": problem_accuracies([[ok for _, ok in graded] for graded in per_problem]),
        "mean_peak_kv": statistics.mean(r["peak_kv"] for r in rows),
        "mean_auc_kv": statistics.mean(r["auc_kv"] for r in rows),
        "mean_vanilla_peak_kv": statistics.mean(r["vanilla_peak_kv"] for r in rows),
        "mean_vanilla_auc_kv": statistics.mean(r["vanilla_auc_kv"] for r in rows),
        "bytes_per_token": bytes_per_token,
        "mean_tokens": statistics.mean(r["tokens"] for r in rows),
        "generated_tokens": generated,
        "seconds": seconds,
        "tokens_per_second": generated / seconds if seconds else 0.0,
        "finish_reasons": dict(Counter(r["finish_reason"] for r in rows)),
        "grading_timeouts": sum(r["grade_timed_out"] for r in rows),
        "engine": {
            "kv_budget_tokens": budget,
            "max_num_seqs": settings.max_num_seqs,
            "pool_peak_tokens": stats.peak_kv,
            "preemptions": stats.preemptions,
            "evictions": stats.evictions,
            "evicted_tokens": stats.evicted_tokens,
            "decode_steps": stats.decode_steps,
        },
        "curves": curves,
        "rows": rows,
    }


def evaluate_model(
    model: Any,
    tokenizer: Any,
    task_set: TaskSet,
    modes: list[Mode],
    settings: EvalSettings,
    *,
    label: str,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Every mode on the same model, prompts and seeds; one result per mode."""
    with Grader(task_set.grader, timeout=settings.grader_timeout) as grader:
        return [
            run_mode(
                model, tokenizer, task_set, mode, settings, label=label, grader=grader, show_progress=show_progress
            )
            for mode in modes
        ]


def load_model(model_dir: str, dtype: str = "float32") -> tuple[Any, Any]:
    """An HF checkpoint and its tokenizer, ready for the engine (SDPA attention, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, attn_implementation="sdpa").eval()
    return model, tokenizer


class _progress:
    """A rich progress bar over finished samples (or nothing when it is switched off)."""

    def __init__(self, description: str, total: int, enabled: bool) -> None:
        self.description, self.total, self.enabled = description, total, enabled
        self._bar: Any = None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
        )
        self._bar.start()
        task = self._bar.add_task(self.description, total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
