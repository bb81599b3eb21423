"""The engine's per-step bookkeeping, measured where it dominates: forced memento traces on a tiny model.

A random 2-layer, hidden-64 Qwen3 is so cheap to run that the engine's own work (tracking, row
layout, slot tables, sampling, eviction) is most of each step. Every request is forced along a real
synthetic memento trace (``forced_tokens``), so both modes run the same tokens whatever the weights;
the model is untrained on purpose. Prints tokens/s for memento (keep_last_n 0) and vanilla, best of
``--repeats``, and their ratio. To compare two versions of the engine, run the script in both
checkouts alternately on a quiet machine and compare medians (BENCHMARKS.md, issue 15).

    .venv/bin/python benchmarks/engine_bookkeeping.py [--requests 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from memento.chat import chat_prompt
from memento.engine import EngineConfig, LLMEngine, SamplingParams
from memento.format import render_response
from memento.masking import MaskConfig
from memento.modeling import build_tiny_model
from memento.synth import generate
from memento.tiny_tokenizer import build_tiny_tokenizer


def run(model, tok, requests, keep_last_n: int, repeats: int) -> dict:
    best = float("inf")
    for _ in range(repeats):
        config = EngineConfig(mask=MaskConfig.chat(keep_last_n=keep_last_n), kv_budget_tokens=8192, max_num_seqs=64)
        engine = LLMEngine(model, tok, config)
        for prompt, forced in requests:
            engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=len(forced)), forced_tokens=forced)
        start = time.perf_counter()
        outputs = engine.run_to_completion()
        best = min(best, time.perf_counter() - start)
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "seconds": round(best, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / best),
        "steps": engine.stats.steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, hidden_size=64, num_hidden_layers=2, seed=0)
    requests = []
    for problem in generate("stream_sum", "test", args.requests, seed=3):
        prompt = tok(chat_prompt(tok, problem.prompt), add_special_tokens=False)["input_ids"]
        requests.append((prompt, tok(render_response(problem.trace), add_special_tokens=False)["input_ids"]))
    memento = run(model, tok, requests, 0, args.repeats)
    vanilla = run(model, tok, requests, -1, args.repeats)
    ratio = memento["tokens_per_s"] / vanilla["tokens_per_s"]
    print(json.dumps({"memento": memento, "vanilla": vanilla, "memento_over_vanilla": round(ratio, 2)}, indent=1))


if __name__ == "__main__":
    main()
