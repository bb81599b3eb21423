"""A real-shaped serving benchmark through the vLLM backend (issue 22): memento vs vanilla at one KV budget.

A random-weight Qwen3 with Qwen3-0.6B's attention geometry (hidden 1024, 16 query heads, 8 KV heads,
head_dim 128, MLP 3072; fewer layers so that it runs on a CPU) is forced through traces shaped like
OpenMementos (../shared/paper-notes.md section 2: ~9 blocks of ~1,150 tokens, mementos ~194 tokens):

    <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n
    <think>\\n (<|block_start|> block <|block_end|><|summary_start|> memento <|summary_end|>\\n) x 8-10 </think> answer

The prompt goes in as ``prompt_token_ids``; everything after it is forced through decode, one token
per step, by a logits processor that allows only the next trace token. A random model cannot
reason, so the traces are forced: memento and vanilla then decode exactly the same tokens with the
same model, pages and ``max_num_seqs``; only eviction differs (a fair systems comparison).

Runs, all at the same KV budget (``num_gpu_blocks_override`` pages): memento (the memento classes,
keep_last_n=0), vanilla (the same classes, keep_last_n=-1: nothing evicted, the KV counters still
exist) and, with ``--stock``, stock vLLM without the memento classes. Reported: forced decode tokens/s,
wall time, per-request peak KV (measured by the scheduler, and replayed from the token ids as
the paper measures it), AUC of live KV, preemptions, evictions, and the memento/vanilla ratios.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/vllm_real_shape.py --json runs/real_shape.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: the counters are readable

FORCE = "force_tokens"

# Qwen3-0.6B (its config.json): the attention geometry and MLP width kept here; its 28 layers are not.
GEOMETRY = dict(
    hidden_size=1024,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=3072,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
)

# OpenMementos (paper-notes.md section 2): ~9 blocks per trace, block ~1,150 tokens, memento ~194
# tokens (memento/block median 0.16-0.23). The prompt and answer lengths are ours (not in the notes).
SHAPE = dict(
    blocks=(8, 10),  # per trace, uniform (mean 9); not scaled
    block_tokens=(575, 1725),  # uniform, mean 1,150
    memento_ratio=(0.12, 0.22),  # memento = ratio x its block, mean 0.17: ~195 tokens
    prompt_tokens=(100, 300),  # the user's text (the chat template adds 22 tokens)
    answer_tokens=(50, 250),
)


def forced_tokens_processor():
    """vLLM's logits-processor class that forces output token i to ``extra_args["force_tokens"][i]``.

    The same as tests/vllm_backend/vllm_support.py's ``ForcedTokens`` (the benchmarks do not import
    from tests/): every logit but the forced token's becomes -inf, so greedy sampling picks it.
    """
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates

    class ForcedTokens(LogitsProcessor):
        def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
            self.rows: dict[int, tuple[list[int], Sequence[int]]] = {}

        def is_argmax_invariant(self) -> bool:
            return False

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            def new_row(params, prompt, output):
                forced = (params.extra_args or {}).get(FORCE)
                return (list(forced), output) if forced else None

            process_dict_updates(self.rows, batch_update, new_row)

        def apply(self, logits):
            for row, (forced, output) in self.rows.items():
                if len(output) < len(forced):
                    token = forced[len(output)]
                    logits[row].fill_(float("-inf"))
                    logits[row, token] = 0.0
            return logits

    return ForcedTokens


def build_model(path: Path, layers: int, seed: int) -> Any:
    """A random-weight Qwen3 with Qwen3-0.6B's geometry and ``layers`` layers, saved with the tiny tokenizer."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from memento.tiny_tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tok),
        num_hidden_layers=layers,
        max_position_embeddings=40_960,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        **GEOMETRY,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return tok


def make_traces(tok: Any, n: int, scale: float, seed: int) -> list[tuple[list[int], list[int]]]:
    """``n`` (prompt ids, forced ids) pairs with the OpenMementos shape, lengths times ``scale``."""
    from memento.chat import chat_prompt
    from memento.tiny_tokenizer import DEFAULT_ALPHABET

    rng = random.Random(seed)
    plain = [tok.convert_tokens_to_ids(c) for c in DEFAULT_ALPHABET if c != "\n"]

    def ids(lo: float, hi: float) -> list[int]:
        return rng.choices(plain, k=max(2, round(rng.uniform(lo, hi) * scale)))

    def special(name: str) -> int:
        return tok.convert_tokens_to_ids(name)

    newline = tok.convert_tokens_to_ids("\n")
    block_start, block_end = special("<|block_start|>"), special("<|block_end|>")
    summary_start, summary_end = special("<|summary_start|>"), special("<|summary_end|>")
    out = []
    for _ in range(n):
        text = tok.decode(ids(*SHAPE["prompt_tokens"]))
        prompt = tok(chat_prompt(tok, text), add_special_tokens=False)["input_ids"]
        forced = [special("<think>"), newline]
        for _ in range(rng.randint(*SHAPE["blocks"])):
            block = ids(*SHAPE["block_tokens"])
            memento = rng.choices(plain, k=max(2, round(len(block) * rng.uniform(*SHAPE["memento_ratio"]))))
            forced += [block_start, *block, block_end, summary_start, *memento, summary_end, newline]
        forced += [special("</think>"), *ids(*SHAPE["answer_tokens"])]
        out.append((prompt, forced))
    return out


