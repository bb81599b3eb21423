"""`memento train --model DIR` and `memento serve DIR` on a saved tiny checkpoint of each family,
with no extra flags: the memento tokens are added to the family's byte-level BPE tokenizer, stage 2
trains under the family's default mask (Phi-4: delimiters masked) and the server answers with it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from helpers import family_checkpoint, records
from memento.cli import app
from memento.families import FAMILIES, build_family_tokenizer, default_mask, family_of
from memento.format import SpecialTokenIds
from memento.modeling import add_memento_tokens, build_tiny_model, load_model_and_tokenizer
from memento.records_io import write_records

MEMENTO = Path(sys.executable).parent / "memento"
runner = CliRunner()


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained(request, tmp_path_factory):
    """(family, stage-2 model directory) after `memento train --model DIR` with no mask flags."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    base = family_checkpoint(family, root / "base", memento_tokens=False)
    data = root / "train.jsonl"
    write_records(data, records(6, blocks=3))
    files = ["--model", str(base), "--train", str(data), "--eval", str(data), "--output", str(root / "run")]
    result = runner.invoke(app, ["train", *files, "--max-steps", "2", "--batch-size", "2", "--eval-steps", "2"])
    assert result.exit_code == 0, result.output
    return family, root / "run" / "stage2" / "best"


def test_family_tokenizers_take_the_memento_tokens():
    """Byte-level BPE in each family's shape: the related words are single tokens (no fallback), each
    memento token one id, and the assistant prefix found from the chat template."""
    from memento.chat import assistant_prefix_ids

    for family, spec in FAMILIES.items():
        tokenizer = build_family_tokenizer(family)
        model = build_tiny_model(tokenizer, arch=spec.tiny_arch, hidden_size=32, num_hidden_layers=4)
        report = add_memento_tokens(tokenizer, model)
        for entry in report.tokens[:4]:
            assert entry.status == "added" and entry.input_initialised and not entry.fallback, entry.describe()
        specials = SpecialTokenIds.from_tokenizer(tokenizer)
        text = "<think>\n<|block_start|>add 2 and 3<|block_end|><|summary_start|>sum 5<|summary_end|>\n</think>5"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids.count(specials.block_start) == ids.count(specials.summary_end) == 1
        assert tokenizer.decode(ids) == text
        prefix = tokenizer.decode(assistant_prefix_ids(tokenizer))
        assert prefix == spec.assistant_prefix


def test_train_uses_the_family_default_mask(trained):
    family, best = trained
    summary = json.loads((best / "memento_training.json").read_text())
    assert summary["stage"] == 2
    assert summary["mask_config"]["mask_delimiters"] is (family == "phi4")
    model, tokenizer = load_model_and_tokenizer(best)
    assert family_of(model) is FAMILIES[family] and family_of(best) is FAMILIES[family]
    SpecialTokenIds.from_tokenizer(tokenizer)  # the memento tokens were added and saved
    assert default_mask(best).mask_delimiters is (family == "phi4")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_answers_with_the_family_mask(trained, tmp_path):
    family, best = trained
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        server = subprocess.Popen(
            [str(MEMENTO), "serve", str(best), "--port", str(port), "--torch-threads", "1"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ},
        )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "best", "messages": [{"role": "user", "content": "1 + 2"}], "max_tokens": 24},
            timeout=120,
        )
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length", "format_error")
    mode = "memento+delimiters" if family == "phi4" else "memento"
    assert f"({mode}," in log.read_text()
