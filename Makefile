# sparsekern developer tasks. `make bench` is the main job; `make test` runs the test suite.
#
# venv/test/bench/lint use the project's own .venv (created on first use).
# bench-gpu is for the GPU machine (torch and triton preinstalled, no internet):
# it never creates a venv and never downloads anything.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sparsekern-installed
RESULTS := bench/results
# torch is pinned: 2.13.0 resolves to the CPU wheel on disk; an unpinned torch
# would pull the multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: venv test bench bench-gpu lint

venv: $(STAMP)

# The stamp makes the install idempotent: it reruns only when setup.py or
# pyproject.toml change (or the venv is deleted).
$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e '.[dev]' matplotlib
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) -m bench --suite linear --out $(RESULTS)
	$(PY) bench/plot.py "$$(ls -t $(RESULTS)/linear_*.csv | head -n 1)" $(RESULTS)

bench-gpu:
	python3 -m pip install --no-deps --no-build-isolation -e .
	python3 -m pytest -q -m gpu tests; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]
	python3 -m bench --suite linear --device cuda --tune --out $(RESULTS)
	out=$(RESULTS)/check_$$(date -u +%Y%m%d-%H%M%S).txt; \
	python3 -m sparsekern.check > $$out 2>&1; rc=$$?; cat $$out; echo "check output: $$out"; exit $$rc

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
