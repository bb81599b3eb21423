"""pass@k / maj@k against hand-computed values; KV replay against the engine; task sets; modes."""

from __future__ import annotations

import json
import math

import pytest

from helpers import records, tiny_model
from memento.chat import assistant_prefix_ids, chat_prompt
from memento.engine import EngineConfig, LLMEngine, SamplingParams
from memento.eval.kvsim import PRESETS, KVSpec, replay_live_kv, resolve_spec, scale_curves
from memento.eval.metrics import (
    accuracy_summary,
    kv_summary,
    maj_at_k,
    majority_correct,
    paired_difference_interval,
    pass_at_1_interval,
    pass_at_k,
    problem_accuracies,
    wilson_interval,
)
from memento.eval.run import Mode, completion_structure
from memento.eval.tasks import load_task_set
from memento.format import SpecialTokenIds
from memento.masking import MaskConfig
from memento.tiny_tokenizer import build_tiny_tokenizer

# -- pass@k ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 0.4),  # = c / n
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (4, 0, 3, 0.0),
        (4, 4, 1, 1.0),
        (4, 2, 3, 1.0),  # fewer wrong samples than k: a correct one is always drawn
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected)


@pytest.mark.parametrize(("n", "c", "k"), [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)])
def test_pass_at_k_rejects_impossible_counts(n, c, k) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# -- maj@k -------------------------------------------------------------------------------------


def test_majority_vote_hand_values() -> None:
    assert majority_correct(["7", "7", "3"], [True, True, False]) == 1.0
    assert majority_correct(["7", "3", "3"], [True, False, False]) == 0.0
    assert majority_correct(["7", "3"], [True, False]) == 0.5  # a tie, broken uniformly
    assert majority_correct(["7", "3", "5"], [False, True, False]) == pytest.approx(1 / 3)
    assert majority_correct([None, None, "3"], [False, False, True]) == 1.0  # no answer: no vote
    assert majority_correct([None, None], [False, False]) == 0.0


def test_maj_at_k_is_the_mean_over_subsets() -> None:
    keys, correct = ["a", "b", "b"], [True, False, False]
    assert maj_at_k(keys, correct, 1) == pytest.approx(1 / 3)  # a single vote: one of three is right
    # {a,b} twice (a tie: 1/2 each), {b,b} once (wrong): (1/2 + 1/2 + 0) / 3
    assert maj_at_k(keys, correct, 2) == pytest.approx(1 / 3)
    assert maj_at_k(keys, correct, 3) == 0.0
    assert maj_at_k(["a", "a", "b", "c"], [True, True, False, False], 3) == pytest.approx(
        # subsets of 3 from 4: {a,a,b} 1, {a,a,c} 1, {a,b,c} 1/3, {a,b,c} 1/3
        (1 + 1 + 1 / 3 + 1 / 3) / 4
    )


def test_maj_at_k_samples_deterministically_when_there_are_many_subsets() -> None:
    keys = ["a"] * 12 + ["b"] * 12
    correct = [True] * 12 + [False] * 12
    first = maj_at_k(keys, correct, 12, seed=3)
    assert first == maj_at_k(keys, correct, 12, seed=3)
    assert 0.4 < first < 0.6  # symmetric: a and b win equally often


