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

.PHONY: venv test bench bench-gpu lint check

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

# The default CPU run, < 3 min on an idle 2-core machine (2 min 30 s and 2 min 50 s measured): the
# linear suite (about 110 s: dense is timed again beside every case) and the e2e suite's training
# steps (about 40 s), then the plots.
bench: venv
	$(PY) -m sparsekern.bench --suite linear,e2e --out $(RESULTS)
	$(PY) -m sparsekern.bench.plot "$$(ls -t $(RESULTS)/linear_*.csv | head -n 1)" $(RESULTS)
	$(PY) -m sparsekern.bench.plot "$$(ls -t $(RESULTS)/e2e_*.csv | head -n 1)" $(RESULTS)

# One call on the GPU machine (< 8 min on one H100), everything under bench/results/<gpu>-<date>/:
# the GPU tests' log, the GPU suites with --tune (linear, conv when sparsekern/bench/conv.py exists, e2e),
# each with its roofline table, the static check (sparsekern.check, default scope), the plots and one
# ncu capture (--clock-control none) of the headline forward kernel (sparsekern/bench/ncu_forward.py).
# Tuned configs are merged into kernels/tuned/<device>.json, which the kernels load.
GPU_SUITES = $(if $(wildcard sparsekern/bench/conv.py),linear$(comma)conv$(comma)e2e,linear$(comma)e2e)
comma := ,

bench-gpu:
	python3 -m pip install --no-index --no-deps --no-build-isolation -e .
	run=$(RESULTS)/$$(python3 -c "import torch; from sparsekern.bench.common import slug; print(slug(torch.cuda.get_device_name()))")-$$(date -u +%Y%m%d-%H%M%S); \
	mkdir -p $$run; echo "results: $$run"; \
	python3 -m pytest -q -m gpu tests > $$run/gpu_tests.txt 2>&1; rc=$$?; tail -n 30 $$run/gpu_tests.txt; \
	[ $$rc -eq 0 ] || [ $$rc -eq 5 ] || echo "GPU tests FAILED (exit $$rc): see $$run/gpu_tests.txt"; \
	python3 -m sparsekern.bench --suite $(GPU_SUITES) --device cuda --tune --out $$run; brc=$$?; \
	for s in linear e2e; do python3 -m sparsekern.bench.plot "$$(ls -t $$run/$${s}_*.csv | head -n 1)" $$run || true; done; \
	if command -v ncu >/dev/null 2>&1; then \
	  ncu --clock-control none -k regex:_bsmm_fwd_kernel -c 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
	    --section Occupancy python3 -m sparsekern.bench.ncu_forward > $$run/ncu_forward.txt 2>&1 || echo "ncu capture failed: $$run/ncu_forward.txt"; \
	else echo "no ncu on this machine: no counter capture"; fi; \
	cp kernels/tuned/*.json $$run/ 2>/dev/null || true; \
	[ $$rc -eq 0 ] || [ $$rc -eq 5 ] && [ $$brc -eq 0 ]

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The offline kernel proof (no GPU): every kernel against its dense twin, compiled for sm_90/sm_80,
# under the newest Triton (.venv) and under 3.6, the GPU machine's (.venv36, made on first use).
VENV36 := .venv36
$(VENV36)/.sparsekern-installed: setup.py pyproject.toml
	test -x $(VENV36)/bin/python || $(PYTHON) -m venv $(VENV36)
	$(VENV36)/bin/pip install $(TORCH) triton==3.6.0 numpy
	$(VENV36)/bin/pip install --no-deps -e .
	touch $@

check: venv $(VENV36)/.sparsekern-installed
	$(PY) -m sparsekern.check --twins
	$(VENV36)/bin/python -m sparsekern.check --twins
