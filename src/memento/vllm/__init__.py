"""memento as a vLLM plugin, pinned to vLLM 0.32 (``pip install 'memento[vllm]'``, or ``make vllm-setup``
for the CPU build). Importing this package does not import vLLM; the modules that subclass vLLM's
classes (scheduler, worker, logits) are loaded by vLLM itself from the class names it is given.

- :mod:`~memento.vllm.config`: the settings and the arguments that switch the backend on
  (:func:`engine_args` for ``vllm.LLM``, :func:`serve_args` for ``vllm serve``);
- :mod:`~memento.vllm.eviction`: per-request eviction bookkeeping (pure Python, from masking.py);
- :mod:`~memento.vllm.scheduler`: the scheduler subclass (decides, frees pages, cuts chunks);
- :mod:`~memento.vllm.kv_layout` and :mod:`~memento.vllm.worker`: token moves inside KV pages, the
  CPU worker and model runner subclasses (physical slots, logical positions);
- :mod:`~memento.vllm.logits`: the block-length cap as a logits processor;
- :mod:`~memento.vllm.plugin`: the ``vllm.general_plugins`` entry point (version check, CPU set-up,
  the ``memento`` reasoning parser's name);
- :mod:`~memento.vllm.reasoning`: that reasoning parser (the embedded server's split of ``<think>``);
- :mod:`~memento.vllm.fields`: the server middleware that adds the embedded server's answer fields
  (``reasoning_content``, the KV in ``usage``);
- :mod:`~memento.vllm.serve`: ``memento serve --backend vllm``.
"""

SUPPORTED_VLLM = "0.32.0"

from memento.vllm.config import MementoSettings, engine_args, serve_args  # noqa: E402

__all__ = ["SUPPORTED_VLLM", "MementoSettings", "engine_args", "serve_args"]