def test_accuracy_summary_over_problems() -> None:
    samples = [
        [("1", True), ("2", False), ("1", True), ("3", False)],
        [("5", False), ("5", False), ("6", True), ("7", False)],
    ]
    summary = accuracy_summary(samples, ks=(2, 4, 9))
    assert summary["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert summary["pass@2"] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6)) / 2)
    assert summary["pass@4"] == 1.0
    assert summary["maj@4"] == pytest.approx((1.0 + 0.0) / 2)
    assert "pass@9" not in summary  # more than the 4 samples there are
    with pytest.raises(ValueError, match="same"):
        accuracy_summary([[("1", True)], [("1", True), ("2", False)]], ks=(1,))


def test_kv_summary() -> None:
    assert kv_summary([3, 5, 4]) == {"peak_kv": 5, "auc_kv": 12, "steps": 3}
    assert kv_summary([]) == {"peak_kv": 0, "auc_kv": 0, "steps": 0}


# -- KV at real sizes --------------------------------------------------------------------------


def test_bytes_per_token_of_the_papers_models() -> None:
    assert PRESETS["qwen3-8b"].bytes_per_token == 144 * 1024
    assert PRESETS["qwen3-32b"].bytes_per_token == 256 * 1024
    assert PRESETS["phi-4-reasoning"].bytes_per_token == 200 * 1024
    spec = KVSpec.from_config(
        {"num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096}
    )
    assert spec.bytes_per_token == 144 * 1024  # head_dim from hidden / heads, bf16 by default
    assert KVSpec.from_config({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}, dtype="float32")
    with pytest.raises(ValueError, match="unknown KV model"):
        resolve_spec("gpt-9")
    with pytest.raises(ValueError, match="num_attention_heads"):
        KVSpec.from_config({"hidden_size": 8})


def test_scale_curves_multiplies_tokens_by_bytes() -> None:
    spec = KVSpec("toy", num_layers=1, num_kv_heads=1, head_dim=500, dtype_bytes=1)  # 1,000 bytes per token
    scaled = scale_curves([[1000, 2000], [3000]], spec)
    assert scaled["mean_peak_gb"] == pytest.approx((2e6 + 3e6) / 2 / 1e9)
    assert scaled["mean_auc_gb_ktok"] == pytest.approx((3e6 + 3e6) / 2 / 1e9 / 1000)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.mark.parametrize(
    "config",
    [MaskConfig(keep_last_n=-1), MaskConfig(keep_last_n=0), MaskConfig(keep_last_n=1), MaskConfig(restart=True)],
    ids=["vanilla", "memento", "keep1", "restart"],
)
def test_replayed_live_kv_equals_what_the_engine_measured(tok, config) -> None:
    """The replay (masking.py on token ids) and the engine (slots it held) count the same keys."""
    model = tiny_model(tok)
    specials = SpecialTokenIds.from_tokenizer(tok)
    engine = LLMEngine(
        model,
        tok,
        EngineConfig(
            mask=MaskConfig.chat(keep_last_n=config.keep_last_n, restart=config.restart), kv_budget_tokens=4096
        ),
    )
    examples = records(3, blocks=3)
    cases = []
    for record in examples:
        prompt = tok(chat_prompt(tok, record["problem"]), add_special_tokens=False)["input_ids"]
        completion = tok(record["response"], add_special_tokens=False)["input_ids"]
        rid = engine.add_request(prompt, SamplingParams(max_tokens=len(completion)), forced_tokens=completion)
        cases.append((rid, prompt, completion))
    done = {r.request_id: r.outputs[0] for r in engine.run_to_completion()}
    for rid, prompt, completion in cases:
        measured = done[rid].kv.live_kv
        replayed = replay_live_kv(prompt + completion, len(prompt), specials, config, assistant_prefix_ids(tok))
        assert len(measured) == len(completion)
        assert replayed == measured
        if config.keep_last_n != -1:
            assert max(replayed) < len(prompt) + len(completion) - 1  # something was evicted


# -- task sets, modes, structure ---------------------------------------------------------------


def test_synthetic_task_set_is_the_held_out_split() -> None:
    task_set = load_task_set("synth:stream_sum", 5)
    assert task_set.grader == "exact" and len(task_set.problems) == 5
    assert task_set.problems[0].prompt.startswith("STREAM")
    with pytest.raises(ValueError, match="unknown synthetic task"):
        load_task_set("synth:nope", 3)


def test_file_task_set_picks_fields_and_names_the_missing_one(tmp_path) -> None:
    path = tmp_path / "set.jsonl"
    path.write_text(
        "\n".join(json.dumps({"question": f"What is {i}+1?", "answer": str(i + 1), "id": f"q{i}"}) for i in range(4))
    )
    task_set = load_task_set(str(path), 3)
    assert [p.uid for p in task_set.problems] == ["q0", "q1", "q2"]
    assert task_set.problems[1].prompt == "What is 1+1?" and task_set.problems[1].answer == "2"
    assert task_set.grader == "math"
    assert load_task_set(str(path), grader="exact").grader == "exact"
    with pytest.raises(ValueError, match=r"no answer field \(solution\).*answer, id, question"):
        load_task_set(str(path), answer_field="solution")
    with pytest.raises(ValueError, match="neither"):
        load_task_set(str(tmp_path / "missing.jsonl"))


def test_modes_parse() -> None:
    chat = MaskConfig.chat
    assert Mode.parse("memento") == Mode("memento", chat(keep_last_n=0))
    assert Mode.parse("Vanilla") == Mode("vanilla", chat(keep_last_n=-1))
    assert Mode.parse("restart") == Mode("restart", chat(keep_last_n=0, restart=True))
    assert Mode.parse("keep-2") == Mode("keep-2", chat(keep_last_n=2))
    assert Mode.parse("keep-1+delimiters") == Mode("keep-1+delimiters", chat(keep_last_n=1, mask_delimiters=True))
    for bad in ("keep-0", "keep-x", "evict", "memento+everything"):
        with pytest.raises(ValueError, match="unknown mode"):
            Mode.parse(bad)


def test_completion_structure_counts_block_and_memento_tokens(tok) -> None:
    specials = SpecialTokenIds.from_tokenizer(tok)
    text = "<think>\n<|block_start|>abc<|block_end|><|summary_start|>xy<|summary_end|>\n<|block_start|>de"
    structure = completion_structure(tok(text, add_special_tokens=False)["input_ids"], specials)
    assert structure.block_tokens == [3]  # the open block at the end is not counted
    assert structure.memento_tokens == [2]


def test_wilson_interval_known_values() -> None:
    # p = 0.5 over 100: the textbook [0.4038, 0.5962]; 200 of 200 right: [200 / (200 + z^2), 1]
    assert wilson_interval(0.5, 100) == pytest.approx((0.40383, 0.59617), abs=1e-5)
    z2 = 1.959963984540054**2
    assert wilson_interval(1.0, 200) == pytest.approx((200 / (200 + z2), 1.0))
    low, high = wilson_interval(0.0, 50)
    assert low == 0.0 and 0.07 < high < 0.072
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)
    with pytest.raises(ValueError):
        wilson_interval(1.5, 10)


def test_pass_at_1_interval_counts_problems_not_samples() -> None:
    one_each = pass_at_1_interval([[True], [False]] * 50)
    four_each = pass_at_1_interval([[True, True, False, False]] * 100)
    assert one_each == pytest.approx(wilson_interval(0.5, 100))
    assert four_each == pytest.approx(wilson_interval(0.5, 100))  # 400 samples, still 100 problems
    assert problem_accuracies([[True, False, True, True], [False]]) == [0.75, 0.0]


def test_paired_difference_interval() -> None:
    assert paired_difference_interval([1.0, 1.0], [1.0, 1.0]) == (0.0, 0.0, 0.0)
    mean, low, high = paired_difference_interval([1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0])
    sd = math.sqrt(2 / 3)  # differences 0, -1, 0, 1
    assert mean == 0.0 and high == pytest.approx(1.959963984540054 * sd / 2) and low == pytest.approx(-high)
    with pytest.raises(ValueError):
        paired_difference_interval([1.0], [1.0, 0.0])


def test_paired_difference_interval_stays_within_plus_minus_100_pp() -> None:
    """A run that fails nearly everything against one that passes everything (the restart ablation)."""
    a = [0.0] * 97 + [1.0] * 3
    mean, low, high = paired_difference_interval(a, [1.0] * 100)
    assert mean == pytest.approx(-0.97) and low == -1.0 and -0.97 < high < -0.9
