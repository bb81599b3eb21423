"""What the sliding-window rule costs and saves: the same weights with the window on and off.

Olmo 3's pattern (three sliding layers, then one full) and a Phi-3-style model (a window on every
layer), tiny and random, on the default synthetic task's memento traces (real lengths, teacher
forced). Timed round-robin in one run:

- SFT step (collation with one mask per layer type, forward, backward, AdamW), window W vs none;
- engine, teacher-forcing every trace in memento mode: wall time, and peak live KV per request
  (on the all-sliding model the engine frees the tokens that left the window for good).

"Window off" is the same checkpoint with ``sliding_window`` raised past every sequence, so every
layer sees every visible key (and nothing is windowed or freed).

    .venv/bin/python benchmarks/sliding_window.py                 # W 64, 16 traces, 3 repeats
    .venv/bin/python benchmarks/sliding_window.py --window 128 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

from memento.engine import EngineConfig, LLMEngine, SamplingParams
from memento.masking import MaskConfig
from memento.modeling import build_tiny_model
from memento.synth import DEFAULT_TASK, generate
from memento.tiny_tokenizer import build_tiny_tokenizer
from memento.train.collate import MementoCollator, tokenize_example
from memento.train.sft import SFTSettings, make_collator

OFF = 10**6


def sft_step_seconds(model, collator: MementoCollator, examples: list[dict]) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    start = time.perf_counter()
    batch = collator(examples)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def engine_run(model, tokenizer, cases) -> tuple[float, float]:
    """(seconds, mean per-request peak live KV) teacher-forcing every case in memento mode."""
    engine = LLMEngine(model, tokenizer, EngineConfig(mask=MaskConfig.chat(keep_last_n=0)))
    start = time.perf_counter()
    for prompt, forced in cases:
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=len(forced)), forced_tokens=forced)
    done = engine.run_to_completion()
    seconds = time.perf_counter() - start
    return seconds, statistics.mean(max(r.outputs[0].kv.live_kv) for r in done)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--traces", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    problems = generate(DEFAULT_TASK, "train", args.traces, seed=0)
    examples = [tokenize_example(tokenizer, p.prompt, p.memento_response()) for p in problems]
    cases = []
    for example in examples:
        n_prompt = example["completion_mask"].index(1)
        cases.append((example["input_ids"][:n_prompt], example["input_ids"][n_prompt:-1]))
    lengths = [len(e["input_ids"]) for e in examples]
    results: dict[str, dict] = {}
    for arch in ("olmo3", "phi3"):
        on = build_tiny_model(
            tokenizer, arch=arch, hidden_size=128, num_hidden_layers=4, sliding_window=args.window
        ).train()
        off = copy.deepcopy(on)
        off.config.sliding_window = OFF
        settings = SFTSettings(mask=MaskConfig.chat(keep_last_n=0))
        collators = {name: make_collator(m, tokenizer, 2, settings) for name, m in (("on", on), ("off", off))}
        times: dict[str, list[float]] = {"sft_on": [], "sft_off": [], "engine_on": [], "engine_off": []}
        peaks: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, model in (("on", on), ("off", off)):
                times[f"sft_{name}"].append(sft_step_seconds(model, collators[name], examples))
                model.eval()
                seconds, peak = engine_run(model, tokenizer, cases)
                model.train()
                times[f"engine_{name}"].append(seconds)
                peaks[name] = peak
        med = {k: statistics.median(v) for k, v in times.items()}
        results[arch] = {
            "sft_step_s": {"window": med["sft_on"], "no_window": med["sft_off"]},
            "sft_ratio": med["sft_on"] / med["sft_off"],
            "engine_s": {"window": med["engine_on"], "no_window": med["engine_off"]},
            "engine_ratio": med["engine_on"] / med["engine_off"],
            "peak_live_kv": {"window": peaks["on"], "no_window": peaks["off"]},
            "peak_ratio": peaks["on"] / peaks["off"],
        }
        print(
            f"{arch}: SFT step {med['sft_on']:.3f} s vs {med['sft_off']:.3f} s ({results[arch]['sft_ratio']:.2f}x); "
            f"engine {med['engine_on']:.2f} s vs {med['engine_off']:.2f} s ({results[arch]['engine_ratio']:.2f}x); "
            f"peak live KV {peaks['on']:.0f} vs {peaks['off']:.0f} ({results[arch]['peak_ratio']:.2f}x)"
        )
    summary = {
        "window": args.window,
        "traces": args.traces,
        "tokens": {"min": min(lengths), "mean": statistics.mean(lengths), "max": max(lengths)},
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
