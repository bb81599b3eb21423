"""Small models, data and an independent mask shared by the training and reference tests."""

from __future__ import annotations

import contextlib
import random

import torch
import torch.nn.functional as F

from memento.chat import chat_prompt
from memento.format import SpecialTokenIds, render_response
from memento.modeling import build_tiny_model
from memento.synth import generate
from memento.train.collate import IGNORE_INDEX

CASE_CHARS = "abcdefghij0123456789+=: "


def tiny_model(tokenizer, impl: str = "sdpa", seed: int = 0):
    """A 2-layer, 32-wide Qwen3 for fast tests (memento.modeling.build_tiny_model).

    Untied: a random model with tied embeddings tends to echo its last token, which would make
    free-running generation from a random model malformed (e.g. a nested ``<|block_start|>``).
    """
    return build_tiny_model(
        tokenizer,
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        seed=seed,
        attn_implementation=impl,
        tie_word_embeddings=False,
    ).eval()


def records(n: int, seed: int = 0, blocks: int = 3) -> list[dict[str, str]]:
    problems = generate("running_sum", "train", n, seed=seed, min_blocks=blocks, max_blocks=blocks, items_per_block=2)
    return [{"problem": p.prompt, "response": render_response(p.trace)} for p in problems]


def hand_mask(ids: list[int], specials: SpecialTokenIds, tracked_from: int) -> torch.Tensor:
    """The memento mask written out from the paper's rule, token by token (no masking.py)."""
    n = len(ids)
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool))
    block_start = block_end = None
    for pos in range(tracked_from, n):
        if ids[pos] == specials.block_start:
            block_start = pos
        elif ids[pos] == specials.block_end:
            block_end = pos
        elif ids[pos] == specials.summary_end:
            mask[pos:, block_start + 1 : block_end] = False  # the block's reasoning, from here on
    return mask


def completion_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy of the next token, on labelled positions only (as HF shifts)."""
    shift_logits, shift_labels = logits[:-1], labels[1:]
    keep = shift_labels != IGNORE_INDEX
    return F.cross_entropy(shift_logits[keep].float(), shift_labels[keep], reduction="none")


def memento_case(
    tokenizer, rng: random.Random, block_len: tuple[int, int] = (1, 14), units: tuple[int, int] = (1, 4)
) -> tuple[list[int], list[int]]:
    """(prompt ids, continuation ids): a chat prompt and a memento-structured response.

    The response has ``units`` complete units (blocks of ``block_len`` characters), sometimes a final block left open
    (generation stopped mid-block) and sometimes ``</think>`` and an answer.
    """

    def text(lo: int, hi: int) -> str:
        return "".join(rng.choice(CASE_CHARS) for _ in range(rng.randint(lo, hi)))

    prompt = chat_prompt(tokenizer, text(3, 20))
    response = "<think>\n"
    for _ in range(rng.randint(*units)):
        response += f"<|block_start|>{text(*block_len)}<|block_end|><|summary_start|>{text(1, 5)}<|summary_end|>\n"
    ending = rng.random()
    if ending < 0.3:
        response += f"<|block_start|>{text(1, 8)}"
    elif ending < 0.7:
        response += f"</think>{text(1, 5)}"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return prompt_ids, response_ids


@contextlib.contextmanager
def running_tiny_server(**engine_options):
    """A tiny model served on 127.0.0.1 in a thread: yields (the running server, its async engine)."""
    from memento.engine import EngineConfig
    from memento.serve.server import build_app, start_in_thread
    from memento.tiny_tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    config = EngineConfig.from_options(**engine_options)
    app = build_app(tiny_model(tok, seed=3), config, tokenizer=tok, model_name="tiny")
    running = start_in_thread(app)
    try:
        yield running, app.state.memento.async_engine
    finally:
        running.stop()


FAMILY_WINDOW = 8
"""The sliding window of the tiny family models: far below the test sequences' length, so it binds."""

FAMILY_ARCHS = {
    "qwen3": {},
    "phi3": {"sliding_window": FAMILY_WINDOW},  # Phi-3 style: every layer slides (one mask tensor)
    "olmo3": {"sliding_window": FAMILY_WINDOW},  # Olmo 3: three sliding layers, then one full (a mask dict)
}
"""The paper's families as tiny random models (Phi-4 is ``Phi3ForCausalLM``); the sliding windows make
the masks of the windowed layers differ from the full ones on every test sequence."""


def family_model(tokenizer, arch: str, impl: str = "sdpa", seed: int = 0):
    """A tiny random model of one family: 4 layers (Olmo 3's pattern needs 4), 32 wide, untied."""
    return build_tiny_model(
        tokenizer,
        arch=arch,
        hidden_size=32,
        num_hidden_layers=4,
        intermediate_size=64,
        seed=seed,
        attn_implementation=impl,
        tie_word_embeddings=False,
        **FAMILY_ARCHS[arch],
    ).eval()


def family_checkpoint(family: str, path, *, memento_tokens: bool, window: int = FAMILY_WINDOW):
    """A family's tiny checkpoint saved to ``path``: its byte-level BPE tokenizer and chat template and
    a 4-layer, 64-wide model (head_dim 32: vLLM's CPU kernels need it), sliding ``window`` where the
    family slides. ``memento_tokens=False`` is a base checkpoint as a user has one (``memento train``
    adds them); True adds them as training would."""
    from memento.families import FAMILIES, build_family_tokenizer
    from memento.modeling import add_memento_tokens

    spec = FAMILIES[family]
    tokenizer = build_family_tokenizer(family)
    model = build_tiny_model(
        tokenizer,
        arch=spec.tiny_arch,
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=4,
        intermediate_size=128,
        tie_word_embeddings=False,
        **({"sliding_window": window} if spec.sliding_window else {}),
    )
    if memento_tokens:
        add_memento_tokens(tokenizer, model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
