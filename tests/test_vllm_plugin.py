"""The vLLM plugin's checks that need no vLLM (its tests with vLLM: tests/vllm_backend, `make test-vllm`)."""

from __future__ import annotations

import pytest

from memento.vllm.plugin import check_version


def test_another_vllm_version_is_refused_with_what_to_do() -> None:
    check_version("0.32.0")
    check_version("0.32.0+cpu")
    with pytest.raises(RuntimeError, match=r"written for vLLM 0\.32\.0.*pip install 'memento\[vllm\]'"):
        check_version("0.31.2")
