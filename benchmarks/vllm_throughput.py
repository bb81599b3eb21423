"""The vLLM backend, measured side by side in one run (run it in the vLLM environment).

(a) memento vs vanilla through vLLM: the same workload (greedy, held-out synthetic problems) and KV
    budget (the same number of pages). Vanilla is the control model (``--control``: trained to run
    without eviction, as the paper's baseline); the memento model decoded without eviction loses its
    way and runs long, which inflates the ratio, so that pairing is kept only as a labelled extra
    row (``vanilla_same_model``). Tokens/s, time to finish the
    batch, AUC of the pages in use and of the live KV tokens, evictions and preemptions. Vanilla
    runs twice: with the memento classes in vanilla mode (keep_last_n=-1: its KV counters) and as
    stock vLLM (the classes' overhead when nothing is evicted). Peak KV is compared on a second
    pair of runs whose budget never binds (at a binding budget both peak at the whole pool).
(b) the vLLM backend vs the embedded engine (memento.engine) on the same workload and budget, both
    on one torch thread (vLLM's CPU worker serves on one): tokens/s and identical greedy outputs.
(c) the time the worker spends moving KV for compactions, as a share of the memento run.

    make vllm-setup
    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/vllm_throughput.py \
        --model runs/demo/memento-model --control runs/demo/control-model
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: the counters are readable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def vllm_run(model_dir: Path, prompts: list[str], *, keep: int | None, pages: int, block: int, args) -> dict:
    """One batch through an in-process vLLM engine; ``keep=None`` is stock vLLM (no memento classes)."""
    import vllm

    from memento.masking import MaskConfig
    from memento.vllm.config import MementoSettings, engine_args

    options = dict(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=args.max_model_len,
        distributed_executor_backend="uni",
        seed=0,
        block_size=block,
        num_gpu_blocks_override=pages + 1,
        max_num_seqs=args.max_seqs,
        enable_prefix_caching=False,
    )
    if keep is not None:
        options = engine_args(MementoSettings(mask=MaskConfig.chat(keep_last_n=keep)), **options)
    llm = vllm.LLM(**options)
    params = vllm.SamplingParams(temperature=0, max_tokens=args.max_tokens)
    llm.generate(prompts[:2], vllm.SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm-up
    core = llm.llm_engine.engine_core.engine_core
    scheduler = core.scheduler
    runner = core.model_executor.driver_worker.worker.model_runner
    before = _snapshot(scheduler, runner)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    after = _snapshot(scheduler, runner)
    token_ids = [list(o.outputs[0].token_ids) for o in outs]
    tokens = sum(len(t) for t in token_ids)
    result = {
        "seconds": seconds,
        "generated_tokens": tokens,
        "tokens_per_second": tokens / seconds,
        "torch_threads": _torch_threads(),
        "finish_reasons": _count(o.outputs[0].finish_reason for o in outs),
        "token_ids": token_ids,
    }
    if "steps" in after:
        steps = after["steps"] - before["steps"]
        result.update(
            steps=steps,
            peak_pages=after["used_blocks_peak"],
            peak_kv_tokens_paged=after["used_blocks_peak"] * block,
            auc_pages=after["used_blocks_auc"] - before["used_blocks_auc"],
            peak_live_kv_tokens=after["live_tokens_peak"],
            mean_request_peak_kv_tokens=(after["request_peak_sum"] - before["request_peak_sum"])
            / max(1, after["finished_requests"] - before["finished_requests"]),
            auc_live_kv_tokens=after["live_tokens_auc"] - before["live_tokens_auc"],
            evictions=after["evictions"] - before["evictions"],
            evicted_tokens=after["evicted_tokens"] - before["evicted_tokens"],
            moved_tokens=after["moved_tokens"] - before["moved_tokens"],
            preemptions=after["recomputes"] - before["recomputes"],
            compaction_seconds=after["compaction_seconds"] - before["compaction_seconds"],
        )
        result["compaction_share"] = result["compaction_seconds"] / seconds
    core.shutdown()
    del llm, core, scheduler, runner
    gc.collect()
    return result


def _snapshot(scheduler, runner) -> dict:
    stats = getattr(scheduler, "memento_stats", None)
    if stats is None:
        return {}
    out = dict(vars(stats))
    out["compaction_seconds"] = runner.memento_compaction_seconds
    return out


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def engine_run(model_dir: Path, prompts: list[str], budget: int, args) -> dict:
    import torch

    from memento.engine import EngineConfig, LLMEngine, SamplingParams
    from memento.masking import MaskConfig

    engine = LLMEngine.from_pretrained(
        model_dir,
        EngineConfig(mask=MaskConfig.chat(keep_last_n=0), kv_budget_tokens=budget, max_num_seqs=args.max_seqs),
        dtype="float32",
    )
    engine.add_request(prompts[0], SamplingParams(temperature=0, max_tokens=8))
    engine.run_to_completion()  # warm-up
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    done = {r.request_id: r.outputs[0] for r in engine.run_to_completion()}
    seconds = time.perf_counter() - start
    token_ids = [done[i].token_ids for i in ids]
    tokens = sum(len(t) for t in token_ids)
    return {
        "seconds": seconds,
        "generated_tokens": tokens,
        "tokens_per_second": tokens / seconds,
        "torch_threads": torch.get_num_threads(),
        "peak_kv_tokens": engine.stats.peak_kv,
        "preemptions": engine.stats.preemptions,
        "token_ids": token_ids,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a trained memento model (runs/demo/memento-model)")
    parser.add_argument(
        "--control",
        type=Path,
        help="the control model vanilla runs (runs/demo/control-model); without it vanilla is the memento model "
        "decoded without eviction, which inflates the ratio (the report says so)",
    )
    parser.add_argument("--task", default="stream_sum")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=768)
    parser.add_argument("--kv-budget", type=int, default=4096, help="KV budget in tokens, the same for every run")
    parser.add_argument("--block-size", type=int, default=32, help="vLLM page size (CPU: a multiple of 32)")
    parser.add_argument("--max-seqs", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from memento.chat import chat_prompt
    from memento.synth import generate

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = [chat_prompt(tokenizer, p.prompt) for p in generate(args.task, "test", args.requests, seed=1)]
    pages = -(-args.kv_budget // args.block_size)
    # The engine first: vLLM's CPU worker later pins torch's threads in this process for good.
    torch.set_num_threads(1)  # as vLLM's CPU worker serves (it reduces torch to one thread)
    engine = engine_run(args.model, prompts, pages * args.block_size, args)
    baseline = args.control or args.model
    memento = vllm_run(args.model, prompts, keep=0, pages=pages, block=args.block_size, args=args)
    vanilla = vllm_run(baseline, prompts, keep=-1, pages=pages, block=args.block_size, args=args)
    stock = vllm_run(baseline, prompts, keep=None, pages=pages, block=args.block_size, args=args)
    same_model = (
        vllm_run(args.model, prompts, keep=-1, pages=pages, block=args.block_size, args=args) if args.control else None
    )
    roomy = -(-args.requests * (args.max_tokens + 256) // args.block_size)  # every request at once
    memento_roomy = vllm_run(args.model, prompts, keep=0, pages=roomy, block=args.block_size, args=args)
    vanilla_roomy = vllm_run(baseline, prompts, keep=-1, pages=roomy, block=args.block_size, args=args)

    def strip(d: dict) -> dict:
        return {k: v for k, v in d.items() if k != "token_ids"}

    same_engine = sum(a == b for a, b in zip(memento["token_ids"], engine["token_ids"], strict=True))
    same_stock = sum(a == b for a, b in zip(vanilla["token_ids"], stock["token_ids"], strict=True))
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "model": str(args.model),
        "vanilla_model": str(baseline),
        "vanilla_is": "the control model" if args.control else "the memento model decoded without eviction (inflated)",
        "requests": args.requests,
        "kv_budget_tokens": pages * args.block_size,
        "block_size": args.block_size,
        "memento": strip(memento),
        "vanilla": strip(vanilla),
        "stock_vllm": strip(stock),
        "embedded_engine": strip(engine),
        "throughput_ratio": memento["tokens_per_second"] / vanilla["tokens_per_second"],
        "completion_time_ratio": vanilla["seconds"] / memento["seconds"],
        "auc_pages_ratio": memento["auc_pages"] / vanilla["auc_pages"],
        "auc_live_kv_ratio": memento["auc_live_kv_tokens"] / vanilla["auc_live_kv_tokens"],
        "unbounded": {
            "kv_budget_tokens": roomy * args.block_size,
            "memento": strip(memento_roomy),
            "vanilla": strip(vanilla_roomy),
            "throughput_ratio": memento_roomy["tokens_per_second"] / vanilla_roomy["tokens_per_second"],
            "peak_pages_ratio": memento_roomy["peak_pages"] / vanilla_roomy["peak_pages"],
            "peak_live_kv_ratio": memento_roomy["peak_live_kv_tokens"] / vanilla_roomy["peak_live_kv_tokens"],
            "request_peak_kv_ratio": memento_roomy["mean_request_peak_kv_tokens"]
            / vanilla_roomy["mean_request_peak_kv_tokens"],
            "auc_live_kv_ratio": memento_roomy["auc_live_kv_tokens"] / vanilla_roomy["auc_live_kv_tokens"],
        },
        "vanilla_classes_vs_stock_throughput": vanilla["tokens_per_second"] / stock["tokens_per_second"],
        "vanilla_identical_to_stock": f"{same_stock}/{args.requests}",
        "vllm_vs_engine_throughput": memento["tokens_per_second"] / engine["tokens_per_second"],
        "vllm_identical_to_engine": f"{same_engine}/{args.requests}",
        "compaction_share": memento["compaction_share"],
    }
    if same_model is not None:
        report["vanilla_same_model"] = {
            **strip(same_model),
            "throughput_ratio": memento["tokens_per_second"] / same_model["tokens_per_second"],
            "completion_time_ratio": same_model["seconds"] / memento["seconds"],
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    unbounded = report["unbounded"]
    print(
        f"\n(a) memento vs vanilla ({report['vanilla_is']}) through vLLM, budget {pages * args.block_size} tokens: "
        f"throughput "
        f"x{report['throughput_ratio']:.2f}, batch completion x{report['completion_time_ratio']:.2f}, AUC pages "
        f"x{report['auc_pages_ratio']:.2f}, AUC live KV x{report['auc_live_kv_ratio']:.2f}\n"
        f"    budget never binds: peak pages x{unbounded['peak_pages_ratio']:.2f}, peak live KV "
        f"x{unbounded['peak_live_kv_ratio']:.2f}, per-request peak KV x{unbounded['request_peak_kv_ratio']:.2f}, "
        f"AUC live KV x{unbounded['auc_live_kv_ratio']:.2f}, "
        f"throughput x{unbounded['throughput_ratio']:.2f}; memento classes in vanilla mode vs stock vLLM "
        f"x{report['vanilla_classes_vs_stock_throughput']:.2f} (identical {same_stock}/{args.requests})\n"
        f"(b) vLLM backend vs embedded engine (memento): x{report['vllm_vs_engine_throughput']:.2f} tokens/s, "
        f"identical outputs {same_engine}/{args.requests}\n"
        f"(c) compaction share of the memento run: {100 * report['compaction_share']:.2f}%"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