def replayed_kv(tok: Any, traces, keep: int) -> dict[str, float]:
    """Per-request peak and AUC of live KV, replayed from the token ids as the paper measures them
    (paper-notes.md section 6: live KV tokens after each decode step, peak = max, AUC = the sum)."""
    from memento.chat import assistant_prefix_ids
    from memento.eval.kvsim import replay_live_kv
    from memento.format import SpecialTokenIds
    from memento.masking import MaskConfig

    specials, prefix = SpecialTokenIds.from_tokenizer(tok), assistant_prefix_ids(tok)
    mask = MaskConfig.chat(keep_last_n=keep)
    curves = [replay_live_kv(p + f, len(p), specials, mask, prefix) for p, f in traces]
    return {
        "mean_request_peak_kv_tokens": sum(max(c) for c in curves) / len(curves),
        "mean_request_auc_kv_token_steps": sum(sum(c) for c in curves) / len(curves),
    }


def vllm_run(model_dir: Path, traces, *, keep: int | None, pages: int, args) -> dict:
    """All traces forced through one in-process vLLM engine; ``keep=None`` is stock vLLM."""
    import vllm

    from memento.masking import MaskConfig
    from memento.vllm.config import MementoSettings, engine_args

    options = dict(
        model=str(model_dir),
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=args.max_model_len,
        distributed_executor_backend="uni",
        seed=0,
        block_size=args.block_size,
        num_gpu_blocks_override=pages + 1,  # + vLLM's null page, never handed out
        max_num_seqs=args.max_seqs,
        enable_prefix_caching=False,
        logits_processors=[forced_tokens_processor()],
    )
    if keep is not None:
        options = engine_args(MementoSettings(mask=MaskConfig.chat(keep_last_n=keep)), **options)
    llm = vllm.LLM(**options)

    def params(forced: list[int]):
        return vllm.SamplingParams(temperature=0, max_tokens=len(forced), ignore_eos=True, extra_args={FORCE: forced})

    # Warm-up: every decode batch size up to max_seqs once (staggered lengths), before the clock starts.
    warm = [traces[i % len(traces)] for i in range(args.max_seqs)]
    warm_params = [params(f[: 4 + 2 * i]) for i, (_, f) in enumerate(warm)]
    llm.generate([{"prompt_token_ids": p} for p, _ in warm], warm_params, use_tqdm=False)
    core = llm.llm_engine.engine_core.engine_core
    scheduler = core.scheduler
    runner = core.model_executor.driver_worker.worker.model_runner
    computed = _count_scheduled_tokens(scheduler)
    before = _snapshot(scheduler, runner)
    start = time.perf_counter()
    outs = llm.generate(
        [{"prompt_token_ids": p} for p, _ in traces], [params(f) for _, f in traces], use_tqdm=args.progress
    )
    seconds = time.perf_counter() - start
    after = _snapshot(scheduler, runner)
    forced_ok = sum(list(o.outputs[0].token_ids) == f for o, (_, f) in zip(outs, traces, strict=True))
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt_tokens = sum(len(p) for p, _ in traces)
    result: dict[str, Any] = {
        "seconds": seconds,
        "decode_tokens": tokens,
        "prompt_tokens": prompt_tokens,
        "tokens_per_second": tokens / seconds,
        # every token whose KV the model computed (prefill chunks and decode): a request's last token
        # is never fed back, so without preemption this is prompt + decode - requests
        "computed_tokens": computed[0],
        "recomputed_tokens": computed[0] - (prompt_tokens + tokens - len(traces)),
        "outputs_equal_forced": f"{forced_ok}/{len(traces)}",
    }
    if after:
        result.update(
            steps=after["steps"] - before["steps"],
            peak_pages=after["used_blocks_peak"],
            peak_live_kv_tokens=after["live_tokens_peak"],
            mean_request_peak_kv_tokens=(after["request_peak_sum"] - before["request_peak_sum"])
            / max(1, after["finished_requests"] - before["finished_requests"]),
            auc_live_kv_token_steps=after["live_tokens_auc"] - before["live_tokens_auc"],
            auc_pages=after["used_blocks_auc"] - before["used_blocks_auc"],
            preemptions=after["recomputes"] - before["recomputes"],
            evictions=after["evictions"] - before["evictions"],
            evicted_tokens=after["evicted_tokens"] - before["evicted_tokens"],
            moved_tokens=after["moved_tokens"] - before["moved_tokens"],
            compaction_seconds=after["compaction_seconds"] - before["compaction_seconds"],
        )
    core.shutdown()
    del llm, core, scheduler, runner, outs
    gc.collect()
    return result


