"""A real HF tokenizer for the tiny models: character level, ChatML, memento tokens as specials.

Nothing can be downloaded here, so tests and the demo build their own tokenizer with the
``tokenizers`` library and wrap it in ``PreTrainedTokenizerFast``: it saves with
``save_pretrained`` and loads back with ``AutoTokenizer.from_pretrained`` like any hub tokenizer,
and the same training and inference code then runs unchanged on a real model's tokenizer.

Character level keeps the vocabulary tiny (~100 ids) and makes tokenisation of a prompt and a
completion separately exactly equal to tokenising their concatenation, which keeps label masks
simple to check.
"""

from __future__ import annotations

import string

from memento.format import MEMENTO_TOKENS, THINK_TOKENS

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|endoftext|>"
UNK = "<|unk|>"

TOKEN_ROLES: dict[str, str | None] = {"pad_token": PAD, "unk_token": UNK, "eos_token": IM_END, "bos_token": None}
"""The tokenizer's role tokens, as ``PreTrainedTokenizerFast`` takes them: a ChatML turn ends with
``<|im_end|>`` (generation stops there) and nothing opens a sequence."""

DEFAULT_ALPHABET = string.ascii_letters + string.digits + " \n" + "+-*/=<>()[]{}.,:;!?'\"_#%&|^~@$\\"
"""The characters the tiny tokenizer knows; anything else becomes ``<|unk|>``."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, as Qwen uses, without a default system prompt (Qwen3 memento models train without one)."""

ASSISTANT_PREFIX = IM_START + "assistant\n"
"""The text that opens the assistant turn (its ids are masking's ``assistant_prefix``)."""


def build_tiny_tokenizer(alphabet: str = DEFAULT_ALPHABET):
    """A character-level ``PreTrainedTokenizerFast`` with ChatML and the memento/think tokens.

    Ids 0.. are the control tokens (pad, unk, ChatML), then the six memento/think tokens, then one
    id per character of ``alphabet``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if len(set(alphabet)) != len(alphabet):
        raise ValueError("the alphabet lists a character twice")
    specials = [PAD, UNK, IM_START, IM_END, *MEMENTO_TOKENS, *THINK_TOKENS]
    vocab = {token: i for i, token in enumerate([*specials, *alphabet])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one char each
    core.decoder = decoders.Fuse()  # join characters back without spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        **TOKEN_ROLES,
        additional_special_tokens=[IM_START, *MEMENTO_TOKENS, *THINK_TOKENS],
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 16,
    )
    return tokenizer
