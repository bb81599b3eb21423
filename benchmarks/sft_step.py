"""One SFT step (forward + backward + AdamW) with the memento mask vs full causal attention.

Same model, same batch, timed round-robin in one run:

- causal: stage 1's path (a 2D padding mask; transformers builds its own causal mask);
- memento dense (sdpa): stage 2's path, the (B, 1, L, L) boolean mask from masking.py;
- vanilla dense (sdpa): the same 4D path with keep_last_n=-1, which separates the cost of passing
  any 4D mask from the cost of the memento pattern itself;
- memento BlockMask: FlexAttention through attn_implementation="flex_attention" (eager on CPU),
  reported if this transformers/torch accepts it.

The batch is real: default synthetic-task traces (``memento.synth``), tokenised by the tiny
character-level tokenizer, on a tiny Qwen3 (DESIGN.md's size). Collation (including building the
mask) is part of each step, as it is in training.

    .venv/bin/python benchmarks/sft_step.py                  # batch 32, 4 layers x 128
    .venv/bin/python benchmarks/sft_step.py --batch 8 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from memento.chat import assistant_prefix_ids
from memento.format import SpecialTokenIds
from memento.masking import MaskConfig, build_batch, make_block_mask
from memento.modeling import build_tiny_model
from memento.synth import DEFAULT_TASK, generate
from memento.tiny_tokenizer import build_tiny_tokenizer
from memento.train.collate import MementoCollator, tokenize_example

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    tokenizer = build_tiny_tokenizer()
    specials = SpecialTokenIds.from_tokenizer(tokenizer)
    prefix = assistant_prefix_ids(tokenizer)
    problems = generate(DEFAULT_TASK, "train", args.batch, seed=0)
    examples = [tokenize_example(tokenizer, p.prompt, p.memento_response()) for p in problems]
    lengths = [len(e["input_ids"]) for e in examples]
    memento = MaskConfig(keep_last_n=0, require_assistant_section=True)
    vanilla = MaskConfig(keep_last_n=-1)

    def collator(config: MaskConfig | None) -> MementoCollator:
        return MementoCollator(specials, tokenizer.pad_token_id, config, "sdpa", prefix if config else None)

    models = {
        impl: build_tiny_model(
            tokenizer, hidden_size=args.hidden, num_hidden_layers=args.layers, attn_implementation=impl
        ).train()
        for impl in ("sdpa", "flex_attention")
    }  # the same seed: the same weights
    optimisers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}

    def step_with(impl: str, make_batch: Callable[[], dict[str, torch.Tensor]]) -> Callable[[], float]:
        model, optimiser = models[impl], optimisers[impl]

        def step() -> float:
            loss = model(**make_batch()).loss
            loss.backward()
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            return float(loss.detach())

        return step

    def flex_batch() -> dict[str, torch.Tensor]:
        dense = collator(None)(examples)
        mb = build_batch([e["input_ids"] for e in examples], specials, memento, assistant_prefix=prefix)
        return {**dense, "attention_mask": make_block_mask(mb.invisible_from)}

    variants = {
        "causal (stage 1: 2D padding mask)": step_with("sdpa", lambda: collator(None)(examples)),
        "memento dense bool (stage 2, sdpa)": step_with("sdpa", lambda: collator(memento)(examples)),
        "vanilla dense bool (4D, sdpa)": step_with("sdpa", lambda: collator(vanilla)(examples)),
    }
    if not args.no_flex:
        try:
            step_with("flex_attention", flex_batch)()
            variants["memento BlockMask (flex_attention, eager)"] = step_with("flex_attention", flex_batch)
        except Exception as err:  # reported, not hidden: the table says why the row is missing
            print(f"flex_attention path unavailable: {type(err).__name__}: {err}")

    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    causal = statistics.median(times["causal (stage 1: 2D padding mask)"])
    tokens = sum(lengths)
    n_params = sum(p.numel() for p in models["sdpa"].parameters())
    print(f"machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"batch {args.batch} x {min(lengths)}-{max(lengths)} tokens ({tokens} tokens, task {DEFAULT_TASK}), tiny "
        f"Qwen3 {args.layers} layers x {args.hidden} ({n_params / 1e6:.2f}M parameters); {args.repeats} "
        "interleaved repeats after a warm-up\n"
    )
    print("| step | median | min | vs causal | tokens/s |")
    print("|---|---|---|---|---|")
    results = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        results[name] = {"median_s": median, "min_s": min(ts), "ratio_vs_causal": median / causal}
        row = [name, f"{median * 1e3:.0f} ms", f"{min(ts) * 1e3:.0f} ms", f"{median / causal:.2f}x"]
        print("| " + " | ".join([*row, f"{tokens / median:,.0f}"]) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"batch": args.batch, "tokens": tokens, "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
