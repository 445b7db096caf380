# Set-up is part of every target: the first run creates .venv and installs the pinned environment; later runs
# reinstall only when pyproject.toml changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed

# Offline and telemetry-free everywhere (DVC, Prefect, Ray, Hugging Face).
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install bench clean help screen sweep compare

BEST ?= 3
JOBS ?= 1
REVS ?=

help:
	@echo "make demo   - set up .venv and run the conversion pipeline on the offline demo (dvc repro report)"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make bench  - run the benchmarks in bench/ (ratios, see bench/RESULTS.md)"
	@echo "make screen - the design-space screen on the demo (dvc repro screen)"
	@echo "make sweep  - distil the screen's BEST=3 configurations as DVC experiments, JOBS=1 at a time"
	@echo "make compare REVS='main my-branch' - metrics across git revisions (default: every branch)"
	@echo "make clean  - remove the pipeline's untracked outputs (data/prepared, models, caches, timings, Ray runs)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	dvc repro report
	@python -m moe2dense summary

screen: $(STAMP)
	dvc repro screen
	@head -n 14 screen/results.md

sweep: $(STAMP)
	python -m flows.sweep --from-screen $(BEST) --jobs $(JOBS)

compare: $(STAMP)
	python -m moe2dense compare $(REVS) --out reports/compare.md

test: $(STAMP)
	python -m pytest

bench: $(STAMP)
	python bench/teacher_throughput.py
	python bench/calibrate_bench.py
	python bench/score_bench.py
	python bench/dvc_noop.py
	python bench/eval_perplexity.py
	python bench/screen_bench.py
	python bench/determinism_bench.py

# Removes what the pipeline built (untracked); the committed metrics/ and plots/ stay: `make demo` rewrites them.
clean:
	rm -rf data/prepared models reports calibration scores selection grouping teacher_logits eval_tasks eval \
		screen .screen_cache checks timings .distill_runs
