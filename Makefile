# Every target sets itself up on a fresh machine: it creates .venv and installs the project the
# first time (and again whenever pyproject.toml changes).
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
SYSPY   ?= python3

.PHONY: setup test test-all lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(SYSPY) -m venv $(VENV)
	# torch first, pinned, so pip takes the CPU wheel on disk rather than a multi-GB CUDA build.
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

lint: $(STAMP)
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m ruff format --check src tests benchmarks

test: $(STAMP) lint
	$(PYTHON) -m pytest -q

test-all: $(STAMP)
	$(PYTHON) -m pytest -q -m "slow or not slow"

demo: $(STAMP)
	$(VENV)/bin/memento demo --out runs/demo

bench: $(STAMP)
	$(PYTHON) benchmarks/mask_build.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
