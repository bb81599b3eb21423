"""The block-length cap as a vLLM v1 logits processor: at the cap only ``<|block_end|>`` may follow.

The paper caps blocks in RL (7K tokens) because accuracy-only rewards taught the model to write
fewer, longer blocks. The decision is :class:`memento.masking.BlockCap`'s, the same object the
embedded engine asks: tokens since the open ``<|block_start|>`` (one in the prompt counts too), the
cap reached when that count equals ``max_block_tokens``. Each row's counter is fed the output
tokens that arrived since the last step.

Per request: ``SamplingParams(extra_args={"max_block_tokens": N})``; default for every request:
``additional_config={"memento": {"max_block_tokens": N}}`` in the engine arguments. A request
with neither is not tracked (the processor costs nothing for it).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from memento.format import SpecialTokenIds
from memento.masking import BlockCap, check_block_cap
from memento.vllm.config import MementoSettings

EXTRA_ARG = "max_block_tokens"


@dataclass
class _Row:
    """One request's counter, the live list of its output ids (vLLM appends to it) and how many it has seen."""

    cap: BlockCap
    after_prompt: BlockCap
    output: Sequence[int]
    seen: int = 0

    def must_end(self) -> bool:
        if len(self.output) < self.seen:  # the output was cut back: count it again from the prompt
            self.cap, self.seen = copy.copy(self.after_prompt), 0
        self.cap.feed(self.output[self.seen :])
        self.seen = len(self.output)
        return self.cap.must_end


class BlockCapLogitsProcessor(LogitsProcessor):
    """Forces ``<|block_end|>`` once the open block holds ``max_block_tokens`` tokens."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        from transformers import AutoTokenizer

        model_config = vllm_config.model_config
        tokenizer = AutoTokenizer.from_pretrained(
            model_config.tokenizer, trust_remote_code=model_config.trust_remote_code
        )
        try:
            self.specials = SpecialTokenIds.from_tokenizer(tokenizer)
        except (KeyError, ValueError):
            self.specials = None  # not a memento tokenizer: nothing to cap
        self.default_cap = MementoSettings.from_vllm_config(vllm_config).max_block_tokens
        self.rows: dict[int, _Row] = {}  # batch row -> its counter

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        check_block_cap((sampling_params.extra_args or {}).get(EXTRA_ARG))

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token wins

    def _new_row(self, params: SamplingParams, prompt: list[int] | None, output: list[int]) -> _Row | None:
        if self.specials is None:
            return None
        cap = (params.extra_args or {}).get(EXTRA_ARG, self.default_cap)
        if cap is None:
            return None
        counter = BlockCap(self.specials, int(cap))
        counter.feed(prompt or [])
        return _Row(counter, copy.copy(counter), output)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._new_row)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        end = self.specials.block_end
        for row, state in self.rows.items():
            if state.must_end():
                keep = logits[row, end].clone()
                logits[row].fill_(float("-inf"))
                logits[row, end] = keep
        return logits
