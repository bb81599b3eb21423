"""Inference with physical KV eviction: a small continuous-batching engine over HF models.

The split follows nano-vllm: :mod:`~memento.engine.sequence` (one request's tokens, rows and
slots), :mod:`~memento.engine.kv_pool` (the token-slot KV pool), :mod:`~memento.engine.scheduler`
(continuous batching, admission, preemption), :mod:`~memento.engine.model_runner` (one batched
forward of the HF model over the pool), :mod:`~memento.engine.sampling` and
:mod:`~memento.engine.engine` (the loop, accounting and the ``LLM`` API).
"""

from memento.engine.engine import LLM, CompletionOutput, EngineConfig, EngineStats, LLMEngine, RequestOutput
from memento.engine.kv_pool import KVGeometry, KVPool
from memento.engine.sampling import SampledToken, SamplingParams
from memento.engine.sequence import KVStats

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "EngineStats",
    "KVGeometry",
    "KVPool",
    "KVStats",
    "LLMEngine",
    "RequestOutput",
    "SampledToken",
    "SamplingParams",
]
