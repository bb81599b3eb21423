"""Engine throughput and KV, each as a ratio measured side by side in one run.

(a) memento (keep_last_n=0) vs vanilla (keep_last_n=-1): the same workload (greedy, held-out
    synthetic problems) and the same KV budget. Vanilla is the control model (``--control``: trained
    to run without eviction, the paper's baseline); the memento model decoded without eviction loses
    its way and runs long, which inflates the ratio, so that pairing is only an extra, labelled row.
    Tokens/s, time to finish the whole batch, peak and AUC of the pool's occupancy, evictions and
    preemptions.
(b) this engine vs HF ``generate`` (batched, left-padded, greedy, DynamicCache) on the same model,
    nothing evicted on either side, so both must produce the same tokens (checked and reported).
(c) the time the engine spends returning evicted slots (its "compaction") as a share of the run.

    .venv/bin/python benchmarks/sft_accuracy.py --task stream_sum ... --out runs/sft_accuracy_stream
    .venv/bin/python benchmarks/engine_throughput.py --model runs/demo/memento-model \
        --control runs/demo/control-model --demo-task
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from memento.chat import chat_prompt
from memento.demo import DEMO_KNOBS
from memento.engine import EngineConfig, LLMEngine, SamplingParams
from memento.masking import MaskConfig
from memento.synth import generate


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    return model, tokenizer


def run_engine(model, tokenizer, prompts, keep_last_n: int, budget: int, max_tokens: int, max_seqs: int) -> dict:
    engine = LLMEngine(
        model,
        tokenizer,
        EngineConfig(mask=MaskConfig.chat(keep_last_n=keep_last_n), kv_budget_tokens=budget, max_num_seqs=max_seqs),
    )
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    done = {r.request_id: r.outputs[0] for r in engine.run_to_completion()}
    seconds = time.perf_counter() - start
    outs = [done[i] for i in ids]
    tokens = sum(len(o.token_ids) for o in outs)
    s = engine.stats
    return {
        "seconds": seconds,
        "generated_tokens": tokens,
        "tokens_per_second": tokens / seconds,
        "peak_kv_tokens": s.peak_kv,
        "auc_kv_token_steps": s.auc_kv,
        "peak_kv_bytes": s.peak_kv * engine.geometry.bytes_per_token,
        "mean_request_peak_kv": sum(o.kv.peak for o in outs) / len(outs),
        "steps": s.steps,
        "decode_steps": s.decode_steps,
        "evictions": s.evictions,
        "evicted_tokens": s.evicted_tokens,
        "preemptions": s.preemptions,
        "aborted": s.aborted,
        "forward_seconds": s.forward_seconds,
        "release_seconds": s.release_seconds,
        "release_share": s.release_seconds / s.step_seconds if s.step_seconds else 0.0,
        "finish_reasons": {r: sum(o.finish_reason == r for o in outs) for r in {o.finish_reason for o in outs}},
        "token_ids": [o.token_ids for o in outs],
    }


@torch.inference_mode()
def run_hf_generate(model, tokenizer, prompts, max_tokens: int, batch_size: int) -> dict:
    """HF generate, batched and left-padded, greedy, stopping at EOS (as a user would call it)."""
    tokenizer.padding_side = "left"
    outs: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(
            **enc,
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in gen[:, enc["input_ids"].shape[1] :].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id) + 1]
            outs.append(row)
    seconds = time.perf_counter() - start
    tokens = sum(len(o) for o in outs)
    return {"seconds": seconds, "generated_tokens": tokens, "tokens_per_second": tokens / seconds, "token_ids": outs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a trained memento model directory")
    parser.add_argument(
        "--control",
        type=Path,
        help="the control model vanilla runs; without it vanilla is the memento model decoded without "
        "eviction, which inflates the ratio (the report says so)",
    )
    parser.add_argument("--task", default="stream_sum")
    parser.add_argument(
        "--demo-task",
        action="store_true",
        help="the demo's longer traces (memento.demo.DEMO_KNOBS): use it with the demo's models",
    )
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=768)
    parser.add_argument("--kv-budget", type=int, default=4096, help="KV pool size in tokens, the same for both")
    parser.add_argument("--max-seqs", type=int, default=64)
    parser.add_argument("--hf-requests", type=int, default=16, help="requests for the HF generate comparison")
    parser.add_argument("--hf-batch", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    model, tokenizer = load(args.model)
    knobs = dict(DEMO_KNOBS) if args.demo_task else {}
    problems = generate(args.task, "test", args.requests, seed=1, **knobs)
    prompts = [chat_prompt(tokenizer, p.prompt) for p in problems]

    # Warm up once (allocator, first-call overheads) before any timing.
    run_engine(model, tokenizer, prompts[:2], 0, args.kv_budget, 16, args.max_seqs)

    control, control_tokenizer = load(args.control) if args.control else (model, tokenizer)
    memento = run_engine(model, tokenizer, prompts, 0, args.kv_budget, args.max_tokens, args.max_seqs)
    vanilla = run_engine(control, control_tokenizer, prompts, -1, args.kv_budget, args.max_tokens, args.max_seqs)
    same_model = (
        run_engine(model, tokenizer, prompts, -1, args.kv_budget, args.max_tokens, args.max_seqs)
        if args.control
        else None
    )
    # The KV each mode needs to hold the whole batch at once (a budget that never binds).
    roomy = args.requests * (args.max_tokens + 128)
    memento_roomy = run_engine(model, tokenizer, prompts, 0, roomy, args.max_tokens, args.requests)
    vanilla_roomy = run_engine(control, control_tokenizer, prompts, -1, roomy, args.max_tokens, args.requests)

    hf_prompts = prompts[: args.hf_requests]
    big = max(args.kv_budget, args.hf_requests * (args.max_tokens + 128))
    ours = run_engine(model, tokenizer, hf_prompts, -1, big, args.max_tokens, args.hf_batch)
    hf = run_hf_generate(model, tokenizer, hf_prompts, args.max_tokens, args.hf_batch)
    same = sum(a == b for a, b in zip(ours["token_ids"], hf["token_ids"], strict=True))

    def strip(d: dict) -> dict:
        return {k: v for k, v in d.items() if k != "token_ids"}

    def compare(m: dict, v: dict) -> dict:
        """Both runs and the memento / vanilla ratios (completion time: vanilla / memento)."""
        return {
            "memento": strip(m),
            "vanilla": strip(v),
            "throughput_ratio": m["tokens_per_second"] / v["tokens_per_second"],
            "completion_time_ratio": v["seconds"] / m["seconds"],
            "peak_kv_ratio": m["peak_kv_tokens"] / v["peak_kv_tokens"],
            "auc_kv_ratio": m["auc_kv_token_steps"] / v["auc_kv_token_steps"],
            "request_peak_kv_ratio": m["mean_request_peak_kv"] / v["mean_request_peak_kv"],
        }

    report = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": str(args.model),
        "vanilla_model": str(args.control or args.model),
        "vanilla_is": "the control model" if args.control else "the memento model decoded without eviction (inflated)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "task": args.task,
        "knobs": knobs,
        "requests": args.requests,
        "kv_budget_tokens": args.kv_budget,
        **compare(memento, vanilla),
        "unbounded": compare(memento_roomy, vanilla_roomy),
        "engine_vanilla_vs_hf": {
            "engine": strip(ours),
            "hf_generate": strip(hf),
            "speedup": ours["tokens_per_second"] / hf["tokens_per_second"],
            "identical_outputs": f"{same}/{len(hf_prompts)}",
        },
        "compaction_share_of_memento_run": memento["release_share"],
    }
    if same_model is not None:
        report["vanilla_same_model"] = compare(memento, same_model)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    unbounded = report["unbounded"]
    print(
        f"\n(a) memento vs vanilla ({report['vanilla_is']}), same budget {args.kv_budget}: "
        f"throughput x{report['throughput_ratio']:.2f}, "
        f"batch completion x{report['completion_time_ratio']:.2f}, peak KV x{report['peak_kv_ratio']:.2f}, "
        f"AUC KV x{report['auc_kv_ratio']:.2f}, per-request peak KV x{report['request_peak_kv_ratio']:.2f}\n"
        f"    whole batch at once (budget never binds): peak KV x{unbounded['peak_kv_ratio']:.2f}, "
        f"AUC KV x{unbounded['auc_kv_ratio']:.2f}, throughput x{unbounded['throughput_ratio']:.2f}\n"
        f"(b) engine vs HF generate: x{report['engine_vanilla_vs_hf']['speedup']:.2f} tokens/s, "
        f"identical outputs {same}/{len(hf_prompts)}\n"
        f"(c) slot release (compaction) share of the memento run: {100 * memento['release_share']:.2f}%"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
