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

.PHONY: demo test install bench clean help

help:
	@echo "make demo   - set up .venv and run the whole pipeline on the offline demo (dvc repro)"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make bench  - run the benchmarks in bench/ (ratios, see bench/RESULTS.md)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	dvc repro
	@python -m moe2dense summary

test: $(STAMP)
	python -m pytest

bench: $(STAMP)
	python bench/teacher_throughput.py
	python bench/calibrate_bench.py
	python bench/score_bench.py
	python bench/dvc_noop.py
	python bench/eval_perplexity.py

clean:
	rm -rf data/prepared models metrics plots reports calibration scores selection grouping teacher_logits eval_tasks eval
