"""Greedy answer accuracy on held-out synthetic problems: control (full attention) vs memento.

Both models are tiny Qwen3s trained from scratch on the same training problems with the same
number of optimizer steps and the same batch size:

- control: one stage of full causal attention on the control traces (the same blocks, no mementos);
- memento: stage 1 (full attention) then stage 2 (memento mask, from stage 1's best checkpoint) on
  the memento traces, half the steps each.

Each model then answers the held-out test problems by greedy decoding with the reference generator
(a full masked forward pass per token): the control with nothing evicted, the memento model with
its blocks evicted (keep_last_n=0). An answer is right when the text after ``</think>`` equals the
problem's answer. Also reported: peak live KV per problem (tokens the newest token attends to),
training time, and the loss curves (PNG).

    .venv/bin/python benchmarks/sft_accuracy.py --out runs/sft_accuracy      # ~15 min on 2 cores
    .venv/bin/python benchmarks/sft_accuracy.py --steps 40 --test 16 --out /tmp/x  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from memento.chat import assistant_prefix_ids, chat_prompt
from memento.engine import EngineConfig, LLMEngine, SamplingParams
from memento.format import SpecialTokenIds
from memento.masking import VANILLA, MaskConfig
from memento.modeling import build_tiny_model, count_parameters
from memento.reference import Generation, reference_generate
from memento.synth import DEFAULT_TASK, generate, write_split
from memento.tiny_tokenizer import build_tiny_tokenizer
from memento.train.pipeline import TrainPlan, run_training
from memento.train.sft import SFTSettings, read_log


def answer_of(text: str) -> str | None:
    """The model's answer: the text after ``</think>``, up to the end of the turn."""
    if "</think>" not in text:
        return None
    return text.split("</think>", 1)[1].split("<|im_end|>", 1)[0].strip()


