"""Starting the server: from a checkpoint directory (``memento serve``) or in a thread (tests, benchmarks)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memento.engine import EngineConfig, LLMEngine
from memento.serve.app import create_app
from memento.serve.async_engine import AsyncEngine


def build_app(
    model: str | Path | Any,
    config: EngineConfig,
    *,
    tokenizer: Any = None,
    model_name: str | None = None,
    dtype: str = "auto",
    max_pending_requests: int = 256,
    shutdown_timeout: float = 30.0,
):
    """The app over a checkpoint directory, or over a loaded model and tokenizer."""
    if isinstance(model, str | Path):
        engine = LLMEngine.from_pretrained(model, config, dtype=dtype)
        name = model_name or Path(model).name
    else:
        engine = LLMEngine(model, tokenizer, config)
        name = model_name or getattr(model, "name_or_path", None) or "model"
    return create_app(AsyncEngine(engine, max_pending_requests), name, shutdown_timeout)


@dataclass
class RunningServer:
    """A uvicorn server on a background thread (its own event loop)."""

    server: Any
    thread: threading.Thread
    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, shutdown_timeout: float = 10.0) -> RunningServer:
    """Serve ``app`` from a thread; port 0 takes a free port (read back once it listens)."""
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=int(shutdown_timeout)
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="memento-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(server, thread, host, bound)
