"""Models and tokenizers for MEMENTO: adding the special tokens, tiny models, attention checks.

:func:`add_memento_tokens` adds ``<|block_start|>``, ``<|block_end|>``, ``<|summary_start|>`` and
``<|summary_end|>`` (and ``<think>``/``</think>`` when missing) to any HF tokenizer as special tokens,
grows the model's embeddings to fit, and initialises each new token's embedding as the paper does:
the mean of the embeddings of related words (:data:`RELATED_WORDS`) plus N(0, 0.01) noise. A word
counts only if it is a single token of the vocabulary; with no usable word the mean of all
pre-existing rows is used instead. Everything it did is recorded in an :class:`EmbeddingInitReport`.

:func:`build_tiny_model` makes a small randomly initialised Qwen3/Llama/Qwen2 causal LM sized to a
tokenizer (nothing can be downloaded here), :func:`load_model_and_tokenizer` loads a saved
checkpoint directory, and :func:`check_attention_implementation` refuses attention backends that
cannot apply the memento 4D attention mask.

Notes on transformers 5.x that this module relies on:

* ``add_special_tokens({"additional_special_tokens": ...})`` is a deprecated spelling of
  ``extra_special_tokens``, and by default (``replace_extra_special_tokens=True``) it *replaces* the
  tokenizer's list of extra special tokens (the old ones stay in the vocabulary but stop being
  special, e.g. for ``skip_special_tokens``). We pass ``replace_extra_special_tokens=False`` to extend it.
* ``resize_token_embeddings`` re-ties tied embeddings (``tie_weights``) and updates
  ``config.vocab_size``; with ``mean_resizing=False`` the new rows are drawn from the model's own
  initialiser, which consumes the global torch RNG, so we fork it (our rows overwrite them anyway).
* The attention backend lives in ``config._attn_implementation`` (a property over
  ``_attn_implementation_internal``; set it with ``model.set_attn_implementation``). A 4D
  ``attention_mask`` is passed through unchanged to the attention function
  (``masking_utils._preprocess_mask_arguments``), for every layer type.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memento.format import (
    BLOCK_END,
    BLOCK_START,
    MEMENTO_TOKENS,
    SUMMARY_END,
    SUMMARY_START,
    THINK_TOKENS,
)
from memento.masking import MaskBatch, additive_mask, window_mask

RELATED_WORDS: dict[str, tuple[str, ...]] = {
    BLOCK_START: ("block", "start", "begin", "section", "step"),
    BLOCK_END: ("block", "end", "finish", "section", "done"),
    SUMMARY_START: ("summary", "summarize", "brief", "recap", "overview"),
    SUMMARY_END: ("summary", "end", "finish", "done", "complete"),
}
"""The words whose embeddings are averaged to initialise each memento token (paper, section 3)."""

DEFAULT_NOISE_STD = 0.01

ADDED = "added"
"""Status: the token was new to the tokenizer; its rows were initialised (when a model was given)."""
ALREADY_PRESENT = "already present"
"""Status: the token was in the tokenizer and the model had a row for it; nothing was touched."""
ROW_ADDED = "already present, model row added"
"""Status: the token was in the tokenizer but the model had no row for its id; the row was initialised."""

SUPPORTED_ATTENTION: dict[str, str] = {
    "sdpa": "bool mask (True = attend) or additive float mask, handed to F.scaled_dot_product_attention",
    "eager": "additive float mask only (0 = attend, -inf/min = masked): eager computes scores + mask",
}
"""The attention backends that apply our dense 4D mask, and the mask each one needs."""


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenInit:
    """What :func:`add_memento_tokens` did for one token."""

    token: str
    token_id: int
    status: str
    """:data:`ADDED`, :data:`ALREADY_PRESENT` or :data:`ROW_ADDED`."""
    words: tuple[str, ...] = ()
    """The related words that were averaged (each a single token)."""
    word_ids: tuple[int, ...] = ()
    """Their token ids, in the same order."""
    skipped_words: tuple[str, ...] = ()
    """Related words left out: not a single token of the vocabulary."""
    fallback: bool = False
    """True when no related word was usable and the mean of all pre-existing rows was used."""
    input_initialised: bool = False
    output_initialised: bool = False
    """True when an untied output embedding (lm_head) row was initialised too."""

    def describe(self) -> str:
        head = f"{self.token} (id {self.token_id}): {self.status}"
        if self.status == ALREADY_PRESENT:
            return head + ", left untouched"
        if self.fallback:
            why = "no word list" if self.token not in RELATED_WORDS else "no related word is a single token"
            source = f"mean of all pre-existing rows ({why})"
        else:
            source = "mean of " + ", ".join(repr(w) for w in self.words)
        parts = [head, source]
        if self.skipped_words:
            parts.append("skipped " + ", ".join(repr(w) for w in self.skipped_words))
        if not self.input_initialised:
            parts.append("no model given, embeddings not initialised")
        elif self.output_initialised:
            parts.append("input and output rows initialised")
        return "; ".join(parts)


@dataclass(frozen=True)
class EmbeddingInitReport:
    """The outcome of :func:`add_memento_tokens`."""

    tokens: tuple[TokenInit, ...]
    added_to_tokenizer: tuple[str, ...]
    """Tokens new to the tokenizer, in the order they were added."""
    rows_before: int | None = None
    """The model's embedding rows before (None without a model)."""
    rows_after: int | None = None
    tied: bool | None = None
    """Whether the model's input and output embeddings are one tensor (None without a model)."""
    fallback_rows: int = 0
    """How many pre-existing rows the fallback mean averaged (0 if the fallback was not needed)."""
    seed: int = 0
    noise_std: float = DEFAULT_NOISE_STD
    notes: tuple[str, ...] = field(default=())

    @property
    def num_added(self) -> int:
        return len(self.added_to_tokenizer)

    @property
    def resized(self) -> bool:
        return self.rows_before is not None and self.rows_after != self.rows_before

    @property
    def initialised(self) -> tuple[TokenInit, ...]:
        """The tokens whose embedding rows were written."""
        return tuple(t for t in self.tokens if t.input_initialised)

    def __getitem__(self, token: str) -> TokenInit:
        for entry in self.tokens:
            if entry.token == token:
                return entry
        raise KeyError(token)

    def __iter__(self) -> Iterator[TokenInit]:
        return iter(self.tokens)

    def summary(self) -> str:
        lines = [f"added {self.num_added} token(s) to the tokenizer"]
        if self.rows_before is not None:
            if self.resized:
                size = f"{self.rows_before} -> {self.rows_after} rows"
            else:
                size = f"{self.rows_after} rows, unchanged"
            lines.append(f"embeddings: {size}; {'tied' if self.tied else 'untied'} input/output embeddings")
        lines += [f"  {entry.describe()}" for entry in self.tokens]
        if any(t.fallback and t.input_initialised for t in self.tokens):
            lines.append(f"fallback = mean of {self.fallback_rows} pre-existing rows")
        if self.initialised:
            lines.append(f"noise: N(0, {self.noise_std}) from torch.Generator seeded with {self.seed}")
        lines += list(self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# ----------------------------------------------------------------------------------------------
# Adding the tokens
# ----------------------------------------------------------------------------------------------


def word_token_id(tokenizer: Any, word: str, *, exclude: Sequence[int] = ()) -> int | None:
    """The single token id of ``word`` in ``tokenizer``, or None if it needs several tokens.

    Tries the mid-sentence spelling ``" word"`` first, then ``"word"``; a spelling counts only if
    the tokenizer encodes it (without special tokens) as exactly one id that is neither the unknown
    token nor one of ``exclude`` (special tokens).
    """
    banned = set(exclude)
    if tokenizer.unk_token_id is not None:
        banned.add(tokenizer.unk_token_id)
    for spelling in (" " + word, word):
        ids = tokenizer.encode(spelling, add_special_tokens=False)
        if len(ids) == 1 and int(ids[0]) not in banned:
            return int(ids[0])
    return None


def _embedding_pair(model: Any) -> tuple[torch.nn.Module, torch.nn.Module | None, bool]:
    inp = model.get_input_embeddings()
    out = model.get_output_embeddings()
    if inp is None:
        raise ValueError(f"{type(model).__name__} has no input embeddings")
    tied = out is not None and out.weight is inp.weight
    if out is not None and not tied and out.weight.shape[1] != inp.weight.shape[1]:
        raise ValueError("the output embeddings do not have the input embeddings' width; cannot initialise them")
    return inp, out, tied


def add_memento_tokens(
    tokenizer: Any,
    model: Any = None,
    *,
    seed: int = 0,
    noise_std: float = DEFAULT_NOISE_STD,
    add_think_tokens: bool = True,
) -> EmbeddingInitReport:
    """Add the memento tokens (and ``<think>``/``</think>``) to ``tokenizer`` and initialise their rows.

    Tokens already in the tokenizer are left alone, and existing extra special tokens are kept.
    With a ``model`` its embeddings grow to fit the tokenizer (never shrink: a model with spare
    padding rows, as Qwen's have, keeps its size) and every newly added token's input row, and
    output (lm_head) row when untied, is set to the mean of its related words' rows plus
    N(0, ``noise_std``) noise. Tied embeddings stay tied. The noise comes from one
    ``torch.Generator`` seeded with ``seed``: for each initialised token in order (the memento
    tokens, then the think tokens), one draw of ``hidden_size`` values for the input row, then one
    for the output row if untied.

    A token already in the tokenizer whose id the model has no row for (the tokenizer was extended
    without the model) is initialised the same way. Calling this twice changes nothing the second time.
    """
    wanted = list(MEMENTO_TOKENS)
    vocab = tokenizer.get_vocab()
    if add_think_tokens:
        wanted += list(THINK_TOKENS)
    else:
        wanted += [tok for tok in THINK_TOKENS if tok in vocab]  # report them, never add them
    old_ids = sorted(set(vocab.values()))
    special_ids = {int(i) for i in tokenizer.all_special_ids if i is not None}

    # Related words are looked up before adding, in the vocabulary as it was.
    lookups: dict[str, tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]] = {}
    for tok in wanted:
        used, ids, skipped = [], [], []
        for word in RELATED_WORDS.get(tok, ()):
            tid = word_token_id(tokenizer, word, exclude=tuple(special_ids))
            if tid is None:
                skipped.append(word)
            else:
                used.append(word)
                ids.append(tid)
        lookups[tok] = (tuple(used), tuple(ids), tuple(skipped))

    to_add = [tok for tok in wanted if tok not in vocab]
    if to_add:
        tokenizer.add_special_tokens({"extra_special_tokens": to_add}, replace_extra_special_tokens=False)
    token_ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in wanted}
    for tok in to_add:
        encoded = tokenizer.encode(tok, add_special_tokens=False)
        if list(encoded) != [token_ids[tok]]:
            raise RuntimeError(f"{tok} was added but encodes as {encoded}, not as its single id {token_ids[tok]}")

    rows_before = rows_after = None
    tied: bool | None = None
    needs_rows: set[str] = set(to_add)
    fallback_rows = 0
    notes: list[str] = []
    if model is not None:
        inp, out, tied = _embedding_pair(model)
        rows_before = int(inp.weight.shape[0])
        needs_rows |= {tok for tok in wanted if token_ids[tok] >= rows_before}
        needed = max(len(tokenizer), max(token_ids.values()) + 1)
        if needed > rows_before:
            with torch.random.fork_rng(devices=[]):
                model.resize_token_embeddings(needed, mean_resizing=False)
            inp, out, tied_after = _embedding_pair(model)
            if tied and not tied_after:
                raise RuntimeError("resize_token_embeddings untied the input and output embeddings")
        elif needed < rows_before:
            spare = rows_before - needed
            notes.append(f"the model keeps its {rows_before} rows ({spare} more than the tokenizer needs)")
        rows_after = int(inp.weight.shape[0])
        base_ids = [i for i in old_ids if i < rows_before]
        fallback_rows = _initialise_rows(
            wanted=[tok for tok in wanted if tok in needs_rows],
            token_ids=token_ids,
            lookups=lookups,
            base_ids=base_ids,
            inp=inp,
            out=None if tied else out,
            seed=seed,
            noise_std=noise_std,
        )

    entries = []
    for tok in wanted:
        used, ids, skipped = lookups[tok]
        if tok in to_add:
            status = ADDED
        elif tok in needs_rows:
            status = ROW_ADDED
        else:
            status = ALREADY_PRESENT
        initialised = model is not None and tok in needs_rows
        entries.append(
            TokenInit(
                token=tok,
                token_id=int(token_ids[tok]),
                status=status,
                words=used if status != ALREADY_PRESENT else (),
                word_ids=ids if status != ALREADY_PRESENT else (),
                skipped_words=skipped if status != ALREADY_PRESENT else (),
                fallback=status != ALREADY_PRESENT and not ids,
                input_initialised=initialised,
                output_initialised=initialised and tied is False and model.get_output_embeddings() is not None,
            )
        )
    return EmbeddingInitReport(
        tokens=tuple(entries),
        added_to_tokenizer=tuple(to_add),
        rows_before=rows_before,
        rows_after=rows_after,
        tied=tied,
        fallback_rows=fallback_rows,
        seed=seed,
        noise_std=noise_std,
        notes=tuple(notes),
    )


