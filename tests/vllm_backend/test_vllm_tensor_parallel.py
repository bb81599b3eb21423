"""Tensor parallelism 2 on vLLM's CPU build: the eviction plan crosses worker processes (issue 22).

With ``tensor_parallel_size=2`` the scheduler runs in the engine core and each of two worker
processes holds half of every layer's KV heads. Each step's plan (compactions and shifts) rides on
the ``SchedulerOutput`` vLLM sends to both workers, and both must move their halves of the KV
identically. The check is the consistency test's: full-vocabulary logprobs of every prompt and
decode position equal one dense-mask HF forward pass, for a model whose two KV heads are split
across the workers, with prompts holding closed blocks and decode evicting in place, and the KV
pool is empty afterwards.
"""

from __future__ import annotations

import random

import pytest
import vllm
from test_vllm_consistency import TOLERANCE, cases_for, dense, reference_logprobs
from vllm_support import FORCE, ForcedTokens, free_blocks, scheduler_of

from memento.masking import MaskConfig
from memento.vllm.config import MementoSettings


@pytest.fixture(scope="module")
def split_model_dir(tok, tmp_path_factory):
    """The tests' tiny model with two KV heads, so each worker holds one."""
    from memento.modeling import build_tiny_model

    model = build_tiny_model(
        tok,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=128,
        seed=5,
        tie_word_embeddings=False,
    ).eval()
    path = tmp_path_factory.mktemp("tiny-vllm-tp")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("knobs", [dict(keep_last_n=0), dict(keep_last_n=0, restart=True)], ids=["keep0", "restart"])
def test_tensor_parallel_2_matches_the_dense_mask_forward(make_llm_at, split_model_dir, tok, knobs, monkeypatch):
    # vLLM binds each CPU worker to a NUMA node of its own and refuses two workers on one node:
    # leave the threads unbound (CI machines have one node).
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    model, path = split_model_dir
    settings = MementoSettings(mask=MaskConfig.chat(**knobs))
    cases = cases_for(tok, random.Random(f"tp-{knobs}"), 4, small=False)
    llm = make_llm_at(
        path,
        settings,
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
        logits_processors=[ForcedTokens],
    )
    params = [
        vllm.SamplingParams(
            temperature=0,
            max_tokens=len(forced),
            logprobs=-1,
            prompt_logprobs=-1,
            ignore_eos=True,
            extra_args={FORCE: forced},
        )
        for _, forced in cases
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in cases], params, use_tqdm=False)
    vocab = model.config.vocab_size
    for (prompt, forced), out, ref in zip(cases, outs, reference_logprobs(model, tok, cases, settings), strict=True):
        assert list(out.outputs[0].token_ids) == forced
        n = len(prompt)
        assert (dense(out.prompt_logprobs[1:], vocab) - ref[: n - 1]).abs().max().item() <= TOLERANCE
        assert (
            dense(out.outputs[0].logprobs, vocab) - ref[n - 1 : n - 1 + len(forced)]
        ).abs().max().item() <= TOLERANCE
    stats = scheduler_of(llm).memento_stats
    assert stats.evictions > 0
    # keep0 slides each memento's KV down over its block in both workers; restart recomputes it instead
    assert (stats.moved_tokens > 0) == (not settings.mask.restart)
    free, total = free_blocks(llm)
    assert free == total
