"""The inference engine's API: sampling, generation, bad input, preemption, KV accounting, block cap.

Logits consistency (teacher forcing against the reference) lives in its own file; here the engine's
greedy tokens, finish reasons and live-KV counts are checked against ``reference_generate`` and
against hand-counted values, and everything else against independent small computations.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from helpers import records, tiny_model
from memento.chat import assistant_prefix_ids, chat_prompt
from memento.engine import LLM, EngineConfig, KVGeometry, LLMEngine, SamplingParams
from memento.engine import engine as engine_module
from memento.engine.sampling import SampledToken, _truncate, sample_tokens
from memento.format import SpecialTokenIds
from memento.masking import BlockCap, MaskConfig
from memento.modeling import build_tiny_model
from memento.reference import reference_generate
from memento.tiny_tokenizer import build_tiny_tokenizer

PARTIAL = (
    "<think>\n<|block_start|>1+2=3 3+4=7<|block_end|><|summary_start|>s=7<|summary_end|>\n"
    "<|block_start|>7+5=12<|block_end|><|summary_start|>s=12<|summary_end|>\n<|block_start|>"
)
PARTIAL_EVICTED = len("1+2=3 3+4=7") + len("7+5=12")  # the two closed blocks' reasoning, one char per token


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def specials(tok):
    return SpecialTokenIds.from_tokenizer(tok)


@pytest.fixture(scope="module")
def model(tok):
    # Seed 3: greedy runs from the prompts below stay well-formed for 16+ tokens, and the memento
    # prompt's greedy continuation differs between keep_last_n=0 and -1 (checked in a test).
    return tiny_model(tok, seed=3)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def prompts(tok):
    return {
        "plain": ids(tok, chat_prompt(tok, "Add 1 2 3")),
        "memento": ids(tok, chat_prompt(tok, "Add 1 2 4 5") + PARTIAL),
        "think": ids(tok, chat_prompt(tok, "Sum 9 8") + "<think>\n"),
    }


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def reference(model, tok, specials, prompt_list, keep_last_n: int, max_new_tokens: int):
    config = MaskConfig(keep_last_n=keep_last_n, require_assistant_section=True)
    return reference_generate(
        model,
        prompt_list,
        specials,
        config,
        max_new_tokens=max_new_tokens,
        eos_token_ids=[tok.eos_token_id],
        assistant_prefix=assistant_prefix_ids(tok),
        pad_token_id=tok.pad_token_id,
    )


def run_bounded(engine: LLMEngine, max_steps: int = 500, on_token=None) -> list:
    """run_to_completion with a bound on the steps, so a scheduler bug fails instead of hanging."""
    finished = []
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return finished
        finished.extend(engine.step(on_token))
    raise AssertionError(f"the engine did not finish within {max_steps} steps")


def solo(model, tok, prompt, params, **config):
    engine = LLMEngine(model, tok, EngineConfig.from_options(**config))
    engine.add_request(prompt, params)
    (out,) = run_bounded(engine)
    return out


# ----------------------------------------------------------------------------------------------
# 1. SamplingParams validation
# ----------------------------------------------------------------------------------------------

INVALID_PARAMS = [
    ("n", {"n": 0}),
    ("n", {"n": True}),
    ("n", {"n": 1.0}),
    ("temperature", {"temperature": -1}),
    ("temperature", {"temperature": float("nan")}),
    ("temperature", {"temperature": True}),
    ("top_p", {"top_p": 0}),
    ("top_p", {"top_p": 1.5}),
    ("top_k", {"top_k": -2}),
    ("top_k", {"top_k": True}),
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": True}),
    ("stop", {"stop": [""]}),
    ("stop", {"stop": ["ok", 3]}),
    ("seed", {"seed": "x"}),
    ("seed", {"seed": False}),
    ("logprobs", {"logprobs": -1}),
    ("logprobs", {"logprobs": True}),
]


@pytest.mark.parametrize(
    ("field", "kwargs"), INVALID_PARAMS, ids=[f"{f}={v}" for f, kw in INVALID_PARAMS for v in kw.values()]
)
def test_invalid_sampling_params_name_the_field(field, kwargs) -> None:
    with pytest.raises(ValueError, match=rf"invalid SamplingParams: {field} must") as err:
        SamplingParams(**kwargs)
    assert err.value.args[0].count(" must ") == 1, "only the bad field is reported"


def test_sampling_params_report_every_problem_and_normalise_stop() -> None:
    with pytest.raises(ValueError) as err:
        SamplingParams(n=0, top_p=2.0)
    assert "n must" in str(err.value) and "top_p must" in str(err.value)

    params = SamplingParams(stop="x", stop_token_ids=(3, 5))
    assert params.stop == ["x"] and params.stop_token_ids == [3, 5]
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]
    # The edges of the valid ranges are accepted.
    for ok in ({"top_k": -1}, {"top_k": 0}, {"top_p": 1.0}, {"temperature": 0}, {"logprobs": 0}, {"seed": 0}):
        SamplingParams(**ok)
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.1).greedy


# ----------------------------------------------------------------------------------------------
# 2. The sampler on hand-made logits
# ----------------------------------------------------------------------------------------------


def draws(logits_row: list[float], params: SamplingParams, count: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.tensor([logits_row])
    return [sample_tokens(logits, [params], [gen])[0].token_id for _ in range(count)]


def test_greedy_is_argmax_with_ties_to_the_lowest_id() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-5.0, -1.0, -2.0, -1.0]])
    params = [SamplingParams(temperature=0)] * 3
    assert [s.token_id for s in sample_tokens(logits, params, [None] * 3)] == [1, 0, 1]
    # bfloat16 logits are accepted (upcast first).
    assert sample_tokens(logits.bfloat16(), params, [None] * 3)[0].token_id == 1


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0, 100.0])
def test_top_k_1_and_a_tiny_top_p_are_greedy_at_any_temperature(temperature) -> None:
    row = [0.1, 0.5, 0.4, 0.45, -1.0, 0.0]  # argmax 1, no ties
    assert set(draws(row, SamplingParams(temperature=temperature, top_k=1), 50)) == {1}
    assert set(draws(row, SamplingParams(temperature=temperature, top_p=1e-6), 50)) == {1}


def test_top_k_2_only_ever_draws_the_two_best() -> None:
    row = [0.0, 2.0, 1.0, 1.9, 0.5, 1.8, 1.7, 0.2]  # best two: 1 and 3
    # A high temperature makes the untruncated distribution nearly uniform, so a leak would show.
    seen = draws(row, SamplingParams(temperature=10.0, top_k=2), 400)
    assert set(seen) == {1, 3}
    assert set(draws(row, SamplingParams(temperature=10.0), 400)) == set(range(8)), "control: no truncation"


def test_top_p_keeps_exactly_the_nucleus() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = torch.tensor(probs).log()
    # Sorted cumulative mass before each token: 0, .5, .8, .95; a token is kept while that is < top_p.
    for top_p, kept in ((0.4, [0]), (0.75, [0, 1]), (0.9, [0, 1, 2]), (0.99, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])):
        got = torch.softmax(_truncate(logits, -1, top_p), dim=-1)
        mass = sum(probs[i] for i in kept)
        want = torch.tensor([probs[i] / mass if i in kept else 0.0 for i in range(4)])
        torch.testing.assert_close(got, want)
    # Shuffled ids: the nucleus is by probability, not by position.
    order = [2, 0, 3, 1]
    shuffled = logits[order]  # probs .15 .5 .05 .3
    got = torch.softmax(_truncate(shuffled, -1, 0.75), dim=-1)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.625, 0.0, 0.375]))
    # Through the public sampler: only the nucleus is drawn, at about its renormalised frequencies.
    seen = draws(shuffled.tolist(), SamplingParams(top_p=0.75), 2000, seed=1)
    assert set(seen) == {1, 3}
    assert abs(seen.count(1) / 2000 - 0.625) < 0.04


def test_top_p_applies_after_temperature() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    # At temperature 1 the top token has .5 < .6, so the nucleus for top_p=.6 is {0, 1}; at temperature
    # 0.5 the probabilities go as p**2 (.25 .09 .0225 .0025, the top one .685 >= .6): the top token alone.
    torch.testing.assert_close(torch.softmax(_truncate(logits, -1, 0.6), dim=-1), torch.tensor([0.625, 0.375, 0, 0]))
    torch.testing.assert_close(torch.softmax(_truncate(logits / 0.5, -1, 0.6), dim=-1), torch.tensor([1.0, 0, 0, 0]))
    assert set(draws(logits.tolist(), SamplingParams(temperature=0.5, top_p=0.6), 200)) == {0}
    assert set(draws(logits.tolist(), SamplingParams(temperature=1.0, top_p=0.6), 200)) == {0, 1}


def test_same_seed_same_draws_and_rows_are_independent() -> None:
    torch.manual_seed(123)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=1.5), SamplingParams(temperature=0.8, top_k=10), SamplingParams(top_p=0.9)]

    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return [[s.token_id for s in sample_tokens(logits, params, gens)] for _ in range(40)]

    a, b = run([7, 8, 9]), run([7, 8, 9])
    assert a == b
    other = run([7, 100, 9])
    assert [r[0] for r in other] == [r[0] for r in a] and [r[2] for r in other] == [r[2] for r in a]
    assert [r[1] for r in other] != [r[1] for r in a], "a different seed gives different draws"
    # A row alone draws the same tokens as in the batch.
    gen = torch.Generator().manual_seed(8)
    alone = [sample_tokens(logits[1:2], params[1:2], [gen])[0].token_id for _ in range(40)]
    assert alone == [r[1] for r in a]


def test_logprobs_are_the_raw_log_softmax_and_top_logprobs_the_k_best() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 20)
    raw = torch.log_softmax(logits, dim=-1)
    params = [
        SamplingParams(temperature=0.7, top_k=3, logprobs=4),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(temperature=0),
    ]
    gens = [torch.Generator().manual_seed(1), None, None]
    for _ in range(10):
        out = sample_tokens(logits, params, gens)
        first = out[0]
        assert first.logprob == pytest.approx(float(raw[0, first.token_id]), abs=1e-6)  # not the tempered one
        best = torch.topk(raw[0], 4)
        assert list(first.top_logprobs) == best.indices.tolist()
        assert list(first.top_logprobs.values()) == pytest.approx(best.values.tolist(), abs=1e-6)
        assert out[1].logprob == pytest.approx(float(raw[1].max()), abs=1e-6) and out[1].top_logprobs is None
        assert out[2].logprob is None and out[2].top_logprobs is None
    no_lp = sample_tokens(logits[2:], params[2:], [None])[0]
    assert isinstance(no_lp, SampledToken) and no_lp.logprob is None


# ----------------------------------------------------------------------------------------------
# 3. Generation through the engine
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_last_n", [0, -1])
def test_greedy_batch_equals_the_reference(tok, specials, model, prompts, keep_last_n) -> None:
    plist = [prompts["plain"], prompts["memento"], prompts["think"]]
    llm = LLM(model, tok, keep_last_n=keep_last_n)
    outs = llm.generate(plist, greedy(16))
    refs = reference(model, tok, specials, plist, keep_last_n, 16)
    assert [o.prompt_token_ids for o in outs] == plist
    for out, ref in zip(outs, refs, strict=True):
        (c,) = out.outputs
        assert c.token_ids == ref.token_ids
        assert c.finish_reason == ref.finish_reason
        assert c.kv.live_kv == ref.live_kv
        assert c.text == tok.decode(c.token_ids)
        assert c.index == 0 and c.logprobs is None
    mem = outs[1].outputs[0].kv.live_kv
    if keep_last_n == 0:
        assert mem[0] == len(prompts["memento"]) - PARTIAL_EVICTED
    else:
        for p, out in zip(plist, outs, strict=True):
            n = len(out.outputs[0].token_ids)
            assert out.outputs[0].kv.live_kv == list(range(len(p), len(p) + n))
    assert llm.engine.pool.num_used == 0 and not llm.engine.has_unfinished()


def test_eviction_changes_the_greedy_continuation(tok, model, prompts) -> None:
    """Guard for the test above: with this model, memento and vanilla really generate differently."""
    a = solo(model, tok, prompts["memento"], greedy(16), keep_last_n=0).outputs[0].token_ids
    b = solo(model, tok, prompts["memento"], greedy(16), keep_last_n=-1).outputs[0].token_ids
    assert a != b


def test_eos_ends_a_request_and_ignore_eos_goes_on(tok, specials, prompts) -> None:
    model = tiny_model(tok, seed=4)  # greedy from the plain prompt emits <|im_end|> after a few tokens
    ref = reference(model, tok, specials, [prompts["plain"]], 0, 20)[0]
    assert ref.finish_reason == "eos"
    out = solo(model, tok, prompts["plain"], greedy(20)).outputs[0]
    assert out.token_ids == ref.token_ids and out.finish_reason == "eos"
    assert out.token_ids[-1] == tok.eos_token_id and out.stop_reason is None  # as vLLM: eos is no stop reason
    assert out.text == tok.decode(ref.token_ids)
    on = solo(model, tok, prompts["plain"], greedy(20, ignore_eos=True)).outputs[0]
    assert on.finish_reason == "length" and len(on.token_ids) == 20
    assert on.token_ids[: len(ref.token_ids)] == ref.token_ids
    # The eos id as a stop token id: finish_reason "stop".
    st = solo(model, tok, prompts["plain"], greedy(20, stop_token_ids=[tok.eos_token_id])).outputs[0]
    assert st.token_ids == ref.token_ids and st.finish_reason == "stop" and st.stop_reason == tok.eos_token_id


def test_a_seeded_request_draws_the_same_alone_or_batched(tok, model, prompts) -> None:
    params = SamplingParams(temperature=0.9, top_k=30, max_tokens=12, seed=7)
    alone = solo(model, tok, prompts["think"], params).outputs[0]
    engine = LLMEngine(model, tok, EngineConfig())
    engine.add_request(prompts["plain"], greedy(5), request_id="g")
    engine.add_request(prompts["memento"], SamplingParams(temperature=1.3, max_tokens=14, seed=99), request_id="s")
    engine.add_request(prompts["think"], params, request_id="x")
    engine.add_request(prompts["plain"], SamplingParams(temperature=1.0, max_tokens=9, n=2), request_id="u")
    done = {r.request_id: r for r in run_bounded(engine)}
    assert set(done) == {"g", "s", "x", "u"}
    assert done["x"].outputs[0].token_ids == alone.token_ids
    assert done["x"].outputs[0].finish_reason == alone.finish_reason
    # And it really is sampled, not greedy.
    assert alone.token_ids != solo(model, tok, prompts["think"], greedy(12)).outputs[0].token_ids


def test_n_samples_use_seed_plus_index(tok, model, prompts) -> None:
    params = SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=10)
    (out,) = LLM(model, tok).generate(prompts["plain"], params)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    tokens = [c.token_ids for c in out.outputs]
    assert len({tuple(t) for t in tokens}) == 3
    for i, c in enumerate(out.outputs):
        single = solo(model, tok, prompts["plain"], SamplingParams(temperature=1.0, max_tokens=10, seed=10 + i))
        assert c.token_ids == single.outputs[0].token_ids
        assert c.text == tok.decode(c.token_ids)


def test_stop_token_ids(tok, model, prompts) -> None:
    full = solo(model, tok, prompts["plain"], greedy(16)).outputs[0].token_ids
    stop_id = full[5]
    cut = full.index(stop_id) + 1
    out = solo(model, tok, prompts["plain"], greedy(16, stop_token_ids=[stop_id])).outputs[0]
    assert out.token_ids == full[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_trim_the_text(tok, model, prompts, include) -> None:
    full = solo(model, tok, prompts["plain"], greedy(16)).outputs[0].token_ids
    stop = tok.decode(full[4:6])
    assert len(stop) == 2
    # The first step at which the stop string has appeared, and where it starts in the text.
    end = next(n for n in range(1, len(full) + 1) if stop in tok.decode(full[:n]))
    at = tok.decode(full).find(stop)
    out = solo(model, tok, prompts["plain"], greedy(16, stop=stop, include_stop_str_in_output=include)).outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == full[:end]
    assert out.text == tok.decode(full)[: at + (len(stop) if include else 0)]
    # Several stop strings: the first to appear wins.
    never = "@@@@"
    out2 = solo(model, tok, prompts["plain"], greedy(16, stop=[never, stop])).outputs[0]
    assert out2.stop_reason == stop and out2.token_ids == full[:end]


def test_max_tokens_gives_length(tok, model, prompts) -> None:
    out = solo(model, tok, prompts["think"], greedy(5)).outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5 and out.stop_reason is None
    assert len(out.kv.live_kv) == 5


def test_logprobs_per_token(tok, model, prompts) -> None:
    """Vanilla, so the model's plain causal forward over prompt + output is the oracle."""
    prompt = prompts["plain"]
    params = [
        SamplingParams(temperature=0, max_tokens=8, logprobs=3),
        SamplingParams(temperature=1.0, max_tokens=8, logprobs=0, seed=3),
    ]
    outs = LLM(model, tok, keep_last_n=-1).generate([prompt, prompt], params)
    for out, p in zip(outs, params, strict=True):
        c = out.outputs[0]
        assert len(c.logprobs) == len(c.token_ids) == len(c.top_logprobs) == 8
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + c.token_ids])).logits[0].float()
        lp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        for i, t in enumerate(c.token_ids):
            assert c.logprobs[i] == pytest.approx(float(lp[i, t]), abs=1e-4)
            if p.logprobs:
                best = torch.topk(lp[i], 3)
                assert list(c.top_logprobs[i]) == best.indices.tolist()
                assert list(c.top_logprobs[i].values()) == pytest.approx(best.values.tolist(), abs=1e-4)
            else:
                assert c.top_logprobs[i] is None
        if p.greedy:
            assert c.logprobs == pytest.approx(lp.max(dim=-1).values.tolist(), abs=1e-4)


