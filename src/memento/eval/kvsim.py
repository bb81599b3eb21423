"""KV memory at real model sizes, from the token counts of generated traces.

The engine counts live KV in tokens; what a deployment pays is bytes: 2 (keys and values) x layers
x KV heads x head_dim x bytes per element, per live token. A trace's live-KV curve depends on its
tokens and the mask, not on the model's size, so the curves a tiny model measures transfer to any
architecture by one multiplication. :func:`replay_live_kv` recomputes a curve from token ids alone
(the paper's "replay each output token by token"), which also gives the vanilla curve of a memento
trace: the KV the same tokens would hold if nothing were evicted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memento.format import SpecialTokenIds
from memento.masking import MaskConfig, compute_visibility

GB = 1e9
"""Bytes in a GB as reported here (decimal, as the paper's tables)."""

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1, "fp8": 1}


@dataclass(frozen=True)
class KVSpec:
    """One architecture's KV geometry."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_kv_heads", "head_dim", "dtype_bytes"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @classmethod
    def from_config(cls, config: Any, name: str | None = None, dtype: str | None = None) -> KVSpec:
        """From an HF config object, a config dict, or a model directory / config.json path."""
        if isinstance(config, str | Path):
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(config)
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
        heads = get("num_attention_heads")
        layers = get("num_hidden_layers")
        if heads is None or layers is None:
            raise ValueError("the config has no num_attention_heads / num_hidden_layers: not a decoder LM config")
        kv_heads = get("num_key_value_heads") or heads
        head_dim = get("head_dim") or get("hidden_size") // heads
        dtype_name = str(dtype or get("torch_dtype") or get("dtype") or "bfloat16").replace("torch.", "")
        if dtype_name not in _DTYPE_BYTES:
            raise ValueError(f"unknown KV dtype {dtype_name!r}; one of {', '.join(_DTYPE_BYTES)}")
        label = name or get("_name_or_path") or get("model_type") or "model"
        return cls(str(label), int(layers), int(kv_heads), int(head_dim), _DTYPE_BYTES[dtype_name])


PRESETS: dict[str, KVSpec] = {
    "qwen3-8b": KVSpec("Qwen3-8B", 36, 8, 128),  # 144 KiB per token in bf16
    "qwen3-32b": KVSpec("Qwen3-32B", 64, 8, 128),  # 256 KiB
    "phi-4-reasoning": KVSpec("Phi-4-reasoning", 40, 10, 128),  # 200 KiB
}
"""The paper's models (bf16), by the name ``memento eval --kv-model`` takes."""


def resolve_spec(name_or_path: str) -> KVSpec:
    """A preset by name (case-insensitive) or the config of a model directory."""
    preset = PRESETS.get(name_or_path.lower())
    if preset is not None:
        return preset
    if Path(name_or_path).exists():
        return KVSpec.from_config(name_or_path)
    raise ValueError(f"unknown KV model {name_or_path!r}: a preset ({', '.join(PRESETS)}) or a model directory")


def scale_curves(curves: Sequence[Sequence[int]], spec: KVSpec) -> dict[str, float]:
    """Mean per-request peak (GB) and AUC (GB x thousand tokens) of live-KV curves at ``spec``'s size."""
    if not curves:
        raise ValueError("no KV curves")
    per_token = spec.bytes_per_token
    peaks = [max(c, default=0) * per_token / GB for c in curves]
    aucs = [sum(c) * per_token / GB / 1000 for c in curves]
    return {
        "bytes_per_token": per_token,
        "mean_peak_gb": float(np.mean(peaks)),
        "mean_auc_gb_ktok": float(np.mean(aucs)),
    }


def replay_live_kv(
    token_ids: Sequence[int],
    prompt_len: int,
    specials: SpecialTokenIds,
    config: MaskConfig,
    assistant_prefix: Sequence[int] | None = None,
) -> list[int]:
    """Keys attended to at each decode step of a prompt + completion, as the engine counts them.

    Step ``i`` produces completion token ``i`` from the row that reads token ``prompt_len + i - 1``
    (in restart mode, the row :attr:`Visibility.output_rows` names). A completion whose structure
    breaks is replayed as the engine does in that case: evictions before the defect stand.
    """
    if not 1 <= prompt_len <= len(token_ids):
        raise ValueError(f"prompt_len must be in 1..{len(token_ids)}, got {prompt_len}")
    vis = compute_visibility(token_ids, specials, config, assistant_prefix, stop_tracking_on_error=True)
    live = vis.live_kv()
    rows = vis.output_rows[prompt_len - 1 : len(token_ids) - 1]
    return [int(n) for n in live[rows]]
