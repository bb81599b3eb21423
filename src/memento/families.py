"""The paper's model families: Qwen3, Phi-4-reasoning and Olmo-3-Think, and what differs between them.

The paper trains memento models from Qwen3 (8B, 32B), Phi-4-reasoning (14B; HF architecture
``Phi3ForCausalLM``) and Olmo-3-7B-Think (``Olmo3ForCausalLM``, sliding-window layers). What this
project must know about each is kept here, once:

* the default mask: the paper masks the block delimiters for Phi-4 (``mask_delimiters=True``) and
  not for Qwen3 and Olmo 3 (``../shared/paper-notes.md``, section 1). A setting must match training,
  so every command that is given a model starts from its family's default (:func:`default_mask`);
  a mask option given on the command line still wins.
* the chat template and the text that opens the assistant's turn, in each family's style
  (ChatML for Qwen3 and Olmo 3, Phi-4's ``<|im_sep|>`` variant), with the control tokens;
* a byte-level BPE tokenizer in each family's shape, trained locally (:func:`build_family_tokenizer`),
  since no real tokenizer can be downloaded here: tests and examples build a family's tiny
  checkpoint from it and add the memento tokens with :func:`memento.modeling.add_memento_tokens`,
  the path a real checkpoint takes.

Families are recognised by the HF config's ``model_type`` (``qwen3``, ``phi3``, ``olmo3``); any
other architecture gets the generic defaults (:data:`memento.masking.CHAT_MEMENTO`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memento.masking import CHAT_MEMENTO, MaskConfig

QWEN3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The release's Qwen3 memento template (``vllm/chat_templates/memento_nosys.jinja``): ChatML, system
messages dropped (the paper's Qwen3 models were trained without one)."""

PHI4_SYSTEM = (
    "You are Phi, a language model trained by Microsoft to help users. Think step by step in a "
    "<think> section, then give the final answer."
)
PHI4_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system<|im_sep|>" + PHI4_SYSTEM + "<|im_end|>' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)
"""Phi-4-reasoning's style: ``<|im_start|>role<|im_sep|>content<|im_end|>`` with no newlines and a
default reasoning system prompt (shortened from the model card's)."""

OLMO3_SYSTEM = "You are Olmo, a helpful AI assistant built by Ai2."
OLMO3_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + OLMO3_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""Olmo-3-Think's style: ChatML with a default system turn."""


@dataclass(frozen=True)
class Family:
    """One model family: how to recognise it, its chat format and its default memento mask."""

    name: str
    title: str
    model_types: tuple[str, ...]
    """HF ``config.model_type`` values of the family."""
    tiny_arch: str
    """:func:`memento.modeling.build_tiny_model`'s ``arch`` for a tiny model of the family."""
    chat_template: str
    assistant_prefix: str
    """The text that opens the assistant's turn (masking tracks the memento tokens after it)."""
    control_tokens: tuple[str, ...]
    """The tokenizer's special tokens (pad and eos among them); the memento tokens are added later."""
    pad_token: str
    eos_token: str
    think_tokens_in_vocabulary: bool
    """Whether the real tokenizer already has ``<think>``/``</think>`` (Qwen3 and Phi-4-reasoning do)."""
    mask: MaskConfig = CHAT_MEMENTO
    """The family's default mask (tracked from the assistant's turn)."""
    sliding_window: int | None = None
    """The real model's sliding window (Olmo 3: 4,096 on three of every four layers)."""


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="qwen3",
            title="Qwen3",
            model_types=("qwen3",),
            tiny_arch="qwen3",
            chat_template=QWEN3_TEMPLATE,
            assistant_prefix="<|im_start|>assistant\n",
            control_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            pad_token="<|endoftext|>",
            eos_token="<|im_end|>",
            think_tokens_in_vocabulary=True,
        ),
        Family(
            name="phi4",
            title="Phi-4-reasoning",
            model_types=("phi3",),
            tiny_arch="phi3",
            chat_template=PHI4_TEMPLATE,
            assistant_prefix="<|im_start|>assistant<|im_sep|>",
            control_tokens=("<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"),
            pad_token="<|endoftext|>",
            eos_token="<|im_end|>",
            think_tokens_in_vocabulary=True,
            mask=MaskConfig.chat(mask_delimiters=True),
        ),
        Family(
            name="olmo3",
            title="Olmo-3-Think",
            model_types=("olmo3",),
            tiny_arch="olmo3",
            chat_template=OLMO3_TEMPLATE,
            assistant_prefix="<|im_start|>assistant\n",
            control_tokens=("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"),
            pad_token="<|pad|>",
            eos_token="<|im_end|>",
            think_tokens_in_vocabulary=False,
            sliding_window=4096,
        ),
    )
}