def test_streaming_callback_sees_every_token_in_order(tok, model, prompts) -> None:
    seen: dict[tuple[str, int], list[int]] = {}

    def on_token(request_id, index, token_id, sampled) -> None:
        assert isinstance(sampled, SampledToken) and sampled.token_id == token_id
        seen.setdefault((request_id, index), []).append(token_id)

    llm = LLM(model, tok)
    outs = llm.generate(
        [prompts["plain"], prompts["memento"]],
        [greedy(7), SamplingParams(n=2, temperature=1.0, max_tokens=11, seed=1)],
        on_token=on_token,
    )
    want = {(o.request_id, c.index): c.token_ids for o in outs for c in o.outputs}
    assert seen == want
    assert sum(len(v) for v in want.values()) == llm.engine.stats.generated_tokens
    assert len(want) == 3 and len(want[(outs[0].request_id, 0)]) == 7


def test_requests_added_between_steps(tok, specials, model, prompts) -> None:
    engine = LLMEngine(model, tok, EngineConfig(mask=MaskConfig.chat(keep_last_n=0)))
    finished = []
    engine.add_request(prompts["memento"], greedy(14), request_id="a")
    finished += engine.step()
    finished += engine.step()
    engine.add_request(prompts["plain"], greedy(10), request_id="b")
    finished += engine.step()
    engine.add_request(prompts["think"], SamplingParams(temperature=1.0, max_tokens=6, seed=5), request_id="c")
    for _ in range(3):
        finished += engine.step()
    engine.add_request(prompts["think"], greedy(3), request_id="d")
    finished += run_bounded(engine)
    by_id = {r.request_id: r for r in finished}
    assert sorted(r.request_id for r in finished) == ["a", "b", "c", "d"], "each finishes exactly once"
    refs = reference(model, tok, specials, [prompts["memento"], prompts["plain"], prompts["think"]], 0, 14)
    assert by_id["a"].outputs[0].token_ids == refs[0].token_ids
    assert by_id["a"].outputs[0].kv.live_kv == refs[0].live_kv
    assert by_id["b"].outputs[0].token_ids == refs[1].token_ids[:10]
    assert by_id["d"].outputs[0].token_ids == refs[2].token_ids[:3]
    c_alone = solo(model, tok, prompts["think"], SamplingParams(temperature=1.0, max_tokens=6, seed=5))
    assert by_id["c"].outputs[0].token_ids == c_alone.outputs[0].token_ids
    assert engine.pool.num_used == 0 and engine.stats.decode_steps > 0 and engine.stats.prefill_steps >= 4


