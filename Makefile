# make run   — set up (.venv, project, offline models) and run the pipeline on the embedded demo
# make eval  — after make run: MoDS vs same-size baselines on the paper's test sets
# make test  — set up and run the test suite (what .ci/run calls)
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip takes this torch from the CPU file on disk here; on a GPU machine PyPI's build has CUDA.
TORCH ?= torch==2.13.0
# pip's local indexes here print one warning per package; keep the log readable.
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export TOKENIZERS_PARALLELISM := false

.PHONY: setup models run eval test test-fast bench clean-work

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the project's dependencies change.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)" $(QUIET_PIP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]" $(QUIET_PIP)
	touch $@

setup: $(VENV)/.installed

models: setup
	$(BIN)/mods prepare-models

run: models
	$(BIN)/mods run $(ARGS)

# Does the selection help? Evaluates the last `make run` (same workspace) against baselines.
eval: models
	$(BIN)/mods evaluate $(ARGS)

# Test processes: two overlap the tests that wait (servers, heartbeats, workers) with the rest.
TEST_WORKERS ?= 2

test: models
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Unit tests only (no real models, no Prefect server).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not e2e and not flow and not realserver" $(PYTEST_ARGS)

bench: models
	$(BIN)/python benchmarks/kcenter.py
	$(BIN)/python benchmarks/quality_scorer.py
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/incremental.py --rows 192 --rows-per-shard 16
	$(BIN)/python benchmarks/train_generate.py
	$(BIN)/python benchmarks/early_cutoff.py

clean-work:
	rm -rf work
