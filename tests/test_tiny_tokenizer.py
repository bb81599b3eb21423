"""The tiny models' tokenizer is a real HF tokenizer: ChatML, special tokens, save/load round trip."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from memento.chat import assistant_prefix_ids
from memento.format import MEMENTO_TOKENS, THINK_TOKENS, SpecialTokenIds
from memento.tiny_tokenizer import ASSISTANT_PREFIX, build_tiny_tokenizer

TEXT = "<think>\n<|block_start|>3+4=7<|block_end|><|summary_start|>s=7<|summary_end|>\n</think>\n7<|im_end|>"


def test_round_trip_through_save_pretrained_and_auto_tokenizer(tmp_path) -> None:
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert loaded(TEXT, add_special_tokens=False)["input_ids"] == ids
    assert loaded.decode(ids) == TEXT
    assert len(ids) == len(TEXT) - sum(len(t) - 1 for t in [*MEMENTO_TOKENS, *THINK_TOKENS, "<|im_end|>"])
    assert SpecialTokenIds.from_tokenizer(loaded) == SpecialTokenIds.from_tokenizer(tokenizer)
    assert (loaded.eos_token, loaded.pad_token) == ("<|im_end|>", "<|endoftext|>")
    for token in [*MEMENTO_TOKENS, *THINK_TOKENS]:
        assert token in loaded.all_special_tokens
    assert loaded.decode(ids, skip_special_tokens=True) == "\n3+4=7s=7\n\n7"


def test_chatml_template_and_assistant_prefix() -> None:
    tokenizer = build_tiny_tokenizer()
    chat = [{"role": "user", "content": "Add 3 4"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nAdd 3 4<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(assistant_prefix_ids(tokenizer)) == ASSISTANT_PREFIX


def test_prompt_and_completion_tokenise_like_their_concatenation() -> None:
    tokenizer = build_tiny_tokenizer()
    a, b = "<|im_start|>user\nAdd 1 2<|im_end|>\n", TEXT
    split = tokenizer(a, add_special_tokens=False)["input_ids"] + tokenizer(b, add_special_tokens=False)["input_ids"]
    assert split == tokenizer(a + b, add_special_tokens=False)["input_ids"]


def test_unknown_characters_and_bad_alphabets() -> None:
    tokenizer = build_tiny_tokenizer()
    assert tokenizer("é", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id]
    with pytest.raises(ValueError, match="twice"):
        build_tiny_tokenizer("aab")