# ----------------------------------------------------------------------------------------------
# 4. Bad input
# ----------------------------------------------------------------------------------------------


def test_bad_requests_raise_and_leave_the_in_flight_request_alone(tok, specials, model, prompts) -> None:
    prompt = prompts["memento"]
    budget = len(prompt) + 20
    engine = LLMEngine(
        model,
        tok,
        EngineConfig(mask=MaskConfig.chat(keep_last_n=0), kv_budget_tokens=budget, max_model_len=budget + 10),
    )
    rid = engine.add_request(prompt, greedy(12))
    engine.step()
    engine.step()
    letter = ids(tok, "a")[0]
    vocab = model.config.vocab_size
    bad = [
        (lambda: engine.add_request([letter] * (budget + 1)), rf"KV budget is {budget} tokens"),
        (lambda: engine.add_request([letter] * (budget + 10)), rf"the context holds {budget + 10}"),
        (lambda: engine.add_request([letter] * (budget + 50)), r"the context holds"),
        (lambda: engine.add_request([]), r"the prompt is empty"),
        (lambda: engine.add_request(""), r"the prompt is empty"),
        (
            lambda: engine.add_request([letter, vocab]),
            rf"out of the vocabulary \(0\.\.{vocab - 1}\): \[{vocab}\]",
        ),
        (lambda: engine.add_request([-1, letter]), r"out of the vocabulary.*\[-1\]"),
        (lambda: engine.add_request(prompt, greedy(3), request_id=rid), rf"request id '{rid}' is already in use"),
        (lambda: engine.add_request(prompt, {"temperature": 0}), r"params must be SamplingParams"),
        (lambda: engine.add_request(ids(tok, chat_prompt(tok, "x") + "ab<|block_end|>")), r"malformed"),
    ]
    for call, match in bad:
        with pytest.raises(ValueError, match=match):
            call()
    assert list(engine.scheduler.waiting) == [] and len(engine.scheduler.running) == 1
    done = run_bounded(engine)
    assert [r.request_id for r in done] == [rid]
    ref = reference(model, tok, specials, [prompt], 0, 12)[0]
    assert done[0].outputs[0].token_ids == ref.token_ids and done[0].outputs[0].kv.live_kv == ref.live_kv
    assert engine.pool.num_used == 0
    # The id is free again once its request has finished.
    engine.add_request(prompt, greedy(2), request_id=rid)
    (again,) = run_bounded(engine)
    assert again.request_id == rid and again.outputs[0].token_ids == ref.token_ids[:2]


