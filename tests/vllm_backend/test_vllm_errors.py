"""Bad configuration fails at start-up saying what to change; bad requests fail alone.

Also the policies the embedded engine has: a memento structure that breaks mid-generation stops the
request (finish "stop", stop_reason ``memento_format_error``) or, with ``stop_on_format_error``
off, ends tracking there; and the block-length cap works together with eviction.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import vllm
from vllm_support import FORCE, ForcedTokens, free_blocks, scheduler_of

from helpers import memento_case
from memento.chat import assistant_prefix_ids, chat_prompt
from memento.engine import EngineConfig, LLMEngine
from memento.engine import SamplingParams as OurParams
from memento.format import SpecialTokenIds
from memento.masking import MaskConfig, compute_visibility
from memento.reference import forward_logits
from memento.vllm.config import SCHEDULER_CLS, WORKER_CLS, MementoSettings, engine_args
from memento.vllm.scheduler import FORMAT_ERROR


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def start(model_dir, memento: bool = True, **change):
    """Start an in-process engine on the tiny model (memento classes on unless ``memento=False``)."""
    kwargs = dict(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        distributed_executor_backend="uni",
        block_size=32,
        enable_prefix_caching=False,
    )
    if memento:
        kwargs = engine_args(MementoSettings(), **kwargs)
    kwargs.update(change)
    return vllm.LLM(**kwargs)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(enable_prefix_caching=True), "--no-enable-prefix-caching"),
        (dict(worker_cls="auto"), f"--worker-cls {WORKER_CLS}"),
    ],
    ids=["prefix-caching", "worker"],
)
def test_bad_engine_configuration_is_refused_at_start(model_dir, change, message):
    with pytest.raises(Exception, match="memento's vLLM backend cannot start") as info:
        start(model_dir, **change)
    assert message in str(info.value)


def test_the_memento_worker_without_the_memento_scheduler_is_refused(model_dir):
    with pytest.raises(Exception, match=f"--scheduler-cls {SCHEDULER_CLS}"):
        start(model_dir, memento=False, worker_cls=WORKER_CLS)


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match=r"unknown memento setting\(s\) \['keep_last'\]"):
        MementoSettings.from_dict({"keep_last": 0})
    with pytest.raises(ValueError, match="restart mode is defined for keep_last_n=0"):
        MementoSettings.from_dict({"keep_last_n": 1, "restart": True})


def plain_tokenizer(path):
    """A character tokenizer with ChatML but without the memento tokens (any ordinary model's)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from memento.tiny_tokenizer import CHATML_TEMPLATE, DEFAULT_ALPHABET

    specials = ["<|endoftext|>", "<|unk|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate([*specials, *DEFAULT_ALPHABET])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|endoftext|>",
        unk_token="<|unk|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
    )
    tokenizer.save_pretrained(path)


def test_a_tokenizer_without_memento_tokens_is_refused(model_dir, tmp_path):
    plain_tokenizer(tmp_path)
    with pytest.raises(Exception, match="has no memento tokens") as info:
        start(model_dir, tokenizer=str(tmp_path))
    assert "point --tokenizer at" in str(info.value)


def test_a_malformed_prompt_fails_alone(make_llm, tok):
    llm = make_llm(MementoSettings(mask=MaskConfig.chat(keep_last_n=0)))
    good = ids_of(tok, chat_prompt(tok, "a1") + "<think>\n<|block_start|>ab")
    bad = ids_of(tok, chat_prompt(tok, "a1") + "<think>\n<|summary_end|>")  # a memento end with no memento
    params = vllm.SamplingParams(temperature=0, max_tokens=8)
    alone = llm.generate([{"prompt_token_ids": good}], params, use_tqdm=False)[0].outputs[0]
    outs = llm.generate([{"prompt_token_ids": bad}, {"prompt_token_ids": good}], params, use_tqdm=False)
    refused, other = outs[0].outputs[0], outs[1].outputs[0]
    assert refused.finish_reason == "error" and list(refused.token_ids) == []
    assert "the prompt's memento structure is malformed" in str(refused.stop_reason)
    assert list(other.token_ids) == list(alone.token_ids)
    free, total = free_blocks(llm)
    assert free == total


@pytest.mark.parametrize("strict", [True, False])
def test_broken_structure_mid_generation(make_llm, model, tok, strict):
    """Strict: stop at the defect (its token included). Lenient: evictions before it stand, then plain."""
    settings = MementoSettings(mask=MaskConfig.chat(keep_last_n=0), stop_on_format_error=strict)
    prompt = ids_of(tok, chat_prompt(tok, "x1"))
    good = "<think>\n<|block_start|>ab1<|block_end|><|summary_start|>m<|summary_end|>\n"
    forced = ids_of(tok, good + "<|summary_end|>cd<|block_start|>ef")
    llm = make_llm(settings, logits_processors=[ForcedTokens])
    params = vllm.SamplingParams(
        temperature=0, max_tokens=len(forced), logprobs=-1, ignore_eos=True, extra_args={FORCE: forced}
    )
    (out,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    completion = out.outputs[0]
    defect = len(ids_of(tok, good))
    if strict:
        assert completion.finish_reason == "stop" and completion.stop_reason == FORMAT_ERROR
        assert list(completion.token_ids) == forced[: defect + 1]
        assert scheduler_of(llm).memento_stats.format_errors == 1
    else:
        assert list(completion.token_ids) == forced and completion.finish_reason == "length"
        vis = compute_visibility(
            prompt + forced,
            SpecialTokenIds.from_tokenizer(tok),
            settings.mask,
            assistant_prefix_ids(tok),
            stop_tracking_on_error=True,
        )
        (logits,) = forward_logits(model, [vis], pad_token_id=tok.pad_token_id)
        want = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        got = torch.tensor([[step[t].logprob for t in range(len(step))] for step in completion.logprobs])
        assert (got - want).abs().max().item() <= 1e-4
        assert scheduler_of(llm).memento_stats.evictions == 1
    free, total = free_blocks(llm)
    assert free == total


def test_the_block_cap_with_eviction_equals_the_engine(make_llm, model, tok):
    """The cap (a logits processor) forces <|block_end|>; eviction follows; tokens equal our engine's."""
    cap = 6
    settings = MementoSettings(mask=MaskConfig.chat(keep_last_n=0), max_block_tokens=cap)
    rng = random.Random(11)
    prompts = []
    for _ in range(4):
        prompt, response = memento_case(tok, rng, block_len=(4, 20), units=(1, 2))
        prompts.append(prompt + response)
    engine = LLMEngine(
        model, tok, EngineConfig(mask=MaskConfig.chat(keep_last_n=0), max_block_tokens=cap, kv_budget_tokens=4096)
    )
    ids = [engine.add_request(p, OurParams(temperature=0, max_tokens=30)) for p in prompts]
    done = {r.request_id: r.outputs[0] for r in engine.run_to_completion()}
    llm = make_llm(settings)
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], vllm.SamplingParams(temperature=0, max_tokens=30), use_tqdm=False
    )
    for rid, out in zip(ids, outs, strict=True):
        assert list(out.outputs[0].token_ids) == done[rid].token_ids
    uncapped = LLMEngine(model, tok, EngineConfig(mask=MaskConfig.chat(keep_last_n=0), kv_budget_tokens=4096))
    free_ids = [uncapped.add_request(p, OurParams(temperature=0, max_tokens=30)) for p in prompts]
    free_runs = {r.request_id: r.outputs[0].token_ids for r in uncapped.run_to_completion()}
    assert any(free_runs[f] != done[c].token_ids for f, c in zip(free_ids, ids, strict=True)), "the cap never bit"
    assert json.loads(json.dumps(settings.to_dict())) == {"max_block_tokens": cap}


