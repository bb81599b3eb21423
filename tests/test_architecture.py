"""The import-linter contracts in pyproject.toml stay complete as the package grows."""

from __future__ import annotations

import pkgutil
import tomllib
from pathlib import Path

import memento

ROOT = Path(__file__).resolve().parents[1]
BELOW_MASKING = {"memento.arrays"}
"""Modules format and masking may import (dependencies, not consumers)."""


def contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["name"]: c for c in config["contracts"]}


def top_level_modules() -> set[str]:
    return {f"memento.{m.name}" for m in pkgutil.iter_modules(memento.__path__) if m.name != "__main__"}


def test_format_and_masking_contract_names_every_other_module():
    """A new package (say memento.rl) must be added to the list, or masking could import it unseen."""
    contract = contracts()["format and masking decide; they import none of their consumers"]
    protected = set(contract["source_modules"])
    assert protected == {"memento.format", "memento.masking"}
    missing = top_level_modules() - protected - BELOW_MASKING - set(contract["forbidden_modules"])
    assert not missing, f"add {sorted(missing)} to the contract's forbidden_modules in pyproject.toml"


def test_training_contract_covers_every_consumer_that_must_not_train():
    contract = contracts()[
        "serving, the vLLM backend, evaluation, analysis and the reference generator never import training"
    ]
    assert contract["forbidden_modules"] == ["memento.train"]
    consumers = {"memento.engine", "memento.serve", "memento.vllm", "memento.eval", "memento.analysis"}
    assert consumers <= set(contract["source_modules"])