def test_a_prompt_just_under_max_model_len_gets_one_token(tok, model, prompts) -> None:
    prompt = prompts["plain"]
    engine = LLMEngine(model, tok, EngineConfig(max_model_len=len(prompt) + 3))
    engine.add_request(prompt, greedy(10))
    (out,) = run_bounded(engine)
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 3
    with pytest.raises(ValueError, match="no room for one generated token"):
        LLMEngine(model, tok, EngineConfig(max_model_len=len(prompt))).add_request(prompt)
    assert LLMEngine(model, tok).max_model_len == model.config.max_position_embeddings


def test_token_only_engine(tok, specials, model, prompts) -> None:
    prefix = assistant_prefix_ids(tok)
    with pytest.raises(ValueError, match="tokenizer or specials="):
        LLMEngine(model, None, EngineConfig(assistant_prefix=prefix))
    with pytest.raises(ValueError, match="assistant_prefix"):
        LLMEngine(model, None, EngineConfig(), specials=specials)
    engine = LLMEngine(model, None, EngineConfig(assistant_prefix=prefix), specials=specials)
    rid = engine.add_request(prompts["memento"], greedy(10))
    engine.step()
    with pytest.raises(ValueError, match="a text prompt needs a tokenizer"):
        engine.add_request("hello")
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.add_request(prompts["plain"], greedy(4, stop=["x"]))
    (out,) = run_bounded(engine)
    assert out.request_id == rid
    with_tok = solo(model, tok, prompts["memento"], greedy(10))
    assert out.outputs[0].token_ids == with_tok.outputs[0].token_ids
    assert out.outputs[0].text is None


