"""The backend's settings and its start-up checks; no vLLM import at module level.

Settings travel in vLLM's own ``additional_config`` (``--additional-config '{"memento": {...}}'``),
so the scheduler process and every worker process read the same values. :func:`engine_args`
builds the keyword arguments that switch the backend on for ``vllm.LLM(...)`` / ``EngineArgs``;
:func:`serve_args` the matching ``vllm serve`` flags.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from memento.masking import MaskConfig

SCHEDULER_CLS = "memento.vllm.scheduler.MementoScheduler"
WORKER_CLS = "memento.vllm.worker.MementoCPUWorker"
CONFIG_KEY = "memento"
PLAN_ATTR = "memento_plan"
"""The ``SchedulerOutput`` attribute on which the scheduler hands each step's plan to the workers."""


@dataclass(frozen=True)
class MementoSettings:
    """The masking knobs (masking.py's, same defaults as the embedded engine) and the block cap."""

    keep_last_n: int = 0
    mask_delimiters: bool = False
    keep_last_block_for_answer: bool = False
    restart: bool = False
    require_assistant_section: bool = True
    assistant_prefix: tuple[int, ...] | None = None
    """Token ids that open the assistant turn; default: read off the tokenizer's chat template."""
    max_block_tokens: int | None = None
    """Force ``<|block_end|>`` once a block holds this many tokens (memento.vllm.logits)."""
    stop_on_format_error: bool | None = None
    """Stop a request whose memento structure breaks (default: when blocks are evicted)."""

    def __post_init__(self) -> None:
        self.mask_config()  # validates the mask knobs with masking.py's messages
        cap = self.max_block_tokens
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"max_block_tokens must be a positive integer, got {self.max_block_tokens!r}")

    def mask_config(self) -> MaskConfig:
        return MaskConfig(
            keep_last_n=self.keep_last_n,
            mask_delimiters=self.mask_delimiters,
            keep_last_block_for_answer=self.keep_last_block_for_answer,
            require_assistant_section=self.require_assistant_section,
            restart=self.restart,
        )

    @property
    def evicts(self) -> bool:
        return self.keep_last_n >= 0

    @property
    def strict(self) -> bool:
        """Whether a structure defect stops the request (else tracking stops at the defect)."""
        return self.evicts if self.stop_on_format_error is None else self.stop_on_format_error

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> MementoSettings:
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(
                f"unknown memento setting(s) {unknown} in additional_config['memento']; known: {sorted(known)}"
            )
        if raw.get("assistant_prefix") is not None:
            raw["assistant_prefix"] = tuple(int(t) for t in raw["assistant_prefix"])
        return cls(**raw)

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> MementoSettings:
        extra = getattr(vllm_config, "additional_config", None) or {}
        return cls.from_dict(extra.get(CONFIG_KEY) if isinstance(extra, dict) else None)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if v != getattr(MementoSettings, k)}
        if "assistant_prefix" in out:
            out["assistant_prefix"] = list(out["assistant_prefix"])
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