def family_for_model_type(model_type: str | None) -> Family | None:
    """The family an HF ``model_type`` belongs to, or None."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    return None


def model_type_of(source: Any) -> str | None:
    """``config.model_type`` of a model, an HF config, or a checkpoint directory (its config.json,
    read without loading anything); None when there is none."""
    if isinstance(source, str | Path):
        config_file = Path(source) / "config.json"
        if not config_file.is_file():
            return None
        try:
            return json.loads(config_file.read_text()).get("model_type")
        except (OSError, ValueError):
            return None
    config = getattr(source, "config", source)
    return getattr(config, "model_type", None)


def family_of(source: Any) -> Family | None:
    """The family of a model, config or checkpoint directory (:func:`model_type_of`), or None."""
    return family_for_model_type(model_type_of(source))


def default_mask(source: Any) -> MaskConfig:
    """The mask a command starts from for this model (a model, config or checkpoint directory): its
    family's default (Phi-4: delimiters masked), else :data:`memento.masking.CHAT_MEMENTO`."""
    return model_type_mask(model_type_of(source))


def model_type_mask(model_type: str | None) -> MaskConfig:
    """:func:`default_mask` from an HF ``model_type``."""
    family = family_for_model_type(model_type)
    return family.mask if family is not None else CHAT_MEMENTO


DEFAULT_CORPUS: tuple[str, ...] = (
    "Let us start with the first step of the problem and work through each section.",
    "We begin a new block, finish it, and write a brief summary or recap when done.",
    "In summary, the sum is complete; the overview of the section is brief.",
    "To summarize: add the numbers, carry the digits, and check the end result.",
    "The running total after each step is written down before the next one starts.",
    "Question: what is 12 + 30 - 7? Answer: 35. The final answer is 35.",
    "Think about the problem carefully, step by step, then give the answer.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * / = ( ) , . : ;",
)
"""Text the tiny family tokenizers are trained on: it makes the paper's related words for the memento
tokens (block, start, end, summary, ...) single tokens, as they are in the real vocabularies."""


def build_family_tokenizer(
    family: str | Family,
    *,
    vocab_size: int = 600,
    corpus: Iterable[str] | None = None,
) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` shaped like the family's real one, trained locally.

    Byte level (as Qwen3's, Phi-4's and Olmo 3's tokenizers are): every string encodes, nothing is
    unknown. It has the family's control tokens, pad/eos roles and chat template, and
    ``<think>``/``</think>`` when the real tokenizer has them; the memento tokens are *not* in it:
    :func:`memento.modeling.add_memento_tokens` adds them, as for a real base checkpoint.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from memento.format import THINK_TOKENS

    spec = FAMILIES[family] if isinstance(family, str) else family
    specials = list(spec.control_tokens)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = list(corpus) if corpus is not None else list(DEFAULT_CORPUS) * 20
    core.train_from_iterator(text, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=spec.pad_token,
        eos_token=spec.eos_token,
        additional_special_tokens=[t for t in specials if t not in (spec.pad_token, spec.eos_token)],
        chat_template=spec.chat_template,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 16,
    )
    if spec.think_tokens_in_vocabulary:
        tokenizer.add_tokens(list(THINK_TOKENS))  # plain added tokens, not special (as Qwen3 has them)
    return tokenizer