def test_llm_generate_checks_the_params_count(tok, model, prompts) -> None:
    llm = LLM(model, tok)
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        llm.generate([prompts["plain"]], [greedy(2), greedy(2)])
    (out,) = llm.generate("Hi", greedy(3))  # a bare text prompt is one prompt
    assert out.prompt_token_ids == ids(tok, "Hi") and len(out.outputs[0].token_ids) == 3


def test_unknown_architecture_is_refused(tok) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok))
    gpt2 = GPT2LMHeadModel(config)
    gpt2.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'.*qwen3, qwen2, llama, mistral"):
        LLMEngine(gpt2, tok, EngineConfig(kv_budget_tokens=64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kv_budget_tokens": 0}, "kv_budget_tokens must be a positive integer"),
        ({"kv_budget_tokens": True}, "kv_budget_tokens must be a positive integer"),
        ({"max_num_seqs": 0}, "max_num_seqs must be a positive integer"),
        ({"max_num_batched_tokens": -3}, "max_num_batched_tokens must be a positive integer"),
        ({"max_block_tokens": 0}, "max_block_tokens must be a positive integer"),
        ({"keep_last_n": -2}, "keep_last_n must be -1"),
        ({"watermark": 1.0}, r"watermark must be in \[0, 1\)"),
        ({"restart": True, "keep_last_n": 1}, "restart mode"),
    ],
)
def test_engine_config_validation(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        EngineConfig.from_options(**kwargs)


# ----------------------------------------------------------------------------------------------
# 5. Robustness: preemption and a request bigger than the pool
# ----------------------------------------------------------------------------------------------


def many_prompts(tok) -> list[list[int]]:
    problems = ["Add 1 2 3", "Sum 9 8", "Add 40 2", "Count a b c d", "Sum 7", "Add 5 5 5 5 5", "Max 3 9 1", "Add 2"]
    out = []
    for i, problem in enumerate(problems):
        suffix = PARTIAL if i % 3 == 1 else ("<think>\n" if i % 3 == 2 else "")
        out.append(ids(tok, chat_prompt(tok, problem) + suffix))
    return out


def test_preemption_under_a_tiny_budget_keeps_the_outputs(tok, model) -> None:
    plist = many_prompts(tok)
    max_tokens = 10
    params = [greedy(max_tokens)] * 7 + [SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=11)]

    def run(budget: int):
        engine = LLMEngine(model, tok, EngineConfig(mask=MaskConfig.chat(keep_last_n=0), kv_budget_tokens=budget))
        rids = [engine.add_request(p, sp) for p, sp in zip(plist, params, strict=True)]
        done = {r.request_id: r for r in run_bounded(engine, max_steps=2000)}
        assert set(done) == set(rids) and not engine.has_unfinished()
        return engine, [done[r].outputs[0] for r in rids]

    big_engine, big = run(4096)
    assert big_engine.stats.preemptions == 0
    budget = max(len(p) for p in plist) + max_tokens + 2  # one sequence fits, two of the long ones do not
    small_engine, small = run(budget)
    assert small_engine.stats.preemptions > 0
    assert sum(o.kv.preemptions for o in small) == small_engine.stats.preemptions
    assert max(small_engine.stats.pool_used) <= budget
    assert small_engine.pool.num_used == 0
    for a, b in zip(big, small, strict=True):
        assert b.token_ids == a.token_ids
        assert b.finish_reason == a.finish_reason
        assert b.kv.live_kv == a.kv.live_kv
        assert (b.kv.evictions, b.kv.evicted_tokens) == (a.kv.evictions, a.kv.evicted_tokens)
    assert sum(o.kv.evictions for o in small) == 2 * 3  # the three prompts holding PARTIAL's two units
    assert small_engine.stats.evictions == big_engine.stats.evictions