@pytest.mark.parametrize(
    "knobs",
    [
        dict(keep_last_n=0),
        dict(keep_last_n=0, restart=True),
        dict(keep_last_n=1, mask_delimiters=True),
        dict(keep_last_n=0, keep_last_block_for_answer=True, stop_on_format_error=False),
    ],
    ids=["keep0", "restart", "keep1-delims", "lastblock-lenient"],
)
def test_a_mixed_workload_with_aborts_runs_clean(make_llm, tok, knobs):
    """Sampling, n=2, stop strings, logprobs, seeds, a tiny pool and clients that go away mid-run:
    every request ends, nothing crashes, and the KV pool is empty afterwards."""
    llm = make_llm(MementoSettings.from_dict(knobs), num_gpu_blocks_override=13, max_model_len=320, max_num_seqs=16)
    engine = llm.llm_engine
    rng = random.Random(str(knobs))
    ids = []
    for i in range(40):
        prompt, response = memento_case(tok, rng, block_len=(4, 50), units=(1, 4))
        temperature = rng.choice([0.0, 0.7, 1.0])
        params = vllm.SamplingParams(
            temperature=temperature,
            top_p=rng.choice([1.0, 0.9]),
            max_tokens=rng.randint(1, 60),
            n=1 if temperature == 0 else rng.choice([1, 2]),
            seed=i,
            logprobs=rng.choice([None, 2]),
            stop=rng.choice([None, ["ab"]]),
        )
        ids_in = (prompt + response[: rng.randint(0, len(response))])[:250]
        engine.add_request(f"r{i}", {"prompt_token_ids": ids_in}, params)
        ids.append(f"r{i}")
    finished, steps = set(), 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished.add(out.request_id)
        steps += 1
        if steps == 15:
            engine.abort_request([r for r in ids[::5] if r not in finished])  # clients gone mid-flight
    assert finished | set(ids[::5]) == set(ids)
    stats = scheduler_of(llm).memento_stats
    assert stats.evictions > 0 and stats.recomputes > 0
    free, total = free_blocks(llm)
    assert free == total
