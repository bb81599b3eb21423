"""The reference generator against independent implementations."""

from __future__ import annotations

import pytest
import torch

from helpers import hand_mask, tiny_model
from memento.chat import assistant_prefix_ids, chat_prompt
from memento.format import SpecialTokenIds
from memento.masking import MEMENTO, VANILLA, MaskConfig
from memento.reference import reference_generate, teacher_forced_logits
from memento.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer, seed=5)


def prompt_ids(tokenizer, problem: str, response_prefix: str = "") -> list[int]:
    return tokenizer(chat_prompt(tokenizer, problem) + response_prefix, add_special_tokens=False)["input_ids"]


PARTIAL = (
    "<think>\n<|block_start|>1+2=3 3+4=7<|block_end|><|summary_start|>s=7<|summary_end|>\n"
    "<|block_start|>7+5=12<|block_end|><|summary_start|>s=12<|summary_end|>\n<|block_start|>"
)


def test_vanilla_equals_transformers_generate(tokenizer, model) -> None:
    """Full recomputation with a causal mask == HF's KV-cached greedy generate."""
    prompts = [prompt_ids(tokenizer, "Add 1 2 3"), prompt_ids(tokenizer, "Add 40 2", "<think>\n")]
    specials = SpecialTokenIds.from_tokenizer(tokenizer)
    ours = reference_generate(model, prompts, specials, VANILLA, max_new_tokens=24, pad_token_id=tokenizer.pad_token_id)
    for prompt, gen in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert gen.token_ids == out[0, len(prompt) :].tolist()
        assert gen.finish_reason == "length" and len(gen.token_ids) == 24
        assert gen.live_kv == list(range(len(prompt), len(prompt) + 24))  # vanilla: nothing evicted


def test_memento_generation_equals_a_hand_masked_loop(tokenizer, model) -> None:
    """A prompt holding two finished units: every step equals a forward pass with the hand mask."""
    specials = SpecialTokenIds.from_tokenizer(tokenizer)
    prefix = assistant_prefix_ids(tokenizer)
    prompt = prompt_ids(tokenizer, "Add 1 2 4 5", PARTIAL)
    config = MaskConfig(require_assistant_section=True)
    gen = reference_generate(
        model, [prompt], specials, config, max_new_tokens=12, assistant_prefix=prefix, pad_token_id=0
    )[0]
    ids = list(prompt)
    tracked_from = len(tokenizer(chat_prompt(tokenizer, "Add 1 2 4 5"), add_special_tokens=False)["input_ids"])
    for _ in range(12):
        mask = hand_mask(ids, specials, tracked_from)
        with torch.no_grad():
            logits = model(
                input_ids=torch.tensor([ids]),
                attention_mask=mask[None, None],
                position_ids=torch.arange(len(ids))[None],
            ).logits[0, -1]
        ids.append(int(torch.argmax(logits)))
    assert gen.token_ids == ids[len(prompt) :]
    evicted = len("1+2=3 3+4=7") + len("7+5=12")  # the two blocks' reasoning, one char per token
    assert gen.live_kv[0] == len(prompt) - evicted

    vanilla = reference_generate(model, [prompt], specials, VANILLA, max_new_tokens=12, pad_token_id=0)[0]
    with torch.no_grad():
        a = teacher_forced_logits(model, [prompt], specials, config, assistant_prefix=prefix)[0]
        b = teacher_forced_logits(model, [prompt], specials, VANILLA)[0]
    assert (a[-1] - b[-1]).abs().max() > 1e-3, "the evictions must change what the model predicts"
    assert vanilla.live_kv[0] == len(prompt)


def test_generated_tokens_are_the_argmax_of_one_teacher_forced_pass(tokenizer, model) -> None:
    specials = SpecialTokenIds.from_tokenizer(tokenizer)
    prompts = [prompt_ids(tokenizer, "Add 3", PARTIAL), prompt_ids(tokenizer, "Add 9 9")]
    for config in (MEMENTO, MaskConfig(keep_last_n=1), MaskConfig(restart=True)):
        gens = reference_generate(model, prompts, specials, config, max_new_tokens=10, pad_token_id=0)
        for prompt, gen in zip(prompts, gens, strict=True):
            logits = teacher_forced_logits(model, [prompt + gen.token_ids], specials, config)[0]
            assert torch.argmax(logits[len(prompt) - 1 : -1], dim=-1).tolist() == gen.token_ids


def test_restart_differs_from_memento_after_eviction(tokenizer, model) -> None:
    specials = SpecialTokenIds.from_tokenizer(tokenizer)
    seq = prompt_ids(tokenizer, "Add 1 2 4 5", PARTIAL)
    memento = teacher_forced_logits(model, [seq], specials, MEMENTO)[0]
    restart = teacher_forced_logits(model, [seq], specials, MaskConfig(restart=True))[0]
    first_end = seq.index(specials.summary_end)
    torch.testing.assert_close(memento[:first_end], restart[:first_end])  # same until the first eviction
    assert (memento[first_end:] - restart[first_end:]).abs().max() > 1e-3


def test_stops_at_eos_and_on_malformed_structure(tokenizer, model) -> None:
    specials = SpecialTokenIds.from_tokenizer(tokenizer)
    prompt = prompt_ids(tokenizer, "Add 1")
    first = reference_generate(model, [prompt], specials, MEMENTO, max_new_tokens=1, pad_token_id=0)[0].token_ids[0]
    gen = reference_generate(model, [prompt], specials, MEMENTO, max_new_tokens=5, eos_token_ids=[first])[0]
    assert gen.finish_reason == "eos" and gen.token_ids == [first]
    broken = [*prompt, specials.summary_start]  # a memento with no block
    bad, good = reference_generate(model, [broken, prompt], specials, MEMENTO, max_new_tokens=3, pad_token_id=0)
    assert bad.finish_reason == "format_error" and "memento without a block" in bad.error
    assert good.finish_reason == "length" and len(good.token_ids) == 3
    with pytest.raises(ValueError, match="max_new_tokens"):
        reference_generate(model, [prompt], specials, MEMENTO, max_new_tokens=0)