@torch.no_grad()
def _initialise_rows(
    *,
    wanted: list[str],
    token_ids: dict[str, int],
    lookups: dict[str, tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]],
    base_ids: list[int],
    inp: torch.nn.Module,
    out: torch.nn.Module | None,
    seed: int,
    noise_std: float,
) -> int:
    """Write the new rows; returns how many rows the fallback mean averaged (0 if unused)."""
    if not wanted:
        return 0
    generator = torch.Generator().manual_seed(seed)
    fallback_used = False
    weights = [inp.weight] + ([out.weight] if out is not None else [])
    means: dict[int, torch.Tensor] = {}  # fallback mean per weight matrix, computed once
    for tok in wanted:
        _, ids, _ = lookups[tok]
        for k, weight in enumerate(weights):
            if ids:
                mean = weight[list(ids)].float().mean(dim=0)
            else:
                if not base_ids:
                    raise ValueError("no related word and no pre-existing embedding rows to fall back on")
                if k not in means:
                    means[k] = weight[base_ids].float().mean(dim=0)
                mean = means[k]
                fallback_used = True
            noise = torch.randn(weight.shape[1], generator=generator, dtype=torch.float32) * noise_std
            weight[token_ids[tok]] = (mean.cpu() + noise).to(device=weight.device, dtype=weight.dtype)
        bias = getattr(out, "bias", None) if out is not None else None
        if bias is not None:
            source = list(ids) if ids else base_ids
            bias[token_ids[tok]] = bias[source].float().mean().to(bias.dtype)
    return len(base_ids) if fallback_used else 0


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def _architectures() -> dict[str, tuple[type, type]]:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Olmo3Config,
        Olmo3ForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    return {
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "phi3": (Phi3Config, Phi3ForCausalLM),
        "olmo3": (Olmo3Config, Olmo3ForCausalLM),
    }


