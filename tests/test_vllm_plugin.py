"""The vLLM plugin's checks that need no vLLM (its tests with vLLM: tests/vllm_backend, `make test-vllm`)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from memento.masking import MaskConfig
from memento.vllm.config import SCHEDULER_CLS, WORKER_CLS, MementoSettings, engine_args
from memento.vllm.plugin import check_version
from memento.vllm.serve import vllm_serve_argv


def test_another_vllm_version_is_refused_with_what_to_do() -> None:
    check_version("0.32.0")
    check_version("0.32.0+cpu")
    with pytest.raises(RuntimeError, match=r"written for vLLM 0\.32\.0.*pip install 'memento\[vllm\]'"):
        check_version("0.31.2")


def test_settings_round_trip_through_additional_config() -> None:
    settings = MementoSettings(
        mask=MaskConfig.chat(keep_last_n=1, mask_delimiters=True), max_block_tokens=64, assistant_prefix=(3, 4)
    )
    raw = json.loads(json.dumps({"memento": settings.to_dict()}))  # as it travels on the command line
    assert MementoSettings.from_dict(raw["memento"]) == settings
    assert MementoSettings().to_dict() == {}  # defaults are the embedded engine's
    assert MementoSettings().strict and not MementoSettings(mask=MaskConfig.chat(keep_last_n=-1)).strict
    with pytest.raises(ValueError, match="max_block_tokens must be a positive integer"):
        MementoSettings(max_block_tokens=0)
    with pytest.raises(ValueError, match="keep_last_n must be -1"):
        MementoSettings.from_dict({"keep_last_n": -2})


def test_engine_args_switch_the_backend_on_and_keep_the_rest() -> None:
    args = engine_args(
        MementoSettings(mask=MaskConfig.chat(keep_last_n=0)), model="m", additional_config={"other": 1}, dtype="float32"
    )
    assert args["scheduler_cls"] == SCHEDULER_CLS and args["worker_cls"] == WORKER_CLS
    assert args["enable_prefix_caching"] is False and args["async_scheduling"] is False
    assert args["additional_config"] == {"other": 1, "memento": {}}
    assert args["model"] == "m" and args["dtype"] == "float32"


def test_the_vllm_server_command_line(tmp_path) -> None:
    from transformers import Qwen3Config

    Qwen3Config(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, dtype="float32"
    ).save_pretrained(tmp_path)
    argv = vllm_serve_argv(
        str(tmp_path),
        MementoSettings(mask=MaskConfig.chat(keep_last_n=1)),
        port=9000,
        kv_budget_tokens=1000,
        block_size=32,
        extra=["--max-model-len", "4096"],
    )
    assert argv[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp_path)]
    joined = " ".join(argv)
    assert "--num-gpu-blocks-override 33" in joined  # ceil(1000 / 32) pages + vLLM's null page
    # vLLM's reservation is the KV budget's bytes (2 x layers x kv heads x head dim x 4 bytes per token),
    # not 92% of the machine's memory
    assert f"--kv-cache-memory-bytes {33 * 32 * 2 * 3 * 2 * 16 * 4}" in joined
    given = vllm_serve_argv(str(tmp_path), MementoSettings(), kv_budget_tokens=64, extra=["--kv-cache-memory-bytes=9"])
    assert given.count("--kv-cache-memory-bytes=9") == 1 and "--kv-cache-memory-bytes" not in given
    assert f"--scheduler-cls {SCHEDULER_CLS}" in joined and f"--worker-cls {WORKER_CLS}" in joined
    assert "--no-enable-prefix-caching" in argv and "--no-async-scheduling" in argv
    config = json.loads(argv[argv.index("--additional-config") + 1])
    assert config == {"memento": {"keep_last_n": 1}}
    assert argv[-2:] == ["--max-model-len", "4096"]
    # the embedded server's answer fields: its reasoning split, reasoning_content, the KV in usage
    assert "--reasoning-parser memento" in joined and "--middleware memento.vllm.fields.MementoFields" in joined
    for flag in (["--reasoning-parser=qwen3"], ["--reasoning-parser", "qwen3"], ["--reasoning-parser="]):
        other = vllm_serve_argv(str(tmp_path), MementoSettings(), extra=flag)
        assert "memento" not in other and other[-len(flag) :] == flag  # the user's parser, or none


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_serve_with_the_vllm_backend_says_how_to_get_vllm(tmp_path) -> None:
    from typer.testing import CliRunner

    from memento.cli import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path), "--backend", "vllm"])
    assert result.exit_code == 1
    assert "pip install 'memento[vllm]'" in result.output