def evaluate(
    model_dir: Path, problems, config: MaskConfig, batch_size: int, max_new_tokens: int, evaluator: str = "engine"
) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    specials = SpecialTokenIds.from_tokenizer(tokenizer)
    prompts = [tokenizer(chat_prompt(tokenizer, p.prompt), add_special_tokens=False)["input_ids"] for p in problems]
    start = time.perf_counter()
    if evaluator == "engine":  # greedy, token for token the reference generator's (tests/test_engine_*.py)
        engine = LLMEngine(
            model,
            tokenizer,
            EngineConfig(
                mask=config,
                kv_budget_tokens=max(batch_size, 1) * (max_new_tokens + max(map(len, prompts))),
                max_num_seqs=batch_size,
            ),
        )
        params = SamplingParams(temperature=0, max_tokens=max_new_tokens)
        ids = [engine.add_request(p, params) for p in prompts]
        done = {r.request_id: r.outputs[0] for r in engine.run_to_completion()}
        generations = [
            Generation(
                prompt_ids=p,
                token_ids=done[i].token_ids,
                finish_reason=done[i].finish_reason,
                live_kv=done[i].kv.live_kv,
            )
            for i, p in zip(ids, prompts, strict=True)
        ]
    else:
        generations = reference_generate(
            model,
            prompts,
            specials,
            config,
            max_new_tokens=max_new_tokens,
            eos_token_ids=[tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id,
            assistant_prefix=assistant_prefix_ids(tokenizer),
            batch_size=batch_size,
        )
    seconds = time.perf_counter() - start
    rows = []
    for problem, gen in zip(problems, generations, strict=True):
        text = tokenizer.decode(gen.token_ids)
        predicted = answer_of(text)
        rows.append(
            {
                "uid": problem.uid,
                "answer": problem.answer,
                "predicted": predicted,
                "correct": predicted == problem.answer.strip(),
                "finish_reason": gen.finish_reason,
                "generated_tokens": len(gen.token_ids),
                "peak_kv": max(gen.live_kv) if gen.live_kv else 0,
                "final_kv": gen.live_kv[-1] if gen.live_kv else 0,
            }
        )
    correct = sum(r["correct"] for r in rows)
    return {
        "accuracy": correct / len(rows),
        "correct": correct,
        "n": len(rows),
        "mean_peak_kv": statistics.mean(r["peak_kv"] for r in rows),
        "mean_generated_tokens": statistics.mean(r["generated_tokens"] for r in rows),
        "finish_reasons": {k: sum(r["finish_reason"] == k for r in rows) for k in ("eos", "length", "format_error")},
        "eval_seconds": seconds,
        "rows": rows,
    }


def plot_curves(runs: dict[str, list[Path]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, stage_dirs in runs.items():
        offset = 0
        for i, stage_dir in enumerate(stage_dirs, start=1):
            log = read_log(stage_dir)
            train = [(e["step"] + offset, e["loss"]) for e in log if "loss" in e]
            evals = [(e["step"] + offset, e["eval_loss"]) for e in log if "eval_loss" in e]
            label = f"{name} stage {i}" if len(stage_dirs) > 1 else name
            if train:
                ax.plot(*zip(*train, strict=True), label=f"{label} (train)", linewidth=1)
            if evals:
                ax.plot(*zip(*evals, strict=True), "o--", label=f"{label} (validation)", markersize=3)
            offset += max((s for s, _ in train), default=0)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step (same budget for both models)")
    ax.set_ylabel("loss per completion token")
    ax.set_title("Two-stage memento SFT vs control, tiny Qwen3 on the running-sum task")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/sft_accuracy"))
    parser.add_argument("--task", default=DEFAULT_TASK)
    parser.add_argument(
        "--knob", action="append", default=[], metavar="NAME=VALUE", help="a task knob (repeatable), e.g. max_steps=40"
    )
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--validation", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--steps", type=int, default=1400, help="optimizer steps per model (memento: half per stage)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--scheduler", default="cosine", help="learning-rate schedule (transformers name)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=256, help="MLP width of the tiny Qwen3")
    parser.add_argument("--eval-every", type=int, default=350)
    parser.add_argument("--gen-batch", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=768)
    parser.add_argument("--evaluator", choices=("engine", "reference"), default="engine")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    knobs = {}
    for item in args.knob:
        name, _, value = item.partition("=")
        knobs[name.strip()] = float(value) if "." in value else int(value)
    data = {}
    for split, n in (("train", args.train), ("validation", args.validation), ("test", args.test)):
        data[split] = generate(args.task, split, n, seed=0, **knobs)
        write_split(out / f"{split}.jsonl", data[split])
    tokenizer = build_tiny_tokenizer()
    n_params = count_parameters(
        build_tiny_model(
            tokenizer, hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=args.intermediate
        )
    )

    def settings(steps: int) -> SFTSettings:
        return SFTSettings(
            learning_rate=args.lr,
            lr_scheduler=args.scheduler,
            max_steps=steps,
            batch_size=args.batch_size,
            eval_steps=args.eval_every,
            logging_steps=10,
            eval_batch_size=64,
        )

    def plan(name: str, stage: str, field: str, s1: int, s2: int) -> TrainPlan:
        return TrainPlan(
            train_file=out / "train.jsonl",
            eval_file=out / "validation.jsonl",
            output_dir=out / name,
            stage=stage,
            response_field=field,
            tiny_arch="qwen3",
            tiny_options={
                "hidden_size": args.hidden,
                "num_hidden_layers": args.layers,
                "intermediate_size": args.intermediate,
                "seed": 0,
            },
            stage1=settings(s1),
            stage2=settings(s2),
        )

    timings = {}
    start = time.perf_counter()
    control = run_training(plan("control", "1", "control_response", args.steps, 0))
    timings["control"] = time.perf_counter() - start
    start = time.perf_counter()
    half = args.steps // 2
    memento = run_training(plan("memento", "both", "response", half, args.steps - half))
    timings["memento"] = time.perf_counter() - start
    plot_curves(
        {"control": [out / "control/stage1"], "memento": [out / "memento/stage1", out / "memento/stage2"]},
        out / "loss_curves.png",
    )

    memento_mode = MaskConfig(keep_last_n=0, require_assistant_section=True)
    results = {
        "control": evaluate(
            control["stage1"], data["test"], VANILLA, args.gen_batch, args.max_new_tokens, args.evaluator
        ),
        "memento": evaluate(
            memento["stage2"], data["test"], memento_mode, args.gen_batch, args.max_new_tokens, args.evaluator
        ),
    }
    summary = {
        "task": args.task,
        "knobs": knobs,
        "train_problems": args.train,
        "test_problems": args.test,
        "steps_per_model": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "scheduler": args.scheduler,
        "parameters": n_params,
        "training_seconds": timings,
        "training_seconds_total": sum(timings.values()),
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in results.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "rows.json").write_text(json.dumps({k: v["rows"] for k, v in results.items()}, indent=1) + "\n")
    print(json.dumps(summary, indent=2))
    c, m = results["control"], results["memento"]
    print("\n| model | greedy accuracy | mean peak KV (tokens) | training time |")
    print("|---|---|---|---|")
    for name, r in (("control (full attention)", c), ("memento (two-stage, keep 0)", m)):
        key = "control" if name.startswith("control") else "memento"
        accuracy = f"{r['accuracy']:.1%} ({r['correct']}/{r['n']})"
        print(f"| {name} | {accuracy} | {r['mean_peak_kv']:.0f} | {timings[key]:.0f} s |")
    print(
        f"\nmemento - control: {100 * (m['accuracy'] - c['accuracy']):+.1f} pp; peak KV ratio "
        f"{m['mean_peak_kv'] / c['mean_peak_kv']:.2f}; total training {sum(timings.values()):.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
