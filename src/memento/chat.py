"""Chat prompts: how a problem becomes the text a model sees, and where the assistant's turn opens.

Training, the engine, the server, the vLLM backend and evaluation all need these two facts, so they
live here, below every consumer (training imports them; the rest never imports training).
"""

from __future__ import annotations

from typing import Any


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
