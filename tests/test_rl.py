"""RL (memento.train.rl): the trainer scores exactly what the sampler saw, the paper's CISPO loss,
cap-forced tokens, G completions per prompt, and a short TRL run that starts at KL 0 and resumes."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from helpers import memento_case, tiny_model
from memento.chat import chat_prompt, tracked_prefix
from memento.engine import EngineConfig, LLMEngine, SamplingParams
from memento.format import SpecialTokenIds
from memento.masking import CHAT_MEMENTO
from memento.synth import generate
from memento.tiny_tokenizer import build_tiny_tokenizer
from memento.train.cispo import cispo_loss, k3_kl
from memento.train.rl import RLSettings, read_rl_log, train_rl
from memento.train.rollouts import CorrectnessReward, EngineRollouts, RolloutSettings, group_prompts
from memento.train.scoring import completion_logprobs

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer)


@pytest.fixture(scope="module")
def specials(tokenizer):
    return SpecialTokenIds.from_tokenizer(tokenizer)


@pytest.fixture(scope="module")
def rollouts(model, tokenizer, specials):
    """Memento rollouts with evictions: teacher-forced memento traces (blocks close and are evicted
    inside the completion) and free samples at temperature 1 after closed units (the completion
    attends to a context whose blocks are gone), with the block cap forcing some ``<|block_end|>``."""
    rng = random.Random(0)
    engine = LLMEngine(model, tokenizer, EngineConfig(kv_budget_tokens=4096, max_block_tokens=3))
    requests = []
    for i in range(8):
        prompt, continuation = memento_case(tokenizer, rng, units=(2, 3))
        if i % 2 == 0:
            params = SamplingParams(temperature=0, max_tokens=len(continuation), logprobs=0)
            requests.append(engine.add_request(prompt, params, forced_tokens=continuation))
        else:
            cut = max(j for j, t in enumerate(continuation) if t == specials.summary_end) + 1
            params = SamplingParams(n=3, temperature=1.0, max_tokens=20, logprobs=0, seed=i)
            requests.append(engine.add_request(prompt + continuation[:cut], params))
    done = {r.request_id: r for r in engine.run_to_completion()}
    rows = [(done[r].prompt_token_ids, out) for r in requests for out in done[r].outputs]
    return rows, engine.stats


def test_trainer_logprobs_equal_the_engines_sampling_logprobs(model, tokenizer, specials, rollouts):
    rows, stats = rollouts
    assert stats.evictions > 0 and stats.evicted_tokens > 0
    assert any(out.cap_forced for _, out in rows), "the block cap forced no token: the case is too easy"
    prompts = [p for p, _ in rows]
    completions = [out.token_ids for _, out in rows]
    logps, entropy = completion_logprobs(
        model,
        prompts,
        completions,
        specials=specials,
        mask=CHAT_MEMENTO,
        assistant_prefix=tracked_prefix(CHAT_MEMENTO, None, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        compute_entropy=True,
    )
    assert logps.dtype == torch.float32 and logps.shape == (len(rows), max(map(len, completions)))
    worst = max(
        (logps[b, : len(out.token_ids)] - torch.tensor(out.logprobs)).abs().max().item()
        for b, (_, out) in enumerate(rows)
    )
    assert worst <= TOLERANCE
    assert entropy is not None and bool((entropy[0, : len(completions[0])] > 0).all())


def test_a_causal_mask_fails_the_same_check(model, rollouts):
    """The guard: scoring the same rollouts with a plain causal mask (TRL's stock path) is wrong."""
    rows, _ = rollouts
    worst = 0.0
    for prompt, out in rows:
        ids = torch.tensor([list(prompt) + list(out.token_ids)])
        with torch.no_grad():
            logits = model(ids).logits[0].float()
        logp = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
        causal = logp.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
        worst = max(worst, (causal - torch.tensor(out.logprobs)).abs().max().item())
    assert worst > 100 * TOLERANCE


def test_a_cap_forced_token_is_a_block_end_with_its_own_logprob_and_no_gradient(model, tokenizer, specials):
    prompt = chat_prompt(tokenizer, "q") + "<think>\n<|block_start|>abc"  # the open block is at the cap already
    settings = RolloutSettings(max_tokens=6, max_block_tokens=3, chat=False)
    out = EngineRollouts(tokenizer, settings).generate(model, [prompt, prompt])
    for tokens, keep, logprobs, forced in zip(
        out["completion_ids"], out["env_mask"], out["logprobs"], out["cap_forced"], strict=True
    ):
        assert tokens[0] == specials.block_end and keep[0] == 0 and forced >= 1
        assert sum(keep) == len(keep) - forced
        with torch.no_grad():
            ids = torch.tensor([out["prompt_ids"][0]])
            expected = torch.log_softmax(model(ids).logits[0, -1].float(), -1)[specials.block_end].item()
        assert logprobs[0] == pytest.approx(expected, abs=TOLERANCE)


def test_each_prompt_gets_its_group_of_completions(model, tokenizer):
    prompts = ["add 1 2"] * 4 + ["add 3 4"] * 4
    assert group_prompts(prompts) == [("add 1 2", 4), ("add 3 4", 4)]
    rollout = EngineRollouts(tokenizer, RolloutSettings(max_tokens=8))
    out = rollout.generate(model, prompts)
    assert len(out["completion_ids"]) == 8
    first, second = out["prompt_ids"][0], out["prompt_ids"][4]
    assert all(p == first for p in out["prompt_ids"][:4]) and all(p == second for p in out["prompt_ids"][4:])
    assert first != second
    assert len({tuple(c) for c in out["completion_ids"][:4]}) > 1, "a group's samples must differ"
    again = rollout.generate(model, prompts)  # a later call draws new samples
    assert again["completion_ids"] != out["completion_ids"]


def test_correctness_reward_grades_the_answer_after_think():
    reward = CorrectnessReward("exact")
    try:
        texts = ["<think>\nx</think>42<|im_end|>", "<think>\nx</think>41", "no think at all 42"]
        assert reward([None] * 3, texts, answer=["42", "42", "42"], completion_text=texts) == [1.0, 0.0, 0.0]
    finally:
        reward.close()


def test_cispo_loss_matches_a_hand_computation():
    """Two completions, one padded token; ratios 1.5 and 0.7 are clipped (high, low), 1.1 is not."""
    eps, beta = 0.2, 0.1
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.5, 0.0]])
    ratios = [[1.5, 0.7, 1.0], [1.1, 0.5, 1.0]]
    logps = (old + torch.log(torch.tensor(ratios))).requires_grad_(True)
    ref = torch.tensor([[-1.2, -1.8, -0.5], [-0.2, -1.0, 0.0]])
    advantages = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, stats = cispo_loss(logps, old, advantages, mask, eps_low=eps, eps_high=eps, ref_logps=ref, beta=beta)

    total, grads = 0.0, torch.zeros(2, 3)
    for b in range(2):
        for t in range(3):
            if not mask[b, t]:
                continue
            lp, r = float(logps.detach()[b, t]), ratios[b][t]
            w = min(max(r, 1 - eps), 1 + eps)
            kl = math.exp(float(ref[b, t]) - lp) - (float(ref[b, t]) - lp) - 1
            total += -w * float(advantages[b]) * lp + beta * kl
            grads[b, t] = (-w * float(advantages[b]) + beta * (1 - math.exp(float(ref[b, t]) - lp))) / 5
    assert loss.item() == pytest.approx(total / 5, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(logps.grad, grads, rtol=1e-5, atol=1e-7)
    assert (logps.grad[mask.bool()] != 0).all(), "every token keeps its gradient (unlike PPO clipping)"
    assert (stats.tokens, stats.clipped_low, stats.clipped_high) == (5, 2, 1)
    assert stats.kl == pytest.approx(float((k3_kl(logps.detach(), ref) * mask).sum()) / 5, rel=1e-6)


def test_rl_settings_refuse_what_cannot_run():
    with pytest.raises(ValueError, match="clip"):
        RLSettings(clip="ppo")
    with pytest.raises(ValueError, match="num_generations"):
        RLSettings(num_generations=1)
    with pytest.raises(ValueError, match="do not split"):
        RLSettings(prompts_per_step=3, num_generations=3, batch_size=2).grad_accum(1)
    assert RLSettings(prompts_per_step=4, num_generations=4, batch_size=4).grad_accum(2) == 2


def _length_reward(prompts, completions, completion_ids=None, **_):
    """A reward that varies within every group (so advantages are not all 0 and the policy moves)."""
    return [float(len(text)) / 50 for text in completions]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("rl") / "sft"
    tiny_model(tokenizer, seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _problems(n: int = 8) -> list[dict[str, str]]:
    return [{"prompt": p.prompt, "answer": p.answer} for p in generate("running_sum", "train", n, seed=0)]


def test_a_short_run_starts_at_kl_zero_and_resumes_from_its_last_checkpoint(checkpoint, tmp_path):
    settings = RLSettings(
        steps=2,
        num_generations=4,
        prompts_per_step=2,
        batch_size=4,
        max_tokens=24,
        max_block_tokens=6,
        learning_rate=1e-2,
        warmup_steps=0,
        save_steps=1,
    )
    out = tmp_path / "run"
    final = train_rl(checkpoint, _problems(), out, settings, show_progress=False, reward_funcs=[_length_reward])
    log = [e for e in read_rl_log(out) if "loss" in e]
    assert [e["step"] for e in log] == [1, 2]
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # the policy is its reference at step 0
    assert log[0]["grad_norm"] > 0 and log[1]["kl"] > 1e-6  # ... and moves away from it
    assert log[0]["sampler_logp_gap_max"] <= TOLERANCE
    for key in ("rollout/peak_kv", "rollout/auc_kv", "rollout/blocks", "clip_ratio/low", "clip_ratio/high"):
        assert key in log[0]
    assert (final / "config.json").exists() and (final / "tokenizer_config.json").exists()
    assert (out / "curves.png").stat().st_size > 0
    summary = json.loads((final / "memento_rl.json").read_text())
    assert summary["global_step"] == 2 and summary["resumed_from"] is None

    settings.steps = 3
    train_rl(checkpoint, _problems(), out, settings, show_progress=False, reward_funcs=[_length_reward])
    log = [e for e in read_rl_log(out) if "loss" in e]
    assert [e["step"] for e in log] == [1, 2, 3]  # one new step, after checkpoint-2
    summary = json.loads((final / "memento_rl.json").read_text())
    assert summary["global_step"] == 3 and summary["resumed_from"].endswith("checkpoint-2")


def test_trls_own_cispo_runs_too(checkpoint, tmp_path):
    settings = RLSettings(
        steps=1, num_generations=2, prompts_per_step=2, batch_size=4, max_tokens=12, clip="trl", epsilon_high=5.0
    )
    train_rl(checkpoint, _problems(4), tmp_path / "trl", settings, show_progress=False, reward_funcs=[_length_reward])
    (entry,) = [e for e in read_rl_log(tmp_path / "trl") if "loss" in e]
    assert "cispo_clip_ratio" in entry and "clip_ratio/low" not in entry


def test_memento_rl_command_runs_and_refuses_bad_options(checkpoint, tmp_path):
    from typer.testing import CliRunner

    from memento.cli import app

    out = tmp_path / "cli"
    common = ["rl", str(checkpoint), "--task", "synth:running_sum", "-n", "4", "-o", str(out), "--no-progress"]
    small = ["--steps", "1", "-G", "2", "--prompts-per-step", "2", "--batch-size", "4", "--max-tokens", "12"]
    result = CliRunner().invoke(app, [*common, *small])
    assert result.exit_code == 0, result.output
    assert (out / "final" / "config.json").exists() and "RL done" in result.output

    result = CliRunner().invoke(app, [*common, *small, "--clip", "ppo"])
    assert result.exit_code == 1 and "clip must be one of" in result.output
    result = CliRunner().invoke(app, [*common, "--prompts-per-step", "3", "-G", "3", "--batch-size", "2"])
    assert result.exit_code == 1 and "do not split" in result.output


@pytest.mark.slow
def test_two_cpu_processes_under_accelerate_launch(checkpoint, tmp_path):
    """``accelerate launch`` with 2 CPU processes (torchrun, gloo): each process samples its share of
    the groups, rewards are normalised over the gathered batch, one run directory results."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert launcher is not None
    out = tmp_path / "ddp"
    command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "tests/rl_launch.py", str(checkpoint), str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    root = Path(__file__).parent.parent
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((out / f"rank{rank}.json").read_text()) == {"processes": 2}
    log = [e for e in read_rl_log(out) if "loss" in e]
    assert [e["step"] for e in log] == [1, 2]
    assert all(e["sampler_logp_gap_max"] <= TOLERANCE for e in log)
    assert (out / "final" / "config.json").exists()


def _sevens(prompts, completions, **_):
    """The share of '7' characters in a completion: rare in a random model's output (~1%)."""
    return [text.count("7") / max(1, len(text)) for text in completions]


def test_the_policy_climbs_its_reward(checkpoint, tmp_path):
    """The whole loop (rollouts, advantages, scoring under the mask, CISPO, the optimizer) moves the
    policy towards what the reward pays for: a sign or alignment error anywhere would not."""
    settings = RLSettings(
        steps=30, num_generations=8, prompts_per_step=2, batch_size=8, max_tokens=16, learning_rate=1e-2
    )
    settings.warmup_steps, settings.save_steps = 0, 100
    train_rl(checkpoint, _problems(16), tmp_path / "climb", settings, show_progress=False, reward_funcs=[_sevens])
    rewards = [e["reward"] for e in read_rl_log(tmp_path / "climb") if "loss" in e]
    assert len(rewards) == 30
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.05 and last > 0.5, rewards


def test_a_rollout_stopped_at_a_format_error_keeps_every_token_in_the_loss(model, tokenizer):
    """The policy sampled each token of it, the defect included; its reward (no answer) is what
    teaches the format, so only cap-forced tokens are left out."""
    out = EngineRollouts(tokenizer, RolloutSettings(max_tokens=24, max_block_tokens=4)).generate(model, ["q"] * 16)
    broken = [i for i, reason in enumerate(out["finish_reason"]) if reason == "format_error"]
    assert broken, "no rollout broke the format: the case is too easy"
    for i in broken:
        keep, tokens = out["env_mask"][i], out["completion_ids"][i]
        assert len(keep) == len(tokens) and sum(keep) == len(tokens) - out["cap_forced"][i]
