# The targets people type. `make quickstart` and `make test` set everything up themselves
# (idempotent: a second run only checks the stamp and the model cache).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rayft-installed
# pytest arguments, e.g. make test ARGS="-k data -x"
ARGS ?=

.PHONY: setup models quickstart test lint format bench clean

setup: $(STAMP)

# Order matters: the CPU torch wheel first (a bare `torch` requirement would pull CUDA builds),
# then deepspeed without build isolation (its setup imports torch), then rayft itself.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --no-build-isolation "deepspeed>=0.19,<0.20"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

models: setup
	$(BIN)/rayft models pull smollm2-135m-instruct tiny-llama

quickstart: models
	$(BIN)/rayft quickstart

test: models
	$(BIN)/python -m pytest $(ARGS)

lint: setup
	$(BIN)/ruff check rayft tests benchmarks
	$(BIN)/ruff format --check rayft tests benchmarks

format: setup
	$(BIN)/ruff format rayft tests benchmarks
	$(BIN)/ruff check --fix rayft tests benchmarks

bench: models
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
