"""The vLLM backend passes the consistency test the embedded engine passes.

Teacher forcing: random memento-structured sequences are split at a random point; the head is the
prompt (so prompts hold closed blocks, evicted between prefill chunks) and the tail is forced
through decode one token per step (evicted in place as each memento ends). vLLM's full-vocabulary
logprobs of every prompt and every decode position must equal the log-softmax of one dense-mask HF
forward pass (:func:`memento.reference.teacher_forced_logits`) to 1e-4, in float32, for every mask
setting, one request and eight of mixed lengths, and with preemption forced by a pool far smaller
than the batch needs. Greedy decoding must give the reference generator's tokens, finish reasons
and logprobs. After every run the KV pool is back to empty.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
import vllm
from vllm_support import FORCE, ForcedTokens, free_blocks, scheduler_of

from helpers import memento_case
from memento.chat import assistant_prefix_ids
from memento.format import SpecialTokenIds
from memento.masking import MaskConfig, compute_visibility
from memento.reference import forward_logits, reference_generate
from memento.vllm.config import MementoSettings
from memento.vllm.scheduler import FORMAT_ERROR

TOLERANCE = 1e-4

MODES = [
    pytest.param(dict(keep_last_n=-1), id="vanilla"),
    pytest.param(dict(keep_last_n=0), id="keep0"),
    pytest.param(dict(keep_last_n=1), id="keep1"),
    pytest.param(dict(keep_last_n=0, mask_delimiters=True), id="keep0-delims"),
    pytest.param(dict(keep_last_n=1, mask_delimiters=True), id="keep1-delims"),
    pytest.param(dict(keep_last_n=0, keep_last_block_for_answer=True), id="keep0-lastblock"),
    pytest.param(dict(keep_last_n=0, restart=True), id="restart"),
]

SMALL_POOL = dict(num_gpu_blocks_override=9, max_model_len=256)  # 8 usable pages: 256 token slots


def dense(logprobs, vocab: int) -> torch.Tensor:
    """vLLM's per-position {token: Logprob} dicts as a (positions, vocab) tensor."""
    out = torch.full((len(logprobs), vocab), float("nan"))
    for i, entry in enumerate(logprobs):
        for token, lp in entry.items():
            out[i, token] = lp.logprob
    return out


def cases_for(tok, rng: random.Random, batch: int, small: bool):
    """(prompt, forced continuation) pairs: the prompt ends at a random point of the memento trace."""
    out = []
    for _ in range(batch):
        prompt, response = memento_case(tok, rng, block_len=(4, 40) if small else (4, 70), units=(1, 3 if small else 5))
        cut = rng.randint(0, len(response) - 1)
        out.append((prompt + response[:cut], response[cut:]))
    return out


def reference_logprobs(model, tok, cases, settings: MementoSettings) -> list[torch.Tensor]:
    """Log-softmax of the dense-mask forward at the row that predicts each token after the first.

    Restart mode feeds a closed memento twice (masking.py's restart layout). In decode vLLM reports
    the logprobs it sampled with (the memento's first pass, block visible: the original rows); in a
    prompt the rewind recomputes the memento after its block is gone and vLLM's prompt logprobs hold
    that last pass, so there the recomputed copy's rows are the reference.
    """
    specials = SpecialTokenIds.from_tokenizer(tok)
    out = []
    for prompt, forced in cases:
        vis = compute_visibility(prompt + forced, specials, settings.mask, assistant_prefix_ids(tok))
        rows = vis.output_rows.copy()
        for ev in vis.events:
            if ev.recompute and ev.at < len(prompt):  # rewound inside the prompt
                first_copy = int(vis.output_rows[ev.at]) - len(ev.recompute)
                rows[ev.recompute.start : ev.recompute.stop] = np.arange(first_copy, first_copy + len(ev.recompute))
        (logits,) = forward_logits(model, [dataclasses.replace(vis, output_rows=rows)], pad_token_id=tok.pad_token_id)
        out.append(torch.log_softmax(logits[:-1], dim=-1))
    return out


@pytest.mark.parametrize("knobs", MODES)
def test_teacher_forced_logprobs_match_the_dense_mask_forward(make_llm, model, tok, knobs):
    settings = MementoSettings(mask=MaskConfig.chat(**knobs))
    vocab = model.config.vocab_size
    evictions = 0
    for run, batch, pool in [("batch1", 1, {}), ("batch8", 8, {}), ("preempt", 8, SMALL_POOL)]:
        rng = random.Random(f"{knobs}-{run}")
        cases = cases_for(tok, rng, batch, small=bool(pool))
        llm = make_llm(settings, logits_processors=[ForcedTokens], **pool)
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
        want = reference_logprobs(model, tok, cases, settings)
        for (prompt, forced), out, ref in zip(cases, outs, want, strict=True):
            completion = out.outputs[0]
            assert list(completion.token_ids) == forced and completion.finish_reason == "length"
            got_prompt = dense(out.prompt_logprobs[1:], vocab)  # position 0 has none
            got_decode = dense(completion.logprobs, vocab)
            n = len(prompt)
            assert (got_prompt - ref[: n - 1]).abs().max().item() <= TOLERANCE, f"{run}: prompt logprobs differ"
            assert (got_decode - ref[n - 1 : n - 1 + len(forced)]).abs().max().item() <= TOLERANCE, (
                f"{run}: decode logprobs differ"
            )
        stats = scheduler_of(llm).memento_stats
        free, total = free_blocks(llm)
        assert free == total, f"{run}: {total - free} KV pages leaked"
        evictions += stats.evictions
        if pool:
            assert stats.recomputes > 0, "the small pool did not force a preemption"
    assert (evictions > 0) == settings.mask.evicts