def test_a_request_bigger_than_the_pool_ends_with_kv_budget(tok, model, prompts) -> None:
    budget = 60
    long_prompt = prompts["plain"]
    assert len(long_prompt) < budget
    others = [prompts["think"], prompts["plain"]]
    engine = LLMEngine(model, tok, EngineConfig(mask=MaskConfig.chat(keep_last_n=-1), kv_budget_tokens=budget))
    engine.add_request(long_prompt, greedy(100), request_id="long")
    for i, p in enumerate(others):
        engine.add_request(p, greedy(6), request_id=f"ok{i}")
    done = {r.request_id: r for r in run_bounded(engine, max_steps=1000)}
    assert set(done) == {"long", "ok0", "ok1"}
    long = done["long"].outputs[0]
    assert long.finish_reason == "kv_budget" and "KV pool" in long.error
    # It ran until it alone filled the pool: prompt + fed outputs == budget, plus the one it sampled last.
    assert len(long.token_ids) == budget - len(long_prompt) + 1
    unbounded = solo(model, tok, long_prompt, greedy(100), keep_last_n=-1).outputs[0]
    assert long.token_ids == unbounded.token_ids[: len(long.token_ids)]
    for i, p in enumerate(others):
        out = done[f"ok{i}"].outputs[0]
        assert out.finish_reason == "length"
        assert out.token_ids == solo(model, tok, p, greedy(6), keep_last_n=-1).outputs[0].token_ids
    assert engine.stats.aborted == 1 and engine.pool.num_used == 0


def test_a_prompt_that_fills_the_pool_gets_one_token(tok, model) -> None:
    engine = LLMEngine(model, tok, EngineConfig(kv_budget_tokens=30))
    engine.add_request(ids(tok, "a" * 30), greedy(5))
    (out,) = run_bounded(engine, max_steps=20)
    assert out.outputs[0].finish_reason == "kv_budget" and len(out.outputs[0].token_ids) == 1


# ----------------------------------------------------------------------------------------------
# 6. KV accounting
# ----------------------------------------------------------------------------------------------


def test_kv_geometry_bytes_per_token(tok, model) -> None:
    cfg = model.config
    geo = KVGeometry.from_config(cfg, torch.float32)
    assert (geo.num_layers, geo.num_kv_heads, geo.head_dim) == (2, 2, 8)
    assert geo.bytes_per_token == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4 == 256
    assert KVGeometry.from_config(cfg, torch.bfloat16).bytes_per_token == 128
    # No head_dim and no num_key_value_heads: hidden / heads and one KV head per head.
    bare = SimpleNamespace(num_attention_heads=4, hidden_size=64, num_hidden_layers=3)
    assert KVGeometry.from_config(bare, torch.float16).bytes_per_token == 2 * 3 * 4 * 16 * 2
    engine = LLMEngine(model, tok, EngineConfig(kv_budget_tokens=10))
    assert engine.geometry.bytes_per_token == 256
    assert engine.pool.keys[0].shape == (11, 2, 8) and len(engine.pool.values) == 2  # slot 0 is scratch


def test_peak_and_auc_are_max_and_sum_of_live_kv(tok, model, prompts) -> None:
    outs = LLM(model, tok, keep_last_n=0).generate([prompts["memento"], prompts["plain"]], greedy(9))
    for out in outs:
        kv = out.outputs[0].kv
        assert len(kv.live_kv) == 9
        assert kv.peak == max(kv.live_kv) and kv.auc == sum(kv.live_kv)
    p = len(prompts["plain"])
    assert outs[1].outputs[0].kv.auc == sum(range(p, p + 9))


def test_forced_memento_continuation_counts_evictions(tok, model) -> None:
    (rec,) = records(1)
    prompt = ids(tok, chat_prompt(tok, rec["problem"]))
    forced = ids(tok, rec["response"])
    block_start, block_end = tok.convert_tokens_to_ids(["<|block_start|>", "<|block_end|>"])
    starts = [i for i, t in enumerate(forced) if t == block_start]
    ends = [i for i, t in enumerate(forced) if t == block_end]
    assert len(starts) == len(ends) == 3
    interior = sum(e - s - 1 for s, e in zip(starts, ends, strict=True))

    results = {}
    for keep in (0, -1):
        engine = LLMEngine(model, tok, EngineConfig(mask=MaskConfig.chat(keep_last_n=keep)))
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=len(forced)), forced_tokens=forced)
        engine.add_request(prompt, greedy(4), request_id="free")  # a free-running neighbour
        done = {r.request_id: r for r in run_bounded(engine)}
        out = done["0"].outputs[0]
        assert out.token_ids == forced and out.finish_reason == "length"
        assert engine.pool.num_used == 0
        results[keep] = (out, engine)

    mem, engine = results[0]
    assert mem.kv.evictions == 3 and mem.kv.evicted_tokens == interior
    assert engine.stats.evictions == 3 and engine.stats.evicted_tokens == interior
    # The last step sees the prompt and all forced tokens but the last, less the evicted interiors.
    assert mem.kv.live_kv[-1] == len(prompt) + len(forced) - 1 - interior
    van, engine = results[-1]
    assert van.kv.evictions == 0 and engine.stats.evictions == 0
    assert van.kv.live_kv == list(range(len(prompt), len(prompt) + len(forced)))
    assert mem.kv.peak < van.kv.peak and mem.kv.auc < van.kv.auc


