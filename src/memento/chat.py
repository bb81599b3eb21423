"""Chat prompts: how a problem becomes the text a model sees, and where the assistant's turn opens.

Training, the engine, the server, the vLLM backend and evaluation all need these two facts, so they
live here, below every consumer (training imports them; the rest never imports training).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from memento.masking import MaskConfig


def assistant_prefix_ids(tokenizer: Any) -> list[int]:
    """The ids that open the assistant's turn in the tokenizer's chat template.

    Found as the difference between a one-message chat with and without the generation prompt
    (for ChatML: ``<|im_start|>assistant\\n``); masking tracks memento tokens only after them.
    """
    messages = [{"role": "user", "content": "x"}]
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    with_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not with_prompt.startswith(without) or with_prompt == without:
        raise ValueError("cannot find the assistant prefix: the chat template adds no generation prompt")
    return tokenizer(with_prompt[len(without) :], add_special_tokens=False)["input_ids"]


def chat_prompt(tokenizer: Any, problem: str) -> str:
    """The prompt text a model sees: the problem as a user turn, then the assistant's opening."""
    messages = [{"role": "user", "content": problem}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tracked_prefix(mask: MaskConfig, given: Sequence[int] | None, tokenizer: Any | None) -> list[int] | None:
    """The assistant prefix the mask is tracked from: None when the whole sequence is tracked, else
    ``given`` or the tokenizer's (an engine's or a backend's assistant-prefix setting resolved)."""
    if not mask.require_assistant_section:
        return None
    if given:
        return [int(t) for t in given]
    if tokenizer is None:
        raise ValueError("require_assistant_section needs assistant_prefix ids or a tokenizer with a chat template")
    return assistant_prefix_ids(tokenizer)
