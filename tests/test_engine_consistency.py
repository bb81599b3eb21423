"""The engine's logits after physical eviction equal a dense-mask forward pass (the reference).

Random memento-structured sequences are teacher-forced through the engine one token per step;
at every step its logits must match :func:`memento.reference.teacher_forced_logits` (one plain HF
forward with the dense mask from masking.py) to 1e-4 in float32, for every mask setting, batched
with mixed lengths, and with preemption forced by a KV budget far below what the batch needs.
"""

from __future__ import annotations

import random

import pytest
import torch

from helpers import memento_case as random_case
from helpers import tiny_model
from memento.chat import assistant_prefix_ids, chat_prompt
from memento.engine import EngineConfig, LLMEngine, SamplingParams
from memento.format import SpecialTokenIds
from memento.masking import MaskConfig, compute_visibility
from memento.reference import forward_logits, reference_generate, teacher_forced_logits
from memento.tiny_tokenizer import build_tiny_tokenizer

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer)


def engine_logits(model, tokenizer, cases, config: EngineConfig) -> tuple[list[torch.Tensor], LLMEngine]:
    """Teacher-force every case through one engine; the logits of each step, per case."""
    engine = LLMEngine(model, tokenizer, config)
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=len(c)), forced_tokens=c) for p, c in cases]
    done = {r.request_id: r.outputs[0] for r in engine.run_to_completion()}
    outs = []
    for request_id, (_, continuation) in zip(ids, cases, strict=True):
        out = done[request_id]
        assert out.token_ids == continuation
        assert out.finish_reason == "length"
        outs.append(torch.stack(out.logits))
    assert engine.pool.num_used == 0
    return outs, engine


def reference_logits(model, tokenizer, cases, mask: MaskConfig) -> list[torch.Tensor]:
    specials = SpecialTokenIds.from_tokenizer(tokenizer)
    sequences = [p + c for p, c in cases]
    full = teacher_forced_logits(
        model,
        sequences,
        specials,
        mask,
        assistant_prefix=assistant_prefix_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    # The logits that chose continuation token t are those of the token before it.
    return [logits[len(p) - 1 : len(p) + len(c) - 1] for logits, (p, c) in zip(full, cases, strict=True)]


MODES = [
    pytest.param(dict(keep_last_n=-1), id="vanilla"),
    pytest.param(dict(keep_last_n=0), id="keep0"),
    pytest.param(dict(keep_last_n=1), id="keep1"),
    pytest.param(dict(keep_last_n=0, mask_delimiters=True), id="keep0-delims"),
    pytest.param(dict(keep_last_n=1, mask_delimiters=True), id="keep1-delims"),
    pytest.param(dict(keep_last_n=0, keep_last_block_for_answer=True), id="keep0-lastblock"),
    pytest.param(dict(keep_last_n=0, restart=True), id="restart"),
]


@pytest.mark.parametrize("knobs", MODES)
@pytest.mark.parametrize(
    "batch,budget",
    [pytest.param(1, 4096, id="batch1"), pytest.param(8, 4096, id="batch8"), pytest.param(8, 160, id="preempt")],
)
def test_teacher_forced_logits_match_dense_mask_forward(model, tokenizer, knobs, batch, budget):
    rng = random.Random(f"{sorted(knobs.items())}-{batch}-{budget}")
    cases = [random_case(tokenizer, rng) for _ in range(batch)]
    config = EngineConfig(
        kv_budget_tokens=budget, keep_logits=True, max_num_batched_tokens=48, mask=MaskConfig.chat(**knobs)
    )
    got, engine = engine_logits(model, tokenizer, cases, config)
    want = reference_logits(model, tokenizer, cases, config.mask)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert (g - w).abs().max().item() <= TOLERANCE
    if budget < 4096:
        assert engine.stats.preemptions > 0  # the budget really forced recomputation
    if knobs["keep_last_n"] >= 0:
        assert engine.stats.evictions > 0


def test_eviction_really_frees_slots(model, tokenizer):
    """Memento mode holds fewer slots than vanilla on the same sequences, and peaks lower."""
    rng = random.Random(7)
    cases = [random_case(tokenizer, rng) for _ in range(4)]
    peaks = {}
    for keep in (-1, 0):
        config = EngineConfig(mask=MaskConfig.chat(keep_last_n=keep), keep_logits=True)
        _, engine = engine_logits(model, tokenizer, cases, config)
        peaks[keep] = engine.stats.peak_kv
        if keep == 0:
            assert engine.stats.evicted_tokens > 0
    assert peaks[0] < peaks[-1]


@pytest.mark.parametrize("keep", [-1, 0, 1])
def test_greedy_generation_equals_reference_generator(model, tokenizer, keep):
    """Free-running greedy decoding: the same tokens, finish reasons and live KV as the reference."""
    rng = random.Random(keep)
    # Prompts that end inside a memento trace, so the model's continuations exercise eviction.
    cases = [random_case(tokenizer, rng) for _ in range(5)]
    prompts = [p + c[: rng.randint(1, len(c))] for p, c in cases]
    mask = MaskConfig(keep_last_n=keep, require_assistant_section=True)
    want = reference_generate(
        model,
        prompts,
        SpecialTokenIds.from_tokenizer(tokenizer),
        mask,
        max_new_tokens=12,
        eos_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        assistant_prefix=assistant_prefix_ids(tokenizer),
    )
    engine = LLMEngine(model, tokenizer, EngineConfig(mask=MaskConfig.chat(keep_last_n=keep), kv_budget_tokens=200))
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=12)) for p in prompts]
    done = {r.request_id: r.outputs[0] for r in engine.run_to_completion()}
    for request_id, ref in zip(ids, want, strict=True):
        out = done[request_id]
        assert out.token_ids == ref.token_ids
        assert out.finish_reason == ref.finish_reason
        assert out.kv.live_kv == ref.live_kv


