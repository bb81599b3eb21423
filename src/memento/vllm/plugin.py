"""The ``vllm.general_plugins`` entry point: runs in every vLLM process before the model loads.

It refuses a vLLM version other than the one the backend is written against (the backend relies on
that version's scheduler and worker internals), and on CPUs with AMX asks the kernel for AMX state
before the worker's kernels use it: without that, bfloat16 in vLLM's multi-process mode dies with
SIGILL (measured: 7 of 8 runs on these machines; ../shared/vllm-notes.md). It also registers the
``memento`` reasoning parser (:mod:`memento.vllm.reasoning`, imported only when a server uses it).
"""

from __future__ import annotations

from memento.vllm import SUPPORTED_VLLM

REASONING_PARSER = "memento"
"""``--reasoning-parser memento``: :class:`memento.vllm.reasoning.MementoReasoningParser`."""


def check_version(installed: str) -> None:
    """A clear error for any vLLM but the pinned one."""
    if installed.split("+")[0] != SUPPORTED_VLLM:
        raise RuntimeError(
            f"memento's vLLM backend is written for vLLM {SUPPORTED_VLLM}; this environment has {installed}. "
            f"Install the pinned version: pip install 'memento[vllm]' (or make vllm-setup for the CPU build)."
        )


def register() -> None:
    """Called by vLLM in every process (the ``vllm.general_plugins`` entry point)."""
    import torch
    import vllm

    check_version(vllm.__version__)
    from vllm.reasoning import ReasoningParserManager

    ReasoningParserManager.register_lazy_module(REASONING_PARSER, "memento.vllm.reasoning", "MementoReasoningParser")
    init_amx = getattr(getattr(torch, "cpu", None), "_init_amx", None)
    if callable(init_amx):
        init_amx()
