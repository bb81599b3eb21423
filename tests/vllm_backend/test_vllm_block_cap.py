"""The block-length cap (memento.vllm.logits) on stock vLLM: greedy equal to the embedded engine.

One in-process engine serves the module (the tests with eviction: test_vllm_consistency.py).
"""

from __future__ import annotations

import pytest
import vllm

from memento.chat import chat_prompt
from memento.engine import EngineConfig, LLMEngine
from memento.engine import SamplingParams as OurParams
from memento.format import SpecialTokenIds
from memento.masking import MaskConfig


@pytest.fixture(scope="module")
def llm(model_dir):
    """Stock vLLM (no memento classes): the cap is a plain logits processor, loaded by entry point."""
    return vllm.LLM(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        enable_prefix_caching=False,
        distributed_executor_backend="uni",
        seed=0,
    )


def prompt_ids(tok, text: str) -> list[int]:
    return tok(chat_prompt(tok, "STREAM a3 c9 x4 n22") + text, add_special_tokens=False)["input_ids"]


def ours(model, tok, ids: list[int], max_tokens: int, cap: int | None) -> list[int]:
    engine = LLMEngine(
        model, tok, EngineConfig(mask=MaskConfig.chat(keep_last_n=-1), max_block_tokens=cap, kv_budget_tokens=2048)
    )
    engine.add_request(ids, OurParams(temperature=0, max_tokens=max_tokens))
    return engine.run_to_completion()[0].outputs[0].token_ids


def theirs(llm, ids: list[int], max_tokens: int, cap: int | None) -> list[int]:
    extra = {"max_block_tokens": cap} if cap is not None else None
    params = vllm.SamplingParams(temperature=0, max_tokens=max_tokens, extra_args=extra)
    return list(llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0].outputs[0].token_ids)


@pytest.mark.parametrize("cap", [None, 3, 6])
def test_vllm_greedy_with_the_block_cap_equals_the_engine(llm, model, tok, cap) -> None:
    ids = prompt_ids(tok, "<think>\n<|block_start|>")
    got, want = theirs(llm, ids, 24, cap), ours(model, tok, ids, 24, cap)
    assert got == want
    if cap is not None:
        block_end = SpecialTokenIds.from_tokenizer(tok).block_end
        assert block_end in got[: cap + 1]  # the prompt's open block ends by the cap


def test_a_bad_cap_is_refused(llm, tok) -> None:
    from vllm.exceptions import VLLMValidationError

    with pytest.raises((ValueError, VLLMValidationError), match="max_block_tokens must be a positive integer"):
        theirs(llm, prompt_ids(tok, ""), 4, 0)