def _count_scheduled_tokens(scheduler: Any) -> list[int]:
    """From now on, count the tokens each step schedules (a one-element list, updated in place)."""
    total = [0]
    schedule = scheduler.schedule

    def counted(*args: Any, **kwargs: Any):
        out = schedule(*args, **kwargs)
        total[0] += out.total_num_scheduled_tokens
        return out

    scheduler.schedule = counted
    return total


def _snapshot(scheduler: Any, runner: Any) -> dict:
    stats = getattr(scheduler, "memento_stats", None)
    if stats is None:
        return {}
    out = dict(vars(stats))
    out["compaction_seconds"] = getattr(runner, "memento_compaction_seconds", 0.0)
    return out


def _ratio(a: dict, b: dict, key: str) -> float | None:
    if not isinstance(a.get(key), int | float) or not isinstance(b.get(key), int | float) or not b[key]:
        return None
    return a[key] / b[key]


ROWS = [
    ("forced decode tokens/s", "tokens_per_second", "{:.1f}"),
    ("wall time (s), fastest of the repeats", "seconds", "{:.1f}"),
    ("per-request peak KV, mean (tokens)", "mean_request_peak_kv_tokens", "{:,.0f}"),
    ("peak live KV, all requests (tokens)", "peak_live_kv_tokens", "{:,}"),
    ("AUC live KV (token-steps)", "auc_live_kv_token_steps", "{:,}"),
    ("engine steps", "steps", "{:,}"),
    ("preemptions", "preemptions", "{:,}"),
    ("tokens recomputed after preemption", "recomputed_tokens", "{:,}"),
    ("evictions", "evictions", "{:,}"),
    ("evicted tokens", "evicted_tokens", "{:,}"),
    ("outputs = forced tokens", "outputs_equal_forced", "{}"),
]


