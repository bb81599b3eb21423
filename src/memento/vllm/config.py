"""The backend's settings and its start-up checks; no vLLM import at module level.

Settings travel in vLLM's own ``additional_config`` (``--additional-config '{"memento": {...}}'``),
so the scheduler process and every worker process read the same values. :func:`engine_args`
builds the keyword arguments that switch the backend on for ``vllm.LLM(...)`` / ``EngineArgs``;
:func:`serve_args` the matching ``vllm serve`` flags.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from memento.masking import CHAT_MEMENTO, MASK_KNOBS, MaskConfig, check_block_cap

SCHEDULER_CLS = "memento.vllm.scheduler.MementoScheduler"
WORKER_CLS = "memento.vllm.worker.MementoWorker"
"""The platform's memento worker: the CPU worker on vLLM's CPU build, the GPU worker on CUDA."""
CONFIG_KEY = "memento"
PLAN_ATTR = "memento_plan"
"""The ``SchedulerOutput`` attribute on which the scheduler hands each step's plan to the workers."""


@dataclass(frozen=True)
class MementoSettings:
    """The mask (masking.py's :class:`MaskConfig`, same default as the embedded engine) and the block cap.

    In ``additional_config["memento"]`` the mask knobs are flat keys beside the others
    (``{"keep_last_n": 1, "max_block_tokens": 64}``): :meth:`from_dict` / :meth:`to_dict`.
    """

    mask: MaskConfig = CHAT_MEMENTO
    assistant_prefix: tuple[int, ...] | None = None
    """Token ids that open the assistant turn; default: read off the tokenizer's chat template."""
    max_block_tokens: int | None = None
    """Force ``<|block_end|>`` once a block holds this many tokens (memento.vllm.logits)."""
    stop_on_format_error: bool | None = None
    """Stop a request whose memento structure breaks (default: :meth:`MaskConfig.stops_on_format_error`)."""

    def __post_init__(self) -> None:
        if not isinstance(self.mask, MaskConfig):
            raise ValueError(f"mask must be a MaskConfig, not {type(self.mask).__name__}")
        check_block_cap(self.max_block_tokens)

    @property
    def strict(self) -> bool:
        """Whether a structure defect stops the request (else tracking stops at the defect)."""
        return self.mask.stops_on_format_error(self.stop_on_format_error)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> MementoSettings:
        mask, rest = CHAT_MEMENTO.split_knobs(dict(raw or {}))
        rest.pop("mask", None)
        known = [f.name for f in fields(cls) if f.name != "mask"]
        unknown = sorted(set(rest) - set(known))
        if unknown:
            raise ValueError(
                f"unknown memento setting(s) {unknown} in additional_config['memento']; "
                f"known: {sorted([*known, *MASK_KNOBS])}"
            )
        if rest.get("assistant_prefix") is not None:
            rest["assistant_prefix"] = tuple(int(t) for t in rest["assistant_prefix"])
        return cls(mask=mask, **rest)

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> MementoSettings:
        extra = getattr(vllm_config, "additional_config", None) or {}
        return cls.from_dict(extra.get(CONFIG_KEY) if isinstance(extra, dict) else None)

    def to_dict(self) -> dict[str, Any]:
        """The settings that differ from the defaults, flat (the JSON form :meth:`from_dict` reads)."""
        out: dict[str, Any] = self.mask.changed_knobs(CHAT_MEMENTO)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "mask" and value != f.default:
                out[f.name] = list(value) if f.name == "assistant_prefix" else value
        return out


def names_subclass(spec: Any, qualname: str) -> bool:
    """Whether ``spec`` (a class or a dotted name, as vLLM takes class settings) is or subclasses ``qualname``."""
    if spec == qualname:
        return True
    try:
        from vllm.utils.import_utils import resolve_obj_by_qualname

        cls = resolve_obj_by_qualname(spec) if isinstance(spec, str) else spec
        base = resolve_obj_by_qualname(qualname)
    except Exception:
        return False
    return isinstance(cls, type) and issubclass(cls, base)


def check_worker_config(vllm_config: Any) -> None:
    """What a memento worker refuses before it builds anything, with what to change.

    The V2 model runner has neither of the two methods the runner overrides, and the worker needs
    the memento scheduler, which plans the compactions (the scheduler refuses the rest: prefix
    caching, async scheduling, speculative decoding, pipeline parallelism).
    """
    if getattr(vllm_config, "use_v2_model_runner", False):
        raise ValueError("memento's vLLM backend runs on vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0")
    scheduler = vllm_config.scheduler_config.scheduler_cls
    if not names_subclass(scheduler, SCHEDULER_CLS):
        raise ValueError(
            f"memento's vLLM backend cannot start: scheduler_cls is {scheduler!r}; the memento worker needs "
            f"the memento scheduler (scheduler_cls={SCHEDULER_CLS!r}, or --scheduler-cls {SCHEDULER_CLS})"
        )


def kv_groups_problem(groups: Any) -> str | None:
    """Why the backend cannot evict from these KV-cache groups, or None when it can.

    Sliding-window layers arrive as full-attention specs with their window kept (the memento
    runner's ``get_kv_cache_spec``); anything else (chunked-local, Mamba, MLA, cross-attention) has no
    memento rule, and several groups would need one page list per group.
    """
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    if len(groups) == 1 and type(groups[0].kv_cache_spec) is FullAttentionSpec:
        return None
    kinds = sorted({type(g.kv_cache_spec).__name__ for g in groups})
    return (
        f"the model's KV cache has groups {kinds}: only models whose layers use full or sliding-window "
        "attention are supported (no chunked-local, mamba or MLA layers)"
    )


def engine_args(settings: MementoSettings | None = None, **vllm_kwargs: Any) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` / ``EngineArgs`` that run the memento backend.

    ``vllm_kwargs`` pass through (model, dtype, ...); ``additional_config`` is merged.
    """
    settings = settings or MementoSettings()
    additional = dict(vllm_kwargs.pop("additional_config", None) or {})
    additional[CONFIG_KEY] = settings.to_dict()
    return {
        "scheduler_cls": SCHEDULER_CLS,
        "worker_cls": WORKER_CLS,
        "enable_prefix_caching": False,
        "async_scheduling": False,
        "additional_config": additional,
        **vllm_kwargs,
    }


def serve_args(settings: MementoSettings | None = None) -> list[str]:
    """The ``vllm serve`` flags that run the memento backend."""
    settings = settings or MementoSettings()
    return [
        "--scheduler-cls",
        SCHEDULER_CLS,
        "--worker-cls",
        WORKER_CLS,
        "--no-enable-prefix-caching",
        "--no-async-scheduling",
        "--additional-config",
        json.dumps({CONFIG_KEY: settings.to_dict()}),
    ]