ARCHITECTURES: tuple[str, ...] = ("qwen3", "llama", "qwen2", "phi3", "olmo3")
"""``build_tiny_model``'s ``arch`` values: the paper's families are Qwen3, Phi-4 (``phi3``, its HF
architecture: fused qkv and gate_up projections) and Olmo 3 (``olmo3``: sliding-window layers)."""


def build_tiny_model(
    tokenizer: Any,
    *,
    arch: str = "qwen3",
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 4096,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    tie_word_embeddings: bool = True,
    dtype: torch.dtype = torch.float32,
    sliding_window: int | None = None,
    layer_types: Sequence[str] | None = None,
) -> Any:
    """A freshly initialised HF causal LM sized to ``tokenizer``; the same seed gives the same weights.

    ``arch`` is one of :data:`ARCHITECTURES`. ``sliding_window`` sets the window of the sliding
    layers: for ``olmo3`` its default pattern (three sliding layers, then one full; the config's
    4,096 when None) unless ``layer_types`` is given; for the others every layer (``layer_types``
    may then pick which ones, for the architectures that have them). The tokenizer's pad, eos
    and bos ids go into the config and the generation config. Weights are drawn in float32 under
    ``torch.manual_seed(seed)`` (the caller's global RNG state is restored afterwards), then cast to
    ``dtype``. The model is returned in eval mode, as ``from_pretrained`` returns one.
    """
    archs = _architectures()
    if arch not in archs:
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(repr(a) for a in archs)}")
    if hidden_size % num_attention_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}")
    if num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
        )
    config_cls, model_cls = archs[arch]
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    window_options: dict[str, Any] = {}
    if sliding_window is not None:
        window_options["sliding_window"] = int(sliding_window)
        if arch in ("qwen2", "qwen3"):
            window_options["use_sliding_window"] = True
            window_options["max_window_layers"] = 0  # every layer slides unless layer_types says otherwise
    if layer_types is not None:
        window_options["layer_types"] = list(layer_types)
    config = config_cls(
        vocab_size=max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1),  # a row for every id
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        attn_implementation=attn_implementation,
        **window_options,
        **special,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    for name, value in special.items():
        setattr(model.generation_config, name, value)
    model = model.to(dtype)
    model.eval()
    return model


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    """The number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def format_parameter_count(n: int) -> str:
    """``1234567`` -> ``'1.23M'``."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def load_model_and_tokenizer(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """Load a saved HF checkpoint directory (model and tokenizer), from local files only.

    ``dtype=None`` lets transformers choose (5.x: ``"auto"``, the dtype saved in the config).
    Raises ``FileNotFoundError`` for a missing directory and ``ValueError`` when the tokenizer has
    ids the model has no embedding row for.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation, "local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    rows = model.get_input_embeddings().weight.shape[0]
    needed = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    if needed > rows:
        raise ValueError(
            f"the tokenizer at {path} has {needed} ids but the model has only {rows} embedding rows: "
            "the tokenizer was extended without the model (use add_memento_tokens(tokenizer, model))"
        )
    return model, tokenizer


