"""The passcode probe: does a memento's KV carry a code its text never mentions, after the block is gone?

The paper's experiment (section 7), at our scale: a random 5-digit code is written into the second
block (T2) of reference traces, the traces are teacher-forced under the memento mask, and a probe
(:mod:`memento.analysis.probe`) reads the keys and values cached at one memento's tokens, one layer
at a time, to recover the code. Codes in validation never occur in training.

- **direct**: memento 2 (M2), computed while T2 (and the code) was visible.
- **masked +d**: memento 2+d, computed after T2 was evicted. No later *text* depends on the code
  (the traces are teacher-forced from the gold reasoning), so anything the probe finds can only
  have reached it through the KV of earlier mementos: the dual information stream.
- **causal control**: memento 1, computed before T2 existed: must sit at chance (10%) or the
  experiment leaks (the same features, the same probe, the same labels).
- **restart control**: masked +1 again, but with every memento recomputed without its block
  (masking.py's restart mode): the channel is cut, so it too must sit at chance.

The injected sentence is new to the model (it never saw codes in training), as in the paper, where
codes were injected into real traces.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from memento.analysis.kv import kv_features
from memento.analysis.probe import (
    CHANCE,
    ProbeResult,
    ProbeSettings,
    digit_labels,
    family_contains,
    split_codes,
    train_probe,
)
from memento.chat import assistant_prefix_ids, chat_prompt
from memento.format import MementoUnit, SpecialTokenIds, render_response
from memento.masking import MaskConfig
from memento.synth.tasks import Problem, generate

IN_PLACE = MaskConfig.chat(keep_last_n=0)
RESTART = MaskConfig.chat(keep_last_n=0, restart=True)
CODE_BLOCK = 1
"""The code goes into the second block (T2), as in the paper: memento 1 then predates it."""


@dataclass(frozen=True)
class PasscodeSettings:
    """The study's knobs; the defaults are the full run (about 5 minutes on the demo's model, 2 cores)."""

    task: str = "stream_sum"
    knobs: dict[str, int] = field(default_factory=dict)
    samples: int = 6000
    digits: int = 5
    template: str = " passcode {code}"
    """What is written into T2 (``{code}`` is replaced)."""
    at: str = "end"
    """Where in T2: ``end`` (just before ``<|block_end|>``, where the memento's attention looks) or ``start``."""
    max_distance: int = 3
    validation_fraction: float = 0.2
    batch_size: int = 32
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    seed: int = 0

    @classmethod
    def quick(cls, **overrides: Any) -> PasscodeSettings:
        """A smoke run for tests: few samples, short probe training."""
        base = {"samples": 400, "probe": ProbeSettings(epochs=8, patience=3)}
        base.update(overrides)
        return cls(**base)


@dataclass
class PasscodeSamples:
    """Teacher-forced sequences with a code in T2 and where each memento's tokens sit."""

    sequences: list[list[int]]
    codes: list[str]
    memento_positions: list[list[list[int]]]  # [sample][memento] -> token positions (fixed width)
    width: int


def inject_code(problem: Problem, code: str, template: str, at: str = "end") -> str:
    """The response of ``problem`` with ``template`` (holding ``code``) at the start or end of its second block."""
    if at not in ("start", "end"):
        raise ValueError(f"at must be 'start' or 'end', not {at!r}")
    units = list(problem.trace.units)
    if len(units) <= CODE_BLOCK + 1:
        raise ValueError(f"problem {problem.uid} has {len(units)} blocks: the probe needs at least 3")
    target = units[CODE_BLOCK]
    text = template.format(code=code)
    block = text + target.block if at == "start" else target.block + text
    units[CODE_BLOCK] = MementoUnit(block=block, memento=target.memento)
    return render_response(replace(problem.trace, units=tuple(units)))


def memento_spans(ids: Sequence[int], specials: SpecialTokenIds, start: int) -> list[tuple[int, int]]:
    """(``<|summary_start|>`` position, ``<|summary_end|>`` position) of each memento at or after ``start``."""
    spans, open_at = [], None
    for position in range(start, len(ids)):
        token = ids[position]
        if token == specials.summary_start:
            open_at = position
        elif token == specials.summary_end and open_at is not None:
            spans.append((open_at, position))
            open_at = None
    return spans


def build_samples(tokenizer: Any, specials: SpecialTokenIds, settings: PasscodeSettings) -> PasscodeSamples:
    """``settings.samples`` (problem, code) pairs: problems drawn from the task (repeats allowed:
    the code, not the problem, is what must be new), codes uniform and independent of everything."""
    rng = random.Random(settings.seed)
    pool = generate(settings.task, "train", min(settings.samples, 2000), seed=settings.seed, **settings.knobs)
    need = CODE_BLOCK + 1 + settings.max_distance
    pool = [p for p in pool if len(p.trace.units) >= need]
    if not pool:
        raise ValueError(
            f"no {settings.task} problem has the {need} blocks that distance +{settings.max_distance} needs: "
            "lower --max-distance or give the task more steps"
        )
    sequences, codes, spans = [], [], []
    for _ in range(settings.samples):
        problem = rng.choice(pool)
        code = "".join(rng.choice("0123456789") for _ in range(settings.digits))
        prompt = chat_prompt(tokenizer, problem.prompt)
        response = inject_code(problem, code, settings.template, settings.at)
        ids = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
        prompt_end = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        sequences.append(ids)
        codes.append(code)
        spans.append(memento_spans(ids, specials, prompt_end))
    width = min(end - begin for sample in spans for begin, end in sample)
    positions = [[list(range(begin, begin + width)) for begin, _ in sample] for sample in spans]
    return PasscodeSamples(sequences, codes, positions, width)


def code_sensitivity(
    model: Any, tokenizer: Any, settings: PasscodeSettings, config: MaskConfig, problems: int = 40
) -> list[list[float]]:
    """[layer][memento] how much the KV moves when only the code changes, relative to how much it moves
    between problems: the same problem twice with two codes, ``|KV(a) - KV(b)|`` over the mean distance
    between consecutive problems' KV. Exact, no probe: 0 where the code cannot reach (layer 0, memento 1,
    restart), and a measure of the signal a probe has to find where it can."""
    specials = SpecialTokenIds.from_tokenizer(tokenizer)
    rng = random.Random(settings.seed + 1)
    need = CODE_BLOCK + 1 + settings.max_distance
    pool = generate(settings.task, "train", 4 * problems, seed=settings.seed + 1, **settings.knobs)
    pool = [p for p in pool if len(p.trace.units) >= need][:problems]
    if len(pool) < 2:
        raise ValueError(f"need at least 2 {settings.task} problems with {need} blocks for the sensitivity")
    sequences, positions, width = [], [], None
    for problem in pool:
        prompt = chat_prompt(tokenizer, problem.prompt)
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        for _ in range(2):
            code = "".join(rng.choice("0123456789") for _ in range(settings.digits))
            ids = tokenizer(
                prompt + inject_code(problem, code, settings.template, settings.at), add_special_tokens=False
            )
            spans = memento_spans(ids["input_ids"], specials, start)[:need]
            width = min([width or 10**9, *(end - begin for begin, end in spans)])
            sequences.append(ids["input_ids"])
            positions.append([begin for begin, _ in spans])
    assert width is not None
    positions = [[b + k for b in begins for k in range(width)] for begins in positions]
    features = kv_features(
        model,
        sequences,
        positions,
        specials,
        config,
        assistant_prefix=assistant_prefix_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id or 0,
        batch_size=settings.batch_size,
    )
    out = []
    for layer in sorted(features):
        x = features[layer].reshape(len(sequences), need, -1)
        first, second = x[0::2], x[1::2]
        code_change = np.linalg.norm(first - second, axis=-1).mean(axis=0)
        problem_change = np.linalg.norm(first[1:] - first[:-1], axis=-1).mean(axis=0)
        out.append([float(v) for v in code_change / np.maximum(problem_change, 1e-12)])
    return out


def _conditions(settings: PasscodeSettings) -> dict[str, int]:
    """Each condition's memento index (0-based): causal M1, direct M2, masked M(2+d)."""
    names = {"causal": CODE_BLOCK - 1, "direct": CODE_BLOCK}
    names.update({f"masked+{d}": CODE_BLOCK + d for d in range(1, settings.max_distance + 1)})
    return names


def _features(
    model: Any,
    samples: PasscodeSamples,
    mementos: Sequence[int],
    specials: SpecialTokenIds,
    config: MaskConfig,
    prefix: list[int],
    settings: PasscodeSettings,
    pad_token_id: int,
) -> dict[int, dict[int, np.ndarray]]:
    """{memento index: {layer: features}} from one teacher-forced pass over every sample."""
    positions = [[p for m in mementos for p in sample[m]] for sample in samples.memento_positions]
    by_layer = kv_features(
        model,
        samples.sequences,
        positions,
        specials,
        config,
        assistant_prefix=prefix,
        pad_token_id=pad_token_id,
        batch_size=settings.batch_size,
    )
    out: dict[int, dict[int, np.ndarray]] = {m: {} for m in mementos}
    for layer, features in by_layer.items():
        split = features.reshape(len(features), len(mementos), -1)  # per token keys then values, in order
        for i, m in enumerate(mementos):
            out[m][layer] = np.ascontiguousarray(split[:, i])
    return out


def run_passcode_study(
    model: Any,
    tokenizer: Any,
    settings: PasscodeSettings,
    out: Path,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build the samples, read the KV at each condition's memento, fit one probe per (condition,
    layer); write ``out/passcode.json`` and the plots; return the results."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    specials = SpecialTokenIds.from_tokenizer(tokenizer)
    prefix = assistant_prefix_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    samples = build_samples(tokenizer, specials, settings)
    labels = digit_labels(samples.codes)
    validation = split_codes(samples.codes, settings.validation_fraction)
    n_layers = int(model.config.num_hidden_layers)
    log(
        f"passcode: {len(samples.sequences)} samples ({int(validation.sum())} validation codes, never in "
        f"training), memento width {samples.width} tokens, {n_layers} layers"
    )

    def fit(features: np.ndarray) -> ProbeResult:
        return train_probe(
            features[~validation], labels[~validation], features[validation], labels[validation], settings.probe
        )

    conditions = _conditions(settings)
    in_place = _features(model, samples, sorted(set(conditions.values())), specials, IN_PLACE, prefix, settings, pad)
    log(f"  KV read ({time.perf_counter() - started:.0f} s)")
    results: dict[str, dict[str, Any]] = {}
    for name, memento in conditions.items():
        features = in_place[memento]
        all_layers = name in ("causal", "direct", "masked+1")
        layers = range(n_layers) if all_layers else [n_layers - 1]
        results[name] = {str(layer): fit(features[layer]).to_dict() for layer in layers}
        last = results[name][str(n_layers - 1)]
        log(
            f"  {name:>9} (memento {memento + 1}): last layer {last['accuracy']:.1%} "
            f"[{last['low']:.1%}, {last['high']:.1%}]"
        )
    restart = _features(model, samples, [CODE_BLOCK + 1], specials, RESTART, prefix, settings, pad)
    results["restart+1"] = {str(n_layers - 1): fit(restart[CODE_BLOCK + 1][n_layers - 1]).to_dict()}
    last = results["restart+1"][str(n_layers - 1)]
    log(f"  restart+1 (memento {CODE_BLOCK + 2}, recomputed): last layer {last['accuracy']:.1%}")
    sensitivity = {
        "in_place": code_sensitivity(model, tokenizer, settings, IN_PLACE),
        "restart": code_sensitivity(model, tokenizer, settings, RESTART),
    }
    summary = {
        "settings": {**asdict(settings), "probe": asdict(settings.probe)},
        "sensitivity": sensitivity,
        "samples": len(samples.sequences),
        "validation_samples": int(validation.sum()),
        "memento_width": samples.width,
        "layers": n_layers,
        "chance": CHANCE,
        "conditions": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(out / "passcode.json", summary)
    plot_passcode(summary, out)
    return summary


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n")


def _point(results: dict[str, Any], condition: str, layer: int) -> dict[str, float] | None:
    return results["conditions"].get(condition, {}).get(str(layer))


def plot_passcode(results: dict[str, Any], out: Path) -> list[Path]:
    """``passcode_layers.png`` (accuracy by layer per condition) and ``passcode_distance.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers, chance = results["layers"], results["chance"]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for offset, condition in zip((-0.1, 0.0, 0.1), ("direct", "masked+1", "causal"), strict=True):
        points = [(layer, _point(results, condition, layer)) for layer in range(n_layers)]
        xs = [layer + 1 + offset for layer, p in points if p]
        ys = [p["accuracy"] for _, p in points if p]
        errors = [
            [p["accuracy"] - p["low"] for _, p in points if p],
            [p["high"] - p["accuracy"] for _, p in points if p],
        ]
        ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=condition)
    ax.axhline(chance, color="grey", linestyle="--", label="chance")
    ax.set(xlabel="layer", ylabel="digit accuracy (validation codes)", title="Passcode probe by layer")
    ax.set_xticks(range(1, n_layers + 1))
    ax.legend()
    fig.tight_layout()
    paths.append(out / "passcode_layers.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    last = n_layers - 1
    masked = sorted((c for c in results["conditions"] if c.startswith("masked+")), key=lambda c: int(c[7:]))
    names = ["causal", "direct", *masked]
    distances = [-1, 0] + [int(c.split("+")[1]) for c in names[2:]]
    points = [_point(results, c, last) for c in names]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(
        distances,
        [p["accuracy"] for p in points],
        yerr=[[p["accuracy"] - p["low"] for p in points], [p["high"] - p["accuracy"] for p in points]],
        marker="o",
        capsize=3,
        label=f"in-place KV, layer {n_layers}",
    )
    restart = _point(results, "restart+1", last)
    if restart:
        ax.errorbar(
            [1.1],
            [restart["accuracy"]],
            yerr=[[restart["accuracy"] - restart["low"]], [restart["high"] - restart["accuracy"]]],
            marker="s",
            capsize=3,
            label="restart KV",
        )
    ax.axhline(chance, color="grey", linestyle="--", label="chance")
    ax.set(
        xlabel="memento distance from the code's block (-1 = causal control)",
        ylabel="digit accuracy",
        title="Passcode probe by distance",
    )
    ax.legend()
    fig.tight_layout()
    paths.append(out / "passcode_distance.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


PAPER_PASSCODE = (
    "paper section 7 (Qwen3-8B / 32B, real traces): direct 60-70%, masked 26.7% (8B) / 23.0% (32B), "
    "causal control exactly chance; an early layer near chance (8B: 10.8% at layer 4 vs 26.5% at layer 36)"
)


def _cell(point: dict[str, Any] | None) -> str:
    if point is None:
        return ""
    return f"{point['accuracy']:.1%} [{point['low']:.1%}, {point['high']:.1%}]"


def passcode_report_lines(results: dict[str, Any]) -> list[str]:
    """The report.md section: accuracy per layer and per distance, against chance and the paper."""
    s, n_layers = results["settings"], results["layers"]
    conditions = results["conditions"]
    lines = [
        "## KV passcode probe: is a code from an evicted block recoverable from later mementos' KV?",
        "",
        f"Task `{s['task']}` {s['knobs'] or '(default knobs)'}; a random {s['digits']}-digit code written at the "
        f"{s['at']} of block 2 (`{s['template'].strip()}`); {results['samples']} samples, "
        f"{results['validation_samples']} of them with validation codes never seen in training. Features: the keys "
        f"and values cached at the first {results['memento_width']} tokens of one memento, one layer. Probe: MLP "
        "512-256-128, one 10-way head per digit; accuracy per digit on validation codes, 95% interval over samples; "
        f"chance {results['chance']:.0%}.",
        "",
        "| layer | causal control (memento 1) | direct (memento 2) | masked +1 (memento 3) |",
        "|---|---|---|---|",
    ]
    for layer in range(n_layers):
        cells = [_cell(conditions.get(c, {}).get(str(layer))) for c in ("causal", "direct", "masked+1")]
        lines.append(f"| {layer + 1} | " + " | ".join(cells) + " |")
    last = str(n_layers - 1)
    masked = sorted((c for c in conditions if c.startswith("masked+")), key=lambda c: int(c[7:]))
    lines += ["", f"By distance, layer {n_layers}:", "", "| memento | accuracy |", "|---|---|"]
    for name in ["causal", "direct", *masked, "restart+1"]:
        if last in conditions.get(name, {}):
            lines.append(f"| {name} | {_cell(conditions[name][last])} |")
    sensitivity = results.get("sensitivity")
    if sensitivity:
        n_mementos = len(sensitivity["in_place"][0])
        lines += [
            "",
            "How far the code reaches, exactly (no probe): the change in a memento's KV when only the code changes, "
            "relative to the change between two problems (in-place eviction; under restart every entry is "
            f"{max(v for row in sensitivity['restart'] for v in row):.0e}):",
            "",
            "| layer | " + " | ".join(f"memento {m + 1}" for m in range(n_mementos)) + " |",
            "|---|" + "---|" * n_mementos,
        ]
        for layer, row in enumerate(sensitivity["in_place"]):
            lines.append(f"| {layer + 1} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
    lines += ["", f"Paper: {PAPER_PASSCODE}.", "", *passcode_findings(results), ""]
    lines += ["![by layer](passcode_layers.png) ![by distance](passcode_distance.png)"]
    return lines


def passcode_findings(results: dict[str, Any]) -> list[str]:
    """Plain statements of which of the paper's findings hold here."""
    conditions, chance = results["conditions"], results["chance"]
    last, first = str(results["layers"] - 1), "0"
    causal = conditions["causal"][last]
    direct = conditions["direct"][last]
    masked = conditions["masked+1"][last]
    restart = conditions.get("restart+1", {}).get(last)
    layers = [conditions["causal"][str(layer)] for layer in range(results["layers"])]
    at_chance = family_contains(layers, chance)
    said = [
        f"- Causal control at chance at every layer (family-wise 95% over the {len(layers)} layers, Bonferroni): "
        f"{'yes' if at_chance else 'NO (a leak)'} (last layer {_cell(causal)}).",
        f"- Direct above chance: {'yes' if direct['low'] > chance else 'no'} ({_cell(direct)}).",
        f"- Masked +1 at the last layer >= 2x chance: {'yes' if masked['accuracy'] >= 2 * chance else 'no'} "
        f"({_cell(masked)}); above the first layer: "
        f"{'yes' if masked['low'] > conditions['masked+1'][first]['high'] else 'no'}.",
    ]
    if restart:
        said.append(
            f"- Restart control (channel cut) at chance: {'yes' if restart['low'] <= chance else 'no'} "
            f"({_cell(restart)})."
        )
    return said
