"""From (prompt, completion) text to model inputs: token ids, labels, and the memento mask.

The attention mask comes from :mod:`memento.masking` (the one rule); this module only decides
its form for the model's attention implementation and puts labels on completion tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from memento.chat import chat_prompt
from memento.format import MementoFormatError, SpecialTokenIds
from memento.masking import MaskConfig, collate_visibility, compute_visibility
from memento.modeling import SUPPORTED_ATTENTION, attention_inputs

IGNORE_INDEX = -100


def tokenize_example(
    tokenizer: Any, problem: str, completion: str, *, max_length: int | None = None
) -> dict[str, list[int]]:
    """Token ids of prompt + completion (+ EOS) and a completion mask (1 where loss is taken).

    The prompt and the completion are tokenised separately (as TRL does for prompt-completion
    data), so the label boundary is exact whatever the tokenizer.
    """
    prompt_ids = tokenizer(chat_prompt(tokenizer, problem), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token or ""
    completion_ids = tokenizer(completion + eos, add_special_tokens=False)["input_ids"]
    ids = list(prompt_ids) + list(completion_ids)
    if max_length is not None and len(ids) > max_length:
        raise ValueError(f"example has {len(ids)} tokens, more than max_length={max_length}")
    return {"input_ids": ids, "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids)}


@dataclass
class MementoCollator:
    """Pads a list of tokenised examples and builds labels plus the attention mask.

    ``mask_config=None`` is stage 1 (full causal attention: a plain 2D padding mask, so the model's
    own causal fast path runs); a :class:`MaskConfig` is stage 2 (the memento mask, 4D).
    """

    specials: SpecialTokenIds
    pad_token_id: int
    mask_config: MaskConfig | None = None
    attn_implementation: str = "sdpa"
    assistant_prefix: Sequence[int] | None = None
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    mask_dtype: torch.dtype = torch.float32
    windows: dict[str, int | None] | None = None
    """The model's attention layer types and their sliding windows (:func:`memento.modeling.layer_windows`):
    stage 2 gives each type its own mask. None: every layer full attention."""

    def __post_init__(self) -> None:
        if self.mask_config is not None and self.mask_config.restart:
            raise ValueError("restart mode is an inference ablation; it has no training mask")
        if self.attn_implementation not in SUPPORTED_ATTENTION:
            raise ValueError(f"unsupported attention implementation {self.attn_implementation!r}")
        if self.mask_config is not None and self.mask_config.require_assistant_section and not self.assistant_prefix:
            raise ValueError("require_assistant_section needs the assistant prefix ids (assistant_prefix_ids)")

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        sequences = [np.asarray(f["input_ids"], dtype=np.int64) for f in features]
        items = [self.visibility(seq, index=i) for i, seq in enumerate(sequences)]
        batch = collate_visibility(
            items,
            padding_side=self.padding_side,
            pad_token_id=self.pad_token_id,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        labels = torch.full_like(batch.input_ids, IGNORE_INDEX)
        for b, feature in enumerate(features):
            completion = torch.as_tensor(feature["completion_mask"], dtype=torch.bool)
            rows = torch.arange(len(completion)) + batch.offsets[b]
            labels[b, rows[completion]] = batch.input_ids[b, rows[completion]]
        if self.mask_config is None:
            causal = {"input_ids": batch.input_ids, "labels": labels}
            if self.padding_side == "right":
                # Right padding under causal attention: no real token can see a pad (pads come after
                # it) and no pad carries a label, so the padding mask changes no loss and no gradient.
                # Leaving it out lets SDPA take its causal kernel: ~35% faster steps on CPU.
                return causal
            return {**causal, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids}
        return {**attention_inputs(batch, self.attn_implementation, self.mask_dtype, self.windows), "labels": labels}

    def visibility(self, sequence: np.ndarray, index: int = 0):
        """The visibility decision for one example (causal when ``mask_config`` is None)."""
        config = self.mask_config or MaskConfig(keep_last_n=-1)
        try:
            vis = compute_visibility(sequence, self.specials, config, self.assistant_prefix)
        except MementoFormatError as err:
            raise err.for_record(index) from None
        if config.require_assistant_section and vis.tracking_from is None:
            raise MementoFormatError("the assistant prefix never appears, so nothing would be masked", record=index)
        return vis
