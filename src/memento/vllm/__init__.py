"""memento as a vLLM plugin (issue 9, in progress): pinned to vLLM 0.32 (``pip install memento[vllm]``,
or ``make vllm-setup`` for the CPU build). Nothing here is imported unless vLLM is installed.

- :mod:`~memento.vllm.plugin`: the ``vllm.general_plugins`` entry point (version check, CPU set-up);
- :mod:`~memento.vllm.logits`: the block-length cap as a vLLM v1 logits processor.
"""

SUPPORTED_VLLM = "0.32.0"
