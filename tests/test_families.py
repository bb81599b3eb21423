"""The paper's families (Qwen3, Phi-4 = Phi3, Olmo 3) under the memento rule, sliding windows included.

The engine's teacher-forced logits after physical eviction equal one dense-mask forward (the
reference, with :func:`memento.masking.window_mask` on the sliding layers) for tiny random models
of each family, whose window (8) is far below the sequences' length, in every mask setting,
batched and under forced preemption; a stage-2 training forward uses the same masks.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from helpers import FAMILY_ARCHS, FAMILY_WINDOW, family_model
from helpers import memento_case as random_case
from memento.chat import assistant_prefix_ids
from memento.engine import EngineConfig
from memento.format import SpecialTokenIds
from memento.masking import MaskConfig, compute_visibility, window_mask
from memento.modeling import layer_windows
from memento.tiny_tokenizer import build_tiny_tokenizer
from test_engine_consistency import TOLERANCE, engine_logits, reference_logits

FAMILIES = list(FAMILY_ARCHS)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def models(tokenizer):
    return {arch: family_model(tokenizer, arch) for arch in FAMILIES}


def long_cases(tokenizer, rng: random.Random, n: int):
    """Memento cases with blocks longer than the window, so evictions bring mementos back into it."""
    return [random_case(tokenizer, rng, block_len=(6, 16), units=(2, 4)) for _ in range(n)]


def test_family_models_have_the_expected_layers(models):
    assert layer_windows(models["qwen3"]) == {"full_attention": None}
    assert layer_windows(models["phi3"]) == {"sliding_attention": FAMILY_WINDOW}
    assert layer_windows(models["olmo3"]) == {"sliding_attention": FAMILY_WINDOW, "full_attention": None}
    assert type(models["phi3"]).__name__ == "Phi3ForCausalLM"
    assert models["olmo3"].config.layer_types == ["sliding_attention"] * 3 + ["full_attention"]


def test_the_window_binds_and_meets_evictions(tokenizer):
    """Guard on the cases: on them the window hides keys, and after an eviction a sliding layer sees
    a key more than W positions back (a memento brought back into the window), which a logical-position
    window would hide: the rule chosen in masking.py is really exercised."""
    specials = SpecialTokenIds.from_tokenizer(tokenizer)
    prefix = assistant_prefix_ids(tokenizer)
    cases = long_cases(tokenizer, random.Random(0), 8)
    binds = reaches_back = 0
    for prompt, continuation in cases:
        vis = compute_visibility(prompt + continuation, specials, MaskConfig.chat(keep_last_n=0), prefix)
        full = vis.dense()
        windowed = vis.dense(FAMILY_WINDOW)
        binds += int((full & ~windowed).any())
        distance = torch.as_tensor(vis.position_ids)[:, None] - torch.as_tensor(vis.position_ids)[None, :]
        reaches_back += int((windowed & (distance >= FAMILY_WINDOW)).any())
    assert binds == len(cases)
    assert reaches_back >= len(cases) // 2


def test_window_mask_is_the_last_w_visible_keys():
    """window_mask against a per-row count written out by hand."""
    rng = np.random.default_rng(0)
    mask = torch.from_numpy(np.tril(rng.random((30, 30)) < 0.6))
    for window in (1, 3, 7, 40):
        got = window_mask(mask, window)
        for q in range(30):
            keys = np.flatnonzero(mask[q].numpy())
            want = np.zeros(30, dtype=bool)
            want[keys[-window:]] = True
            assert np.array_equal(got[q].numpy(), want)
    assert window_mask(mask, None) is mask
    with pytest.raises(ValueError, match="positive"):
        window_mask(mask, 0)


MODES = [
    pytest.param(dict(keep_last_n=-1), id="vanilla"),
    pytest.param(dict(keep_last_n=0), id="keep0"),
    pytest.param(dict(keep_last_n=1), id="keep1"),
    pytest.param(dict(keep_last_n=0, mask_delimiters=True), id="keep0-delims"),
    pytest.param(dict(keep_last_n=0, keep_last_block_for_answer=True), id="keep0-lastblock"),
    pytest.param(dict(keep_last_n=0, restart=True), id="restart"),
]


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("knobs", MODES)
@pytest.mark.parametrize("batch,budget", [pytest.param(8, 4096, id="batch8"), pytest.param(6, 200, id="preempt")])
def test_engine_logits_match_the_dense_mask_forward(models, tokenizer, arch, knobs, batch, budget):
    model = models[arch]
    if arch == "phi3" and budget < 4096:
        budget = 60  # every layer slides: tokens past the window are freed, so far less KV is held
    rng = random.Random(f"{arch}-{sorted(knobs.items())}-{batch}")
    cases = long_cases(tokenizer, rng, batch)
    config = EngineConfig(
        kv_budget_tokens=budget, keep_logits=True, max_num_batched_tokens=48, mask=MaskConfig.chat(**knobs)
    )
    got, engine = engine_logits(model, tokenizer, cases, config)
    want = reference_logits(model, tokenizer, cases, config.mask)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert (g - w).abs().max().item() <= TOLERANCE
    if budget < 4096 and arch == "phi3" and knobs["keep_last_n"] < 0:
        # vanilla with every layer sliding holds the window alone: nothing can force a preemption
        assert engine.stats.preemptions == 0 and max(engine.stats.pool_used) <= budget
    elif budget < 4096:
        assert engine.stats.preemptions > 0
    if knobs["keep_last_n"] >= 0:
        assert engine.stats.evictions > 0


@pytest.mark.parametrize("arch", ["phi3", "olmo3"])
def test_tokens_past_every_window_are_freed_when_every_layer_slides(models, tokenizer, arch):
    """Phi3 with a window on every layer keeps the last W tokens (vanilla: W + 1 keys at each decode
    step); Olmo 3's full layers keep every visible key, so nothing is freed early there."""
    from memento.engine import LLMEngine, SamplingParams

    cases = long_cases(tokenizer, random.Random(11), 4)
    engine = LLMEngine(models[arch], tokenizer, EngineConfig(mask=MaskConfig.chat(keep_last_n=-1)))
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=len(c)), forced_tokens=c) for p, c in cases]
    done = {r.request_id: r.outputs[0].kv.live_kv for r in engine.run_to_completion()}
    assert engine.pool.num_used == 0
    for (prompt, continuation), request_id in zip(cases, ids, strict=True):
        live = done[request_id]
        if arch == "phi3":
            assert max(live[1:]) == FAMILY_WINDOW + 1  # after the prefill step: the window and the new row
        else:
            assert live[-1] == len(prompt) + len(continuation) - 1  # every earlier token is still held


