"""The block-length cap as a vLLM v1 logits processor: at the cap only ``<|block_end|>`` may follow.

The paper caps blocks in RL (7K tokens) because accuracy-only rewards taught the model to write
fewer, longer blocks. The count is the embedded engine's (:class:`memento.engine.LLMEngine`): tokens
generated since the open ``<|block_start|>`` (one in the prompt counts too), the cap reached when
that count equals ``max_block_tokens``.

Per request: ``SamplingParams(extra_args={"max_block_tokens": N})``; default for every request:
``additional_config={"memento": {"max_block_tokens": N}}`` in the engine arguments. A request
with neither is not tracked (the processor costs nothing for it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from memento.format import SpecialTokenIds

EXTRA_ARG = "max_block_tokens"


def _config_cap(vllm_config: Any) -> int | None:
    extra = getattr(vllm_config, "additional_config", None) or {}
    memento = extra.get("memento", {}) if isinstance(extra, dict) else {}
    cap = memento.get("max_block_tokens")
    return int(cap) if cap is not None else None


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
        self.default_cap = _config_cap(vllm_config)
        # batch row -> (cap, state of the prompt: open block length or None, the live output ids)
        self.rows: dict[int, tuple[int, int | None, Sequence[int]]] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        cap = (sampling_params.extra_args or {}).get(EXTRA_ARG)
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"{EXTRA_ARG} must be a positive integer, got {cap!r}")

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token wins

    def _block_in(self, ids: Sequence[int]) -> int | None:
        """Tokens in the block open at the end of ``ids`` (None: no block open)."""
        assert self.specials is not None
        for count, token in enumerate(reversed(ids)):
            if token == self.specials.block_start:
                return count
            if token == self.specials.block_end:
                return None
        return None

    def _new_row(self, params: SamplingParams, prompt: list[int] | None, output: list[int]):
        if self.specials is None:
            return None
        cap = (params.extra_args or {}).get(EXTRA_ARG, self.default_cap)
        if cap is None:
            return None
        return (int(cap), self._block_in(prompt or []), output)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._new_row)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        end = self.specials.block_end
        for row, (cap, prompt_open, output) in self.rows.items():
            open_now = self._block_in(output)
            if (
                open_now is None
                and prompt_open is not None
                and not any(t in (self.specials.block_start, self.specials.block_end) for t in output)
            ):
                open_now = prompt_open + len(output)  # the prompt's block is still open
            if open_now is not None and open_now >= cap:
                keep = logits[row, end].clone()
                logits[row].fill_(float("-inf"))
                logits[row, end] = keep
        return logits