@pytest.mark.parametrize("keep", [-1, 0])
def test_broken_structure_stops_tracking_when_tolerated(model, tokenizer, keep):
    """stop_on_format_error=False: evictions before the defect stand, the rest is plain causal rows."""
    prompt = tokenizer(chat_prompt(tokenizer, "x1"), add_special_tokens=False)["input_ids"]
    good = "<think>\n<|block_start|>ab1<|block_end|><|summary_start|>m<|summary_end|>\n"
    bad = "<|summary_end|>cd<|block_start|>ef"  # a memento end with no memento: the defect
    continuation = tokenizer(good + bad, add_special_tokens=False)["input_ids"]
    config = EngineConfig(mask=MaskConfig.chat(keep_last_n=keep), keep_logits=True, stop_on_format_error=False)
    (got,), engine = engine_logits(model, tokenizer, [(prompt, continuation)], config)
    vis = compute_visibility(
        prompt + continuation,
        SpecialTokenIds.from_tokenizer(tokenizer),
        config.mask,
        assistant_prefix_ids(tokenizer),
        stop_tracking_on_error=True,
    )
    (want,) = forward_logits(model, [vis], pad_token_id=tokenizer.pad_token_id)
    want = want[len(prompt) - 1 : len(prompt) + len(continuation) - 1]
    assert (got - want).abs().max().item() <= TOLERANCE
    assert engine.stats.evictions == (1 if keep == 0 else 0)
    # The default for an evicting engine is to stop at the defect.
    strict = LLMEngine(model, tokenizer, EngineConfig(mask=MaskConfig.chat(keep_last_n=keep)))
    strict.add_request(prompt, SamplingParams(temperature=0, max_tokens=len(continuation)), forced_tokens=continuation)
    (out,) = strict.run_to_completion()
    defect = len(tokenizer(good, add_special_tokens=False)["input_ids"])
    if keep == 0:
        assert out.outputs[0].finish_reason == "format_error" and len(out.outputs[0].token_ids) == defect + 1
    else:  # vanilla: structure plays no part, decoding goes on
        assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("knobs", MODES)
@pytest.mark.parametrize("budget", [pytest.param(4096, id="fits"), pytest.param(160, id="preempt")])
def test_prompt_logprobs_match_dense_mask_forward(model, tokenizer, knobs, budget):
    """Prompt logprobs (echo scoring) of prompts that hold whole memento traces, closed blocks included,
    equal the log-softmax of the dense-mask forward: the prompt is scored as the engine sees it, through
    chunked prefill (48-token chunks) and, at 160 slots, preemption and recomputation."""
    rng = random.Random(f"prompt-{sorted(knobs.items())}-{budget}")
    cases = [random_case(tokenizer, rng, units=(2, 4)) for _ in range(6)]
    prompts = [p + c for p, c in cases]
    config = EngineConfig(kv_budget_tokens=budget, max_num_batched_tokens=48, mask=MaskConfig.chat(**knobs))
    engine = LLMEngine(model, tokenizer, config)
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2, n=2)) for p in prompts]
    done = {r.request_id: r for r in engine.run_to_completion()}
    full = teacher_forced_logits(
        model,
        prompts,
        SpecialTokenIds.from_tokenizer(tokenizer),
        config.mask,
        assistant_prefix=assistant_prefix_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    for request_id, prompt, logits in zip(ids, prompts, full, strict=True):
        out = done[request_id]
        want = torch.log_softmax(logits[:-1], dim=-1)
        target = torch.tensor(prompt[1:])
        assert out.prompt_logprobs[0] is None and out.prompt_top_logprobs[0] is None
        got = torch.tensor(out.prompt_logprobs[1:])
        assert got.shape == (len(prompt) - 1,)
        assert (got - want.gather(1, target[:, None])[:, 0]).abs().max().item() <= TOLERANCE
        for t, top in enumerate(out.prompt_top_logprobs[1:]):
            best = torch.topk(want[t], 2)
            assert prompt[t + 1] in top and set(best.indices.tolist()) <= set(top)
            assert len(top) == 2 + (prompt[t + 1] not in best.indices.tolist())
    if budget < 4096:
        assert engine.stats.preemptions > 0
    if knobs["keep_last_n"] >= 0:
        assert engine.stats.evictions > 0


def test_prompt_logprobs_differ_from_plain_causal_scoring(model, tokenizer):
    """A control: under keep_last_n=0 a prompt after a closed block is scored without the block, so the
    logprobs of the tokens after it differ from a plain causal forward (the check above can fail)."""
    rng = random.Random(5)
    prompt, continuation = random_case(tokenizer, rng, units=(3, 3))
    ids = prompt + continuation
    engine = LLMEngine(model, tokenizer, EngineConfig(mask=MaskConfig.chat(keep_last_n=0)))
    engine.add_request(ids, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    (out,) = engine.run_to_completion()
    with torch.no_grad():
        causal = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    plain = causal.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    gap = (torch.tensor(out.prompt_logprobs[1:]) - plain).abs()
    assert gap[: len(prompt) - 1].max().item() <= TOLERANCE  # before any block closes: the same
    assert gap.max().item() > 1e-2  # after: the evicted block is gone