def test_the_check_would_catch_a_missing_window(models, tokenizer):
    """Guard on the test itself: the engine's logits differ from a reference without the window."""
    import copy

    model = models["olmo3"]
    cases = long_cases(tokenizer, random.Random(5), 4)
    config = EngineConfig(keep_logits=True, mask=MaskConfig.chat(keep_last_n=0))
    got, _ = engine_logits(model, tokenizer, cases, config)
    unwindowed = copy.deepcopy(model)
    unwindowed.config.sliding_window = 10**6  # every sliding layer sees every visible key
    want = reference_logits(unwindowed, tokenizer, cases, config.mask)
    assert max((g - w).abs().max().item() for g, w in zip(got, want, strict=True)) > 100 * TOLERANCE


@pytest.mark.parametrize("arch", FAMILIES)
def test_stage2_training_forward_uses_the_engine_masks(models, tokenizer, arch, tmp_path):
    """The SFT collator's stage-2 inputs give the training forward the logits the engine computes
    after physical eviction, on the same sequences; and a stage-2 step trains the model."""
    from helpers import records
    from memento.train.sft import SFTSettings, make_collator, prepare_examples, train_stage

    model = models[arch]
    settings = SFTSettings(mask=MaskConfig.chat(keep_last_n=0), max_steps=2, batch_size=2, eval_steps=2)
    collator = make_collator(model, tokenizer, stage=2, settings=settings)
    data = prepare_examples(records(4, blocks=4), tokenizer, check_with=collator)
    features = [data[i] for i in range(len(data))]
    inputs = collator(features)
    if arch == "olmo3":
        assert set(inputs["attention_mask"]) == {"sliding_attention", "full_attention"}
    with torch.no_grad():
        train_logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits.float()
    cases = []
    for feature in features:
        n_prompt = feature["completion_mask"].index(1)
        # the engine would stop at the closing eos: force everything before it
        cases.append((feature["input_ids"][:n_prompt], feature["input_ids"][n_prompt:-1]))
    assert min(len(p) + len(c) for p, c in cases) > 4 * FAMILY_WINDOW
    got, engine = engine_logits(model, tokenizer, cases, EngineConfig(keep_logits=True, mask=settings.mask))
    assert engine.stats.evictions > 0
    for b, ((prompt, continuation), engine_out) in enumerate(zip(cases, got, strict=True)):
        rows = slice(len(prompt) - 1, len(prompt) + len(continuation) - 1)
        assert (train_logits[b, rows] - engine_out).abs().max().item() <= TOLERANCE
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = train_stage(
        family_model(tokenizer, arch), tokenizer, data, data, stage=2, stage_dir=tmp_path, settings=settings
    )
    assert (trained / "model.safetensors").exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the shared fixture untouched


def test_eval_modes_follow_the_family_default():
    """Phi-4 masks the delimiters in its evicting modes (as it was trained); the others keep the names."""
    from memento.eval.run import Mode
    from memento.families import FAMILIES

    phi = FAMILIES["phi4"].mask
    assert Mode.parse("memento", phi).name == "memento+delimiters"
    assert Mode.parse("keep-1", phi).mask.mask_delimiters
    assert [Mode.parse(m, phi).name for m in ("vanilla", "restart")] == ["vanilla", "restart"]
    assert Mode.parse("memento", FAMILIES["olmo3"].mask).name == "memento"
    assert Mode.parse("memento").name == "memento"