# ----------------------------------------------------------------------------------------------
# Attention backends
# ----------------------------------------------------------------------------------------------

_FIX = (
    "Fix: load the model with attn_implementation='sdpa' (or 'eager'), or call model.set_attn_implementation('sdpa')."
)


def check_attention_implementation(model: Any) -> str:
    """The model's attention backend, if it applies our dense 4D mask: ``"sdpa"`` or ``"eager"``.

    transformers hands a 4D ``attention_mask`` unchanged to the attention function. SDPA takes it as
    a bool mask (True = attend) or an additive float mask; eager computes ``scores + mask``, so it
    needs the additive float mask (a bool mask would be added as 0/1 and mask nothing). Anything
    else raises ``ValueError`` naming the problem and the fix. (A 4D mask replaces a sliding layer's
    window too: :func:`layer_masks` builds one mask per layer type.)
    """
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    impl = getattr(text_config, "_attn_implementation", None)
    if impl is None:
        impl = getattr(config, "_attn_implementation", None)
    if impl in SUPPORTED_ATTENTION:
        return impl
    if impl is None:
        problem = "the model's attention implementation is not set (config._attn_implementation is None)"
    elif isinstance(impl, str) and impl.startswith("paged"):
        problem = (
            f"attn_implementation={impl!r} is paged attention for continuous batching, "
            "which builds its own masks and cannot apply the memento 4D attention mask"
        )
    elif isinstance(impl, str) and "flash" in impl:
        problem = (
            f"attn_implementation={impl!r} cannot apply the memento mask: flash attention kernels take only "
            "causal/padding/sliding-window masks, never an arbitrary 4D attention mask"
        )
    elif impl == "flex_attention":
        problem = (
            "attn_implementation='flex_attention' does not apply our dense 4D mask correctly: transformers "
            "adds a dense tensor to the scores in a score_mod (a bool mask would be added as 0/1 and mask "
            "nothing, and there is no block sparsity); for flex, build a BlockMask with "
            "memento.masking.make_block_mask and call the kernel directly"
        )
    else:
        problem = f"attn_implementation={impl!r} is not one we support for the memento 4D attention mask"
    raise ValueError(f"{problem}. Supported: {', '.join(SUPPORTED_ATTENTION)}. {_FIX}")


FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


def layer_windows(model_or_config: Any) -> dict[str, int | None]:
    """Each attention layer type of a model and its sliding window (None: full attention).

    Read from the HF config: ``layer_types`` where the config has it (Olmo 3: three
    ``sliding_attention`` layers to one ``full_attention``; Qwen2/Qwen3 when ``use_sliding_window``),
    else one window for every layer (``sliding_window``, e.g. Mistral, Phi-3 with a window).
    Layer types the memento rule has no definition for (chunked, linear, ...) are refused.
    """
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        uses = getattr(config, "use_sliding_window", True)
        return {SLIDING_ATTENTION: int(window)} if window and uses else {FULL_ATTENTION: None}
    out: dict[str, int | None] = {}
    for kind in layer_types:
        if kind == FULL_ATTENTION:
            out[kind] = None
        elif kind == SLIDING_ATTENTION:
            if not window:
                raise ValueError("the config has sliding_attention layers but no sliding_window")
            out[kind] = int(window)
        else:
            raise ValueError(
                f"layer type {kind!r} is not supported: the memento rule is defined for full_attention and "
                "sliding_attention layers only"
            )
    return out


def layer_masks(
    mask: torch.Tensor,
    windows: dict[str, int | None] | None,
    impl: str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The attention mask(s) a model's forward takes, from the boolean memento mask (..., Q, K).

    Each layer type gets :func:`memento.masking.window_mask` with its window, in the form ``impl``
    needs (:data:`SUPPORTED_ATTENTION`). One tensor when every layer has the same window (every
    transformers model takes that); a dict keyed by layer type when they differ (the models with
    ``layer_types`` take it, and it replaces the masks they would build: transformers would
    otherwise pass one 4D mask to every layer and the sliding layers would lose their window).
    """
    windows = windows or {FULL_ATTENTION: None}
    forms: dict[int | None, torch.Tensor] = {}
    for window in windows.values():
        if window not in forms:
            windowed = window_mask(mask, window)
            forms[window] = windowed if impl == "sdpa" else additive_mask(windowed, dtype)
    if len(forms) == 1:
        return next(iter(forms.values()))
    return {kind: forms[window] for kind, window in windows.items()}


def attention_inputs(
    batch: MaskBatch,
    impl: str,
    dtype: torch.dtype = torch.float32,
    windows: dict[str, int | None] | None = None,
) -> dict[str, Any]:
    """``input_ids``, ``attention_mask`` (4D, in the form ``impl`` needs, one per layer type when
    ``windows`` differ: :func:`layer_masks`) and logical ``position_ids`` of a batch from
    :mod:`memento.masking`."""
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(f"unsupported attention implementation {impl!r}; supported: {', '.join(SUPPORTED_ATTENTION)}")
    mask = layer_masks(batch.dense(), windows, impl, dtype)
    return {"input_ids": batch.input_ids, "attention_mask": mask, "position_ids": batch.position_ids}


def to_device(inputs: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Model inputs moved to ``device`` (a per-layer-type mask dict included)."""
    return {
        key: {k: v.to(device) for k, v in value.items()} if isinstance(value, dict) else value.to(device)
        for key, value in inputs.items()
    }


def model_inputs(model: Any, batch: MaskBatch) -> dict[str, Any]:
    """:func:`attention_inputs` for ``model``: its attention backend, dtype, layer windows and device."""
    impl = check_attention_implementation(model)
    param = next(model.parameters())
    return to_device(attention_inputs(batch, impl, param.dtype, layer_windows(model)), param.device)
