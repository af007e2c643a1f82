# Two commands set everything up: `make test` and `make lab`.
# torch==2.13.0 is installed before the package: a bare `torch` requirement in a fresh virtual
# environment would otherwise pull the full CUDA build. The CPU kernels' float32 specialisations
# (what training uses) are compiled and cached on disk once during set-up, so that the lab's worker
# processes do not each compile them, and so are the compiled call path (a C++ extension) and the
# C entry points it calls (float32 and float64); float64's other specialisations compile on first
# use (`batchnorm compile --all`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: setup test test-all lab lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/batchnorm compile
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: setup
	$(BIN)/ruff check src tests

lab: setup
	$(BIN)/batchnorm lab

bench: setup
	$(BIN)/batchnorm bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