# ----------------------------------------------------------------------------------------------
# 7. Architectures and dtypes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_other_architectures_match_the_reference(tok, specials, prompts, arch) -> None:
    model = build_tiny_model(
        tok, arch=arch, hidden_size=32, num_hidden_layers=2, intermediate_size=64, tie_word_embeddings=False, seed=3
    )
    assert model.config.model_type == arch
    plist = [prompts["memento"], prompts["think"]]
    outs = LLM(model, tok, keep_last_n=0).generate(plist, greedy(12))
    refs = reference(model, tok, specials, plist, 0, 12)
    for out, ref in zip(outs, refs, strict=True):
        assert out.outputs[0].token_ids == ref.token_ids
        assert out.outputs[0].finish_reason == ref.finish_reason
        assert out.outputs[0].kv.live_kv == ref.live_kv


def test_bfloat16_runs(tok, prompts) -> None:
    model = build_tiny_model(
        tok, hidden_size=32, num_hidden_layers=2, intermediate_size=64, tie_word_embeddings=False, dtype=torch.bfloat16
    )
    llm = LLM(model, tok, keep_last_n=0)
    assert llm.engine.pool.keys[0].dtype == torch.bfloat16 and llm.engine.geometry.bytes_per_token == 128
    params = [greedy(10, logprobs=2), SamplingParams(temperature=0.8, max_tokens=10, seed=0, logprobs=0)]
    outs = llm.generate([prompts["memento"], prompts["plain"]], params)
    for out in outs:
        c = out.outputs[0]
        assert c.finished and c.finish_reason in {"length", "eos", "format_error"}
        assert 1 <= len(c.token_ids) <= 10 and all(0 <= t < model.config.vocab_size for t in c.token_ids)
        assert all(math.isfinite(lp) and lp <= 0 for lp in c.logprobs)
    assert llm.engine.pool.num_used == 0


# ----------------------------------------------------------------------------------------------
# 8. The block-length cap
# ----------------------------------------------------------------------------------------------


def scripted_sampler(script: list[int]):
    """A stand-in for sample_tokens that returns the scripted tokens in turn (one request at a time)."""
    tokens = iter(script)

    def sample(logits, params, generators, histories=None):
        assert len(params) == 1
        return [SampledToken(next(tokens))]

    return sample


def test_block_cap_forces_block_end(tok, specials, model, monkeypatch) -> None:
    a, s, z, t, four = ids(tok, "aszt4")
    bs, be, ss, se = specials.block_start, specials.block_end, specials.summary_start, specials.summary_end
    te = specials.think_end
    script = [bs, a, a, a, ss, s, se, bs, z, be, ss, t, se, te, four, tok.eos_token_id]
    prompt = ids(tok, chat_prompt(tok, "Add 1 2") + "<think>\n")

    monkeypatch.setattr(engine_module, "sample_tokens", scripted_sampler(script))
    out = solo(model, tok, prompt, greedy(30), max_block_tokens=2).outputs[0]
    assert out.token_ids == [bs, a, a, be, ss, s, se, bs, z, be, ss, t, se, te, four, tok.eos_token_id]
    assert out.finish_reason == "eos"
    assert (out.kv.evictions, out.kv.evicted_tokens) == (2, 2 + 1)

    # Without the cap the third plain token stays, and the summary after it is malformed.
    monkeypatch.setattr(engine_module, "sample_tokens", scripted_sampler(script))
    out = solo(model, tok, prompt, greedy(30)).outputs[0]
    assert out.token_ids == [bs, a, a, a, ss] and out.finish_reason == "format_error" and out.error


def test_block_cap_state_tracking(tok, specials) -> None:
    cap = BlockCap(specials, 2)
    cap.feed(ids(tok, chat_prompt(tok, "x")))
    a = ids(tok, "a")[0]
    assert not cap.must_end
    cap.feed([specials.block_start])
    assert cap.open and cap.length == 0 and not cap.must_end
    cap.feed([a])
    assert not cap.must_end
    cap.feed([a])
    assert cap.length == 2 and cap.must_end
    cap.feed([specials.block_end])
    assert not cap.open and not cap.must_end
    cap.feed([a])
    assert cap.length == 2 and not cap.must_end, "plain text outside a block is not capped"
    with pytest.raises(ValueError, match="max_block_tokens must be a positive integer"):
        BlockCap(specials, 0)


def test_block_cap_applies_to_a_block_opened_in_the_prompt(tok, specials, model, monkeypatch) -> None:
    a = ids(tok, "a")[0]
    prompt = ids(tok, chat_prompt(tok, "Add 1 2") + "<think>\n<|block_start|>")
    monkeypatch.setattr(engine_module, "sample_tokens", scripted_sampler([a] * 8))
    out = solo(model, tok, prompt, greedy(4), max_block_tokens=2).outputs[0]
    assert out.token_ids[:3] == [a, a, specials.block_end]


# ----------------------------------------------------------------------------------------------
# Regressions: engine bugs found while writing these tests (fixed)
# ----------------------------------------------------------------------------------------------


def test_empty_forced_tokens_are_refused_up_front(tok, model, prompts) -> None:
    engine = LLMEngine(model, tok, EngineConfig())
    engine.add_request(prompts["plain"], greedy(4), request_id="good")
    with pytest.raises(ValueError):
        engine.add_request(prompts["plain"], greedy(4), forced_tokens=[])
    (out,) = run_bounded(engine)
    assert out.request_id == "good" and len(out.outputs[0].token_ids) == 4


