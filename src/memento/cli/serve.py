"""``memento serve``: a model over the OpenAI API with in-place KV eviction, either on the embedded
engine (memento.serve.server under uvicorn) or handed over to vLLM's own server with the memento
backend (memento.vllm.serve replaces this process with it)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
import uvicorn
from rich.console import Console

from memento.cli.common import (
    DtypeOpt,
    KvBudgetOpt,
    MaxBlockTokensOpt,
    MaxNumSeqsOpt,
    ModelArg,
    fail,
    fields_in,
    mask_config,
    mask_options,
    require_exists,
    settings_from,
)
from memento.engine import EngineConfig
from memento.families import default_mask
from memento.serve.server import build_app
from memento.vllm.config import MementoSettings
from memento.vllm.serve import check_vllm_available, exec_vllm_serve, vllm_serve_argv

app = typer.Typer()


@app.command("serve")
@mask_options()
def serve_command(
    model: ModelArg,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    served_model_name: Annotated[
        str | None, typer.Option("--served-model-name", help="The name clients ask for (default: the directory).")
    ] = None,
    kv_budget_tokens: KvBudgetOpt = 32768,
    max_num_seqs: MaxNumSeqsOpt = 64,
    max_block_tokens: MaxBlockTokensOpt = None,
    max_pending_requests: Annotated[
        int, typer.Option("--max-pending-requests", min=1, help="Requests in flight before answering 429.")
    ] = 256,
    shutdown_timeout: Annotated[
        float, typer.Option("--shutdown-timeout", min=0, help="Seconds in-flight requests get to finish on shutdown.")
    ] = 30.0,
    dtype: DtypeOpt = "auto",
    torch_threads: Annotated[
        int,
        typer.Option(
            "--torch-threads",
            min=0,
            help="CPU threads for the model; 0: all cores but one (the HTTP side needs one: BENCHMARKS.md).",
        ),
    ] = 0,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="engine: the embedded engine (this server); vllm: vLLM's own OpenAI server with memento eviction.",
        ),
    ] = "engine",
    block_size: Annotated[
        int, typer.Option("--block-size", min=1, help="vLLM backend: tokens per KV page (CPU: a multiple of 32).")
    ] = 128,
    vllm_args: Annotated[
        list[str] | None,
        typer.Option("--vllm-arg", help="vLLM backend: one more `vllm serve` flag (--vllm-arg=--max-model-len=4096)."),
    ] = None,
    **mask_knobs: int | bool,
) -> None:
    """Serve a model over the OpenAI API (completions, chat, streaming) with in-place KV eviction.

    /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics (Prometheus). Chat
    answers carry the reasoning (blocks and mementos) in reasoning (and reasoning_content) and the
    answer in content; usage adds the request's peak KV and evicted tokens. With --backend vllm the
    same settings run inside `vllm serve` (memento.vllm; pip install 'memento[vllm]'), whose routes
    and metrics are vLLM's, with the same answer fields (--reasoning-parser memento and a middleware;
    --vllm-arg=--reasoning-parser=NAME picks another parser).
    """
    require_exists(model)
    if backend not in ("engine", "vllm"):
        fail(f"--backend must be engine or vllm, not {backend!r}")
    mask = mask_config(default_mask(model), mask_knobs)
    if backend == "vllm":
        _serve_with_vllm(model, locals(), extra=vllm_args or [])
        return
    try:
        config = settings_from(EngineConfig, locals())
        server_app = build_app(
            model,
            config,
            model_name=served_model_name,
            dtype=dtype,
            max_pending_requests=max_pending_requests,
            shutdown_timeout=shutdown_timeout,
        )
    except ValueError as exc:
        fail(str(exc), code=1)
    threads = torch_threads or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    Console(stderr=True).print(f"serving {model} on http://{host}:{port}/v1 ({mask.mode}, {threads} torch threads)")
    uvicorn.run(server_app, host=host, port=port, log_level="info", timeout_graceful_shutdown=int(shutdown_timeout))


def _serve_with_vllm(model: Path, options: Mapping[str, Any], extra: list[str]) -> None:
    """Replace this process with `vllm serve` running the memento backend (memento.vllm.serve), set by
    the command's ``options`` named like :class:`MementoSettings` fields or :func:`vllm_serve_argv`'s
    keywords, and ``extra`` flags."""
    try:
        settings = settings_from(MementoSettings, options)
        check_vllm_available()
    except (ValueError, RuntimeError) as exc:
        fail(str(exc), code=1)
    argv = vllm_serve_argv(model, settings, extra=extra, **fields_in(vllm_serve_argv, options))
    Console(stderr=True).print("exec: " + " ".join(argv))
    exec_vllm_serve(argv)
