# Two commands do all the set-up on a fresh machine:
#   make demo   runs the main job
#   make test   runs the whole test suite (lint, format, types, tests)
# Both create .venv when it is missing and install torch first (TORCH_SPEC), so that resolving
# qkv's own `torch` requirement never pulls a multi-GB CUDA build by accident.
# GPU users: make test TORCH_SPEC="torch==2.11.0 --index-url <your CUDA wheel index>"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.qkv-installed

.PHONY: demo test lint setup clean browser test-matrix

# The explorer tests drive Debian's chromium through Playwright (no browser download).
CHROMIUM ?= /usr/bin/chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# The main job: a small GPT trained for 3 minutes on Python's documentation (see README).
demo: $(STAMP)
	$(BIN)/qkv train --preset gpt-char

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks docs/figures examples
	$(BIN)/ruff format --check src tests benchmarks docs/figures examples
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

browser:
	test -x $(CHROMIUM) || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: lint browser
	$(BIN)/python -m pytest -n 2 --doctest-modules src/qkv tests

# The suite on the lowest and the highest (Python, torch) pair that pyproject.toml claims, each in
# a venv of its own under $(MATRIX_DIR) (see .ci/test-matrix.sh; CI does not run this). Variables:
#   MATRIX_PY_LOW, MATRIX_PY_HIGH        the interpreters, as commands or paths
#   MATRIX_TORCH_LOW, MATRIX_TORCH_HIGH  the exact torch releases to pair with them
#   MATRIX_TORCH_ARGS                    more pip arguments for torch, e.g. "--index-url <CPU index>";
#                                        without one, PyPI's CUDA builds (several GB per venv)
# e.g. make test-matrix MATRIX_PY_LOW=~/.pyenv/versions/3.10.13/bin/python
# A pip constraint file that caps torch below MATRIX_TORCH_HIGH must be lifted for the run:
#   PIP_CONSTRAINT=/dev/null make test-matrix
MATRIX_PY_LOW ?= python3.10
MATRIX_TORCH_LOW ?= 2.7.0
MATRIX_PY_HIGH ?= python3.13
MATRIX_TORCH_HIGH ?= 2.15.0
MATRIX_TORCH_ARGS ?=
MATRIX_DIR ?= .venv-matrix

test-matrix: browser
	QKV_CHROMIUM=$(CHROMIUM) MATRIX_DIR=$(MATRIX_DIR) MATRIX_TORCH_ARGS="$(MATRIX_TORCH_ARGS)" \
	bash .ci/test-matrix.sh $(MATRIX_PY_LOW) $(MATRIX_TORCH_LOW) $(MATRIX_PY_HIGH) $(MATRIX_TORCH_HIGH)

clean:
	rm -rf $(VENV) build site .pytest_cache .mypy_cache .ruff_cache