def test_out_of_vocabulary_forced_tokens_are_refused_up_front(tok, model, prompts) -> None:
    engine = LLMEngine(model, tok, EngineConfig())
    engine.add_request(prompts["plain"], greedy(4), request_id="good")
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request(prompts["plain"], greedy(4), forced_tokens=[model.config.vocab_size, 50])
    (out,) = run_bounded(engine)
    assert out.request_id == "good" and len(out.outputs[0].token_ids) == 4


def test_engine_eviction_totals_equal_the_sum_over_requests(tok, model, prompts) -> None:
    engine = LLMEngine(model, tok, EngineConfig(mask=MaskConfig.chat(keep_last_n=0)))
    engine.add_request(prompts["memento"], greedy(3))
    (out,) = run_bounded(engine)
    kv = out.outputs[0].kv
    assert (kv.evictions, kv.evicted_tokens) == (2, PARTIAL_EVICTED)
    assert (engine.stats.evictions, engine.stats.evicted_tokens) == (kv.evictions, kv.evicted_tokens)


def test_abort_request_frees_its_slots_and_leaves_the_others_alone(model, tok, prompts) -> None:
    engine = LLMEngine(model, tok, EngineConfig(kv_budget_tokens=1024, max_num_seqs=4))
    kept = engine.add_request(prompts["plain"], greedy(12))
    doomed = engine.add_request(prompts["think"], SamplingParams(n=2, temperature=0, max_tokens=50, ignore_eos=True))
    for _ in range(4):
        engine.step()
    used_by_both = engine.pool.num_used
    output = engine.abort_request(doomed)
    assert [o.finish_reason for o in output.outputs] == ["abort", "abort"]
    assert all(len(o.token_ids) >= 3 for o in output.outputs)  # what it had generated is kept
    assert engine.pool.num_used == used_by_both - 2 * (len(prompts["think"]) + len(output.outputs[0].token_ids) - 1)
    assert engine.abort_request(doomed) is None  # collected: unknown now
    assert engine.stats.cancelled == 1
    done = {r.request_id: r for r in engine.run_to_completion()}
    solo = LLMEngine(model, tok, EngineConfig(kv_budget_tokens=1024))
    solo.add_request(prompts["plain"], greedy(12), request_id="solo")
    assert done[kept].outputs[0].token_ids == solo.run_to_completion()[0].outputs[0].token_ids
    assert engine.pool.num_used == 0


def test_check_request_reads_the_config_only(model, tok, prompts) -> None:
    engine = LLMEngine(model, tok, EngineConfig(kv_budget_tokens=16))
    with pytest.raises(ValueError, match="KV budget"):
        engine.check_request(prompts["plain"], greedy(4))
    assert engine.check_request([1, 2, 3], greedy(4)) == [1, 2, 3]
    assert not engine.has_unfinished()


# ----------------------------------------------------------------------------------------------
# Fault isolation: one request's failure is that request's alone
# ----------------------------------------------------------------------------------------------

POISON_SEED = 666


def poisoned_sampler(real):
    """sample_tokens that fails on any batch holding a request seeded POISON_SEED (as a numerical
    failure inside one row would)."""

    def sample(logits, params, generators, histories=None):
        if any(p.seed == POISON_SEED for p in params):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, params, generators, histories)

    return sample


@pytest.mark.parametrize("where", ["sampling", "on_token"])
def test_a_failing_request_fails_alone_and_the_engine_goes_on(tok, model, prompts, monkeypatch, where) -> None:
    params = [greedy(12, seed=s) for s in (1, POISON_SEED, 2)]
    want = [solo(model, tok, prompts["plain"], p).outputs[0].token_ids for p in params]

    def on_token(request_id, index, token_id, sampled):
        if where == "on_token" and request_id == "bad":
            raise ValueError("the client's stream broke")

    if where == "sampling":
        monkeypatch.setattr(engine_module, "sample_tokens", poisoned_sampler(engine_module.sample_tokens))
    engine = LLMEngine(model, tok, EngineConfig(kv_budget_tokens=1024))
    for rid, p in zip(("a", "bad", "b"), params, strict=True):
        engine.add_request(prompts["plain"], p, request_id=rid)
    done = {r.request_id: r.outputs[0] for r in run_bounded(engine, on_token=on_token)}
    assert done["bad"].finish_reason == "error"
    assert ("sampling failed: RuntimeError" if where == "sampling" else "taking its token failed: ValueError") in (
        done["bad"].error or ""
    )
    assert done["a"].token_ids == want[0] and done["b"].token_ids == want[2]
    assert engine.stats.failed == 1 and engine.pool.num_used == 0
    # and the engine serves the next request as if nothing had happened
    engine.add_request(prompts["plain"], params[0], request_id="after")
    (after,) = run_bounded(engine)
    assert after.outputs[0].token_ids == want[0] and engine.pool.num_used == 0


def test_llm_generate_returns_the_failed_sample_with_its_reason(tok, model, prompts, monkeypatch) -> None:
    monkeypatch.setattr(engine_module, "sample_tokens", poisoned_sampler(engine_module.sample_tokens))
    outs = LLM(model, tok, kv_budget_tokens=1024).generate(
        [prompts["plain"]] * 2, [greedy(5, seed=POISON_SEED), greedy(5)]
    )
    assert [o.outputs[0].finish_reason for o in outs] == ["error", "length"]


def test_a_failing_forward_pass_stops_the_engine(tok, model, prompts, monkeypatch) -> None:
    """Shared state may be broken after the model itself fails: that is not caught per request."""
    engine = LLMEngine(model, tok, EngineConfig(kv_budget_tokens=1024))
    engine.add_request(prompts["plain"], greedy(4))

    def broken(plan, keep=1):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine.runner, "run", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.step()
