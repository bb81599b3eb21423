"""lm-evaluation-harness, unmodified, against `memento serve` (issue 23): the README's recipe.

lm-eval's ``local-completions`` model with ``--batch_size 4`` sends four prompts per request (token
ids), and its log-likelihood requests use ``echo`` with ``logprobs``. The task files are the ones
shipped in examples/lm_eval (only their data path and generation length changed). The model is a
random tiny one, so the expected scores are made, not hoped for: an independent reference (the
dense-mask forward of :mod:`memento.reference`) decides each document's output, and the gold
answers are set so that exactly half of them are right. Any reordering of choices, any wrong prompt
score, any lost batch member moves a score off 0.5.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_model
from memento.chat import assistant_prefix_ids
from memento.engine import EngineConfig
from memento.format import SpecialTokenIds
from memento.reference import reference_generate, teacher_forced_logits
from memento.serve.server import build_app, start_in_thread
from memento.synth import generate
from memento.tiny_tokenizer import build_tiny_tokenizer

pytestmark = pytest.mark.slow
pytest.importorskip("lm_eval", reason="lm-eval is in the main environment's harness extra")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "lm_eval"
CONFIG = {"kv_budget_tokens": 8192, "max_num_seqs": 16, "keep_last_n": 0}
GEN_TOKENS = 24
LAST_WORD = re.compile(r"([^\s>]+)\s*$")  # the shipped generation task's filter


def load_make_data():
    spec = importlib.util.spec_from_file_location("make_data", EXAMPLES / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def task_dir(tmp: Path, data: Path) -> Path:
    """The shipped task files with this test's data path and a short generation."""
    out = tmp / "tasks"
    out.mkdir()
    for name in ("memento_gen.yaml", "memento_mc.yaml", "utils.py"):
        text = (EXAMPLES / name).read_text().replace("examples/lm_eval/stream_sum.jsonl", str(data))
        text = text.replace("max_gen_toks: 1200", f"max_gen_toks: {GEN_TOKENS}")
        (out / name).write_text(text)
    return out


def reference_answers(model, tok, prompts: list[str], stops: list[str]) -> list[str]:
    """What the generation task's filter reads from each greedy completion, by the reference generator."""
    mask = EngineConfig.from_options(**CONFIG).mask
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    outs = reference_generate(
        model,
        ids,
        SpecialTokenIds.from_tokenizer(tok),
        mask,
        max_new_tokens=GEN_TOKENS,
        eos_token_ids=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
        assistant_prefix=assistant_prefix_ids(tok),
    )
    answers = []
    for out in outs:
        token_ids = out.token_ids[:-1] if out.finish_reason == "eos" else out.token_ids
        text = tok.decode(token_ids)
        for stop in stops:
            text = text.split(stop)[0]
        found = LAST_WORD.findall(text)
        answers.append(found[0].strip() if found else "[invalid]")
    return answers


def reference_choice_logprobs(model, tok, context: str, choices: list[str]) -> list[float]:
    """Each choice's summed logprob after ``context`` under the memento mask, split into tokens as lm-eval
    splits them: the context's trailing whitespace goes to the continuation."""
    mask = EngineConfig.from_options(**CONFIG).mask
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, choices = context[:-spaces], [context[-spaces:] + choice for choice in choices]
    context_ids = tok(context, add_special_tokens=False)["input_ids"]
    wholes = [tok(context + choice, add_special_tokens=False)["input_ids"] for choice in choices]
    logits = teacher_forced_logits(
        model,
        wholes,
        SpecialTokenIds.from_tokenizer(tok),
        mask,
        assistant_prefix=assistant_prefix_ids(tok),
        pad_token_id=tok.pad_token_id,
    )
    scores = []
    for whole, row in zip(wholes, logits, strict=True):
        logprobs = torch.log_softmax(row, dim=-1)
        scores.append(sum(float(logprobs[t - 1, whole[t]]) for t in range(len(context_ids), len(whole))))
    return scores


def test_lm_eval_batched_generation_and_multiple_choice_score_as_the_reference(tmp_path) -> None:
    tok = build_tiny_tokenizer()
    model = tiny_model(tok, seed=3)
    model_dir = tmp_path / "model"
    tok.save_pretrained(model_dir)
    make_data = load_make_data()
    problems = generate("stream_sum", "validation", 8, seed=0, min_steps=6, max_steps=9)
    docs = [make_data.lm_eval_record(tok, p.record()) for p in problems]

    # Gold answers: the reference's own output for even documents, something else for odd ones.
    stops = ["<|im_end|>", tok.decode([tok.eos_token_id])]
    answers = reference_answers(model, tok, [d["prompt"] for d in docs], stops)
    expected_choice_scores = []
    for i, (doc, answer) in enumerate(zip(docs, answers, strict=True)):
        doc["answer"] = answer if i % 2 == 0 else answer + "X"
        scores = reference_choice_logprobs(model, tok, doc["context"], doc["choices"])
        best, worst = max(range(10), key=scores.__getitem__), min(range(10), key=scores.__getitem__)
        doc["gold"] = best if i % 2 == 0 else worst
        expected_choice_scores.append(scores)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = task_dir(tmp_path, data)

    app = build_app(model, EngineConfig.from_options(**CONFIG), tokenizer=tok, model_name="tiny")
    running = start_in_thread(app)
    try:
        model_args = (
            f"base_url={running.base_url}/v1/completions,model=tiny,tokenizer={model_dir},"
            "tokenizer_backend=huggingface,tokenized_requests=True,max_length=4096,max_retries=1"
        )
        command = [
            *(sys.executable, "-m", "lm_eval"),
            *("--model", "local-completions", "--model_args", model_args),
            *("--tasks", "memento_gen,memento_mc", "--include_path", str(tasks)),
            *("--batch_size", "4", "--output_path", str(tmp_path / "out"), "--log_samples"),
        ]
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, check=False)
        assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-6000:])
    finally:
        running.stop()

    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    assert results["memento_gen"]["exact_match,last-word"] == pytest.approx(0.5)
    assert results["memento_mc"]["acc,none"] == pytest.approx(0.5)

    (samples_file,) = (tmp_path / "out").rglob("samples_memento_mc_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == len(docs)
    for sample in samples:
        got = [float(resp[0][0]) for resp in sample["resps"]]
        want = expected_choice_scores[sample["doc_id"]]
        assert max(abs(g - w) for g, w in zip(got, want, strict=True)) <= 1e-4