def table(budget: dict) -> str:
    runs = [("memento", budget["memento"]), ("vanilla", budget["vanilla"])]
    if "stock_vllm" in budget:
        runs.append(("stock vLLM", budget["stock_vllm"]))
    head = "| | " + " | ".join(name for name, _ in runs) + " | memento/vanilla |"
    lines = [head, "|---" * (len(runs) + 2) + "|"]
    for label, key, fmt in ROWS:
        cells = [fmt.format(r[key]) if key in r else "-" for _, r in runs]
        ratio = _ratio(budget["memento"], budget["vanilla"], key)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'-' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (Qwen3-0.6B has 28)")
    parser.add_argument("--scale", type=float, default=1.0, help="every trace length times this (not the blocks)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-seqs", type=int, default=32, help="max_num_seqs, the same for every run")
    parser.add_argument(
        "--budget-traces",
        nargs="+",
        default=["4"],
        help="KV budget(s) as a number of mean vanilla traces (prompt + forced tokens), or 'all' (every request's "
        "whole trace at once: the budget never binds); one memento/vanilla pair each",
    )
    parser.add_argument("--block-size", type=int, default=32, help="vLLM page size (CPU: a multiple of 32)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--stock", action="store_true", help="also run stock vLLM (no memento classes), first budget")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of each kind; the fastest is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="real-shape-") as tmp:
        model_dir = Path(tmp)
        tok = build_model(model_dir, args.layers, args.seed)
        traces = make_traces(tok, args.requests, args.scale, args.seed)
        lengths = [len(p) + len(f) for p, f in traces]
        mean_trace = sum(lengths) / len(lengths)
        args.max_model_len = args.block_size * math.ceil((max(lengths) + 1) / args.block_size)
        bytes_per_token = 2 * args.layers * GEOMETRY["num_key_value_heads"] * GEOMETRY["head_dim"]
        bytes_per_token *= torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
        budgets = []
        for k in args.budget_traces:
            if k == "all":
                pages = sum(math.ceil(n / args.block_size) + 1 for n in lengths)
            else:
                pages = math.ceil(float(k) * mean_trace / args.block_size)
            # the pool must hold the longest trace, or vanilla cannot finish it
            pages = max(pages, math.ceil(max(lengths) / args.block_size) + 1)
            gib = math.ceil((pages + 1) * args.block_size * bytes_per_token / 2**30) + 1
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(gib, int(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))))
            entry: dict[str, Any] = {"budget_traces": k, "pages": pages, "kv_budget_tokens": pages * args.block_size}
            kinds = {"memento": 0, "vanilla": -1}
            if args.stock and not budgets:
                kinds["stock_vllm"] = None
            # Interleaved repeats (m, v, m, v, ...): the machine's drift falls on every kind alike; each
            # kind's fastest run is the headline (interference only slows a run; the tokens are the same).
            repeats: dict[str, list[dict]] = {kind: [] for kind in kinds}
            for _ in range(args.repeats):
                for kind, keep in kinds.items():
                    repeats[kind].append(vllm_run(model_dir, traces, keep=keep, pages=pages, args=args))
            for kind, runs in repeats.items():
                entry[kind] = {**min(runs, key=lambda r: r["seconds"]), "repeat_seconds": [r["seconds"] for r in runs]}
            entry["repeat_throughput_ratios"] = [
                m["tokens_per_second"] / v["tokens_per_second"]
                for m, v in zip(repeats["memento"], repeats["vanilla"], strict=True)
            ]
            entry["ratios_memento_over_vanilla"] = {
                key: _ratio(entry["memento"], entry["vanilla"], key)
                for key in (
                    "tokens_per_second",
                    "seconds",
                    "mean_request_peak_kv_tokens",
                    "auc_live_kv_token_steps",
                    "peak_live_kv_tokens",
                )
            }
            budgets.append(entry)
            print(f"\nKV budget {entry['kv_budget_tokens']:,} tokens ({k} mean vanilla traces, {pages} pages)")
            print(table(entry), flush=True)
            if args.repeats > 1:
                pairs = ", ".join(f"{q:.2f}x" for q in entry["repeat_throughput_ratios"])
                print(f"tokens/s memento/vanilla per repeat: {pairs}", flush=True)
        replay = {"memento": replayed_kv(tok, traces, 0), "vanilla": replayed_kv(tok, traces, -1)}

    blocks = [f.count(tok.convert_tokens_to_ids("<|block_start|>")) for _, f in traces]
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "model": {**GEOMETRY, "num_hidden_layers": args.layers, "vocab_size": len(tok), "dtype": args.dtype},
        "kv_bytes_per_token": bytes_per_token,
        "scale": args.scale,
        "requests": args.requests,
        "max_num_seqs": args.max_seqs,
        "block_size": args.block_size,
        "trace_shape": {
            "mean_prompt_tokens": sum(len(p) for p, _ in traces) / len(traces),
            "mean_forced_tokens": sum(len(f) for _, f in traces) / len(traces),
            "mean_blocks": sum(blocks) / len(blocks),
            "mean_trace_tokens": mean_trace,
            "max_trace_tokens": max(lengths),
            "shape": SHAPE,
        },
        "budgets": budgets,
        "replayed_per_request_kv": {
            **replay,
            "peak_ratio": replay["memento"]["mean_request_peak_kv_tokens"]
            / replay["vanilla"]["mean_request_peak_kv_tokens"],
            "auc_ratio": replay["memento"]["mean_request_auc_kv_token_steps"]
            / replay["vanilla"]["mean_request_auc_kv_token_steps"],
        },
        "total_seconds": time.perf_counter() - started,
    }
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    r = report["replayed_per_request_kv"]
    print(
        f"\ntraces: {args.requests} requests, mean {mean_trace:,.0f} tokens (prompt "
        f"{report['trace_shape']['mean_prompt_tokens']:.0f}, {report['trace_shape']['mean_blocks']:.1f} blocks), "
        f"scale {args.scale:g}; replayed per-request peak KV memento/vanilla x{r['peak_ratio']:.2f}, "
        f"AUC x{r['auc_ratio']:.2f}; total {report['total_seconds']:.0f} s"
    )
    for entry in budgets:
        q = entry["ratios_memento_over_vanilla"]
        print(
            f"budget {entry['kv_budget_tokens']:,}: tokens/s x{q['tokens_per_second']:.2f} (target >= 2.0), "
            f"per-request peak KV x{q['mean_request_peak_kv_tokens']:.2f} (target <= 0.30)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
