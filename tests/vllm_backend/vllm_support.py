"""Test support for the vLLM backend: teacher forcing through decode, and reading the engine's state.

:class:`ForcedTokens` is a logits processor that allows only the given token.

vLLM returns logprobs computed from the raw logits (``logprobs_mode="raw_logprobs"``, the
default), before any logits processor, so forcing the sampled token leaves the reported
distribution untouched: the full-vocabulary logprobs of every forced step are the model's own,
which the consistency tests compare with the dense-mask reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

FORCE = "force_tokens"


class ForcedTokens(LogitsProcessor):
    """``SamplingParams(extra_args={"force_tokens": [...]})``: output token i is forced to the i-th id."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, tuple[list[int], Sequence[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def new_row(params: SamplingParams, prompt: list[int] | None, output: list[int]):
            forced = (params.extra_args or {}).get(FORCE)
            return (list(forced), output) if forced else None

        process_dict_updates(self.rows, batch_update, new_row)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, (forced, output) in self.rows.items():
            if len(output) < len(forced):
                token = forced[len(output)]
                logits[row].fill_(float("-inf"))
                logits[row, token] = 0.0
        return logits


def scheduler_of(llm):
    """The in-process engine core's scheduler."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def free_blocks(llm) -> tuple[int, int]:
    """(free pages, pages that can ever be free): equal when no request holds KV."""
    pool = scheduler_of(llm).kv_cache_manager.block_pool
    return pool.get_num_free_blocks(), pool.num_gpu_blocks - 1  # the null page is never free
