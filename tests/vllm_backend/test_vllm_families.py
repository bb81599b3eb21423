"""The vLLM backend on the paper's families with sliding windows: Phi3 (window on every layer) and Olmo 3
(three sliding layers to one full; vLLM runs it through its Transformers backend).

vLLM's attention applies each layer's window to the compacted cache: the last W keys still there,
which is masking.window_mask, the training rule. The memento worker gives sliding layers full-length
pages (vLLM's sliding-window manager would free pages whose keys an eviction brings back into the
window). The teacher-forced logprobs must equal the dense-mask forward with the windowed masks, with
blocks several times longer than the window (8) and the page (32), batched and under preemption.

Starting an Olmo 3 engine patches transformers' ``Olmo3Model`` in place (vLLM's Transformers backend
compiles it), after which a plain HF forward of Olmo 3 fails in this process: every reference is
computed by the module fixture before the first engine starts.
"""

from __future__ import annotations

import copy
import random

import pytest
import vllm
from test_vllm_consistency import TOLERANCE, dense, reference_logprobs
from vllm_support import FORCE, ForcedTokens, free_blocks, scheduler_of

from helpers import family_checkpoint, memento_case
from memento.masking import MaskConfig
from memento.modeling import build_tiny_model, layer_windows
from memento.vllm.config import MementoSettings

WINDOW = 8
ARCHS = ("phi3", "olmo3")
MODES = {
    "vanilla": dict(keep_last_n=-1),
    "keep0": dict(keep_last_n=0),
    "keep1": dict(keep_last_n=1),
    "keep0-delims": dict(keep_last_n=0, mask_delimiters=True),
    "keep0-lastblock": dict(keep_last_n=0, keep_last_block_for_answer=True),
    "restart": dict(keep_last_n=0, restart=True),
}
RUNS = {"batch6": {}, "preempt": dict(num_gpu_blocks_override=10, max_model_len=288)}  # 9 pages: 288 slots


def cases_for(tok, rng: random.Random, batch: int):
    """(prompt, forced continuation): blocks of 30-60 tokens (most > W + a page), cut at a random point."""
    out = []
    for _ in range(batch):
        prompt, response = memento_case(tok, rng, block_len=(30, 60), units=(2, 3))
        cut = rng.randint(0, len(response) - 1)
        out.append((prompt + response[:cut], response[cut:]))
    return out


@pytest.fixture(scope="module")
def families(tok, tmp_path_factory):
    """Per arch: (checkpoint dir, vocab, {(mode, run): (cases, reference logprobs)}), references first;
    per ("serve", family): a memento checkpoint for the serve test."""
    out = {}
    for arch in ARCHS:
        model = build_tiny_model(
            tok,
            arch=arch,
            hidden_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_hidden_layers=4,
            intermediate_size=128,
            seed=3,
            tie_word_embeddings=False,
            sliding_window=WINDOW,
        ).eval()
        assert WINDOW in layer_windows(model).values()
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        model.save_pretrained(path)
        tok.save_pretrained(path)
        refs = {}
        for mode, knobs in MODES.items():
            settings = MementoSettings(mask=MaskConfig.chat(**knobs))
            for run in RUNS:
                cases = cases_for(tok, random.Random(f"{arch}-{mode}-{run}"), 6)
                refs[mode, run] = (cases, reference_logprobs(model, tok, cases, settings))
        # Guard on the test: on these cases the window binds (an unwindowed reference differs).
        unwindowed = copy.deepcopy(model)
        unwindowed.config.sliding_window = 10**6
        cases, want = refs["keep0", "batch6"]
        other = reference_logprobs(unwindowed, tok, cases, MementoSettings(mask=MaskConfig.chat(keep_last_n=0)))
        assert max((w - o).abs().max().item() for w, o in zip(want, other, strict=True)) > 100 * TOLERANCE
        out[arch] = (path, model.config.vocab_size, refs)
    for family in ("phi4", "olmo3"):  # built here too: no Olmo 3 can be built once an engine ran
        out["serve", family] = family_checkpoint(
            family, tmp_path_factory.mktemp(f"serve-{family}"), memento_tokens=True
        )
    return out


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", ARCHS)
def test_sliding_window_families_match_the_dense_mask_forward(families, make_llm_at, tok, arch, mode):
    path, vocab, refs = families[arch]
    settings = MementoSettings(mask=MaskConfig.chat(**MODES[mode]))
    for run, pool in RUNS.items():
        cases, want = refs[mode, run]
        llm = make_llm_at(path, settings, logits_processors=[ForcedTokens], **pool)
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
        for (prompt, forced), out, ref in zip(cases, outs, want, strict=True):
            completion = out.outputs[0]
            assert list(completion.token_ids) == forced
            n = len(prompt)
            assert (dense(out.prompt_logprobs[1:], vocab) - ref[: n - 1]).abs().max().item() <= TOLERANCE, run
            got = dense(completion.logprobs, vocab)
            assert (got - ref[n - 1 : n - 1 + len(forced)]).abs().max().item() <= TOLERANCE, run
        stats = scheduler_of(llm).memento_stats
        free, total = free_blocks(llm)
        assert free == total, f"{run}: {total - free} KV pages leaked"
        assert (stats.evictions > 0) == settings.mask.evicts
        if pool:
            assert stats.recomputes > 0, "the small pool did not force a preemption"


@pytest.mark.parametrize("family", ["phi4", "olmo3"])
def test_memento_serve_vllm_runs_each_family_with_its_mask(families, family, tmp_path):
    """`memento serve DIR --backend vllm` on a family's tiny memento checkpoint (byte-level BPE tokenizer,
    its chat template), with no mask flag: the family's mask reaches vLLM and chat answers."""
    import os
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx

    checkpoint = families["serve", family]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    memento = Path(sys.executable).parent / "memento"
    cmd = [str(memento), "serve", str(checkpoint), "--backend", "vllm", "--port", str(port)]
    cmd += ["--dtype", "float32", "--block-size", "32", "--served-model-name", "tiny", "--kv-budget-tokens", "2048"]
    cmd += ["--vllm-arg=--max-model-len=512", "--vllm-arg=--enforce-eager", "--vllm-arg=--gpu-memory-utilization=0.999"]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"vllm serve did not come up:\n{log.read_text()[-4000:]}")
        reply = httpx.post(
            f"{base}/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "1 + 2"}], "max_tokens": 16},
            timeout=120,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert reply.status_code == 200, reply.text
    text = log.read_text()
    command = "".join(text[text.index("exec: ") :].split())  # the console wraps the exec line
    assert command.startswith("exec:") and "--additional-config" in command
    assert ('"mask_delimiters":true' in command) is (family == "phi4")