def test_the_check_would_catch_a_missing_eviction(make_llm, model, tok):
    """Guard on the test itself: vLLM without eviction disagrees with the memento reference."""
    rng = random.Random(5)
    cases = cases_for(tok, rng, 2, small=False)
    llm = make_llm(MementoSettings(mask=MaskConfig.chat(keep_last_n=-1)), logits_processors=[ForcedTokens])
    params = [
        vllm.SamplingParams(temperature=0, max_tokens=len(f), logprobs=-1, ignore_eos=True, extra_args={FORCE: f})
        for _, f in cases
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in cases], params, use_tqdm=False)
    want = reference_logprobs(model, tok, cases, MementoSettings(mask=MaskConfig.chat(keep_last_n=0)))
    worst = 0.0
    for (prompt, forced), out, ref in zip(cases, outs, want, strict=True):
        got = dense(out.outputs[0].logprobs, model.config.vocab_size)
        worst = max(worst, (got - ref[len(prompt) - 1 : len(prompt) - 1 + len(forced)]).abs().max().item())
    assert worst > 100 * TOLERANCE


GREEDY = [
    pytest.param(dict(keep_last_n=-1), {}, id="vanilla"),
    pytest.param(dict(keep_last_n=0), {}, id="keep0"),
    pytest.param(dict(keep_last_n=1), {}, id="keep1"),
    pytest.param(dict(keep_last_n=0, mask_delimiters=True), {}, id="keep0-delims"),
    pytest.param(dict(keep_last_n=1, mask_delimiters=True), {}, id="keep1-delims"),
    pytest.param(dict(keep_last_n=0), SMALL_POOL, id="keep0-preempt"),
    pytest.param(dict(keep_last_n=0, restart=True), {}, id="restart"),
]


@pytest.mark.parametrize("knobs,pool", GREEDY)
def test_greedy_generation_equals_the_reference_generator(make_llm, model, tok, knobs, pool):
    """Free-running greedy decoding: the reference's tokens, finish reasons and logprobs."""
    settings = MementoSettings(mask=MaskConfig.chat(**knobs))
    specials = SpecialTokenIds.from_tokenizer(tok)
    prefix = assistant_prefix_ids(tok)
    rng = random.Random(f"greedy-{knobs}")
    prompts = []
    for _ in range(8):  # prompts that end inside a memento trace, so the continuations evict
        prompt, response = memento_case(tok, rng, block_len=(4, 40), units=(1, 3))
        prompts.append(prompt + response[: rng.randint(1, len(response))])
    max_tokens = 24
    want = reference_generate(
        model,
        prompts,
        specials,
        settings.mask,
        max_new_tokens=max_tokens,
        eos_token_ids=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
        assistant_prefix=prefix,
    )
    llm = make_llm(settings, **pool)
    params = vllm.SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finishes = {"eos": ("stop", None), "length": ("length", None), "format_error": ("stop", FORMAT_ERROR)}
    for prompt, out, ref in zip(prompts, outs, want, strict=True):
        completion = out.outputs[0]
        assert list(completion.token_ids) == ref.token_ids
        assert (completion.finish_reason, completion.stop_reason) == finishes[ref.finish_reason]
        # the logprob of each chosen token, from the dense-mask forward over what came before it
        tokens = ref.token_ids
        vis = compute_visibility(prompt + tokens[:-1], specials, settings.mask, prefix, stop_tracking_on_error=True)
        (logits,) = forward_logits(model, [vis], pad_token_id=tok.pad_token_id)
        ref_lp = torch.log_softmax(logits[len(prompt) - 1 :], dim=-1)
        got = torch.tensor([step[t].logprob for step, t in zip(completion.logprobs, tokens, strict=True)])
        assert (got - ref_lp[torch.arange(len(tokens)), torch.tensor(tokens)]).abs().max().item() <= TOLERANCE
    free, total = free_blocks(llm)
    assert free == total
    if settings.mask.evicts:
        assert scheduler_of(llm).memento_stats.evictions > 0
    if pool:
        assert scheduler_of(llm).memento_stats.recomputes > 0


def test_seeded_sampling_is_independent_of_chunking_and_preemption(make_llm, tok):
    """A seeded request samples the same tokens alone or squeezed in a small pool with seven others.

    Its prompt holds closed blocks, so its prefill runs in chunks cut at eviction points, and the
    small pool preempts and recomputes it: every discarded sample must rewind its generator (vLLM's
    own rewind fails on CPU generators; the runner supplies one that can).
    """
    rng = random.Random(21)
    prompts = []
    for _ in range(8):
        prompt, response = memento_case(tok, rng, block_len=(4, 40), units=(2, 3))
        prompts.append(prompt + response[: rng.randint(len(response) // 2, len(response))])
    params = [vllm.SamplingParams(temperature=1.0, top_p=0.95, seed=100 + i, max_tokens=40) for i in range(8)]
    settings = MementoSettings(
        mask=MaskConfig.chat(keep_last_n=0), stop_on_format_error=False
    )  # sampled text rarely stays well-formed
    roomy = make_llm(settings)
    alone = [
        roomy.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)[0] for p, sp in zip(prompts, params, strict=True)
    ]
    tight = make_llm(settings, **SMALL_POOL)
    together = tight.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert scheduler_of(tight).memento_stats.recomputes > 0
    assert scheduler_of(roomy).memento_stats.evictions > 0
    for a, b in zip(alone, together, strict=True):
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
    for llm in (roomy, tight):
        free, total = free_blocks(llm)
        assert free == total
