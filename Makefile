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

.PHONY: demo baselines test install bench bench-synthetic bench-demo mutate clean help screen sweep compare

BEST ?= 3
JOBS ?= 1
REVS ?=
FULL ?=

help:
	@echo "make demo   - set up .venv and run the conversion pipeline on the offline demo (dvc repro report)"
	@echo "make baselines - the baselines at the student's size, distilled like it (dvc repro baselines; after make demo)"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make bench  - run the benchmarks in bench/ (ratios, see bench/RESULTS.md); FULL=1: the memory benchmarks at full size"
	@echo "make screen - the design-space screen on the demo (dvc repro screen)"
	@echo "make sweep  - distil the screen's BEST=3 configurations as DVC experiments, JOBS=1 at a time"
	@echo "make compare REVS='main my-branch' - metrics across git revisions (default: every branch)"
	@echo "make mutate - mutation testing of the algorithm modules (scores per module, survivors)"
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

baselines: $(STAMP)
	dvc repro baselines
	@sed -n '1,/^Before/p' reports/baselines.md

screen: $(STAMP)
	dvc repro screen
	@head -n 14 screen/results.md

sweep: $(STAMP)
	python -m flows.sweep --from-screen $(BEST) --jobs $(JOBS)

compare: $(STAMP)
	python -m moe2dense compare $(REVS) --out reports/compare.md

test: $(STAMP)
	python -m pytest

# Every benchmark in bench/. The synthetic ones build their own models; the demo ones measure the finished pipeline
# and run only when `dvc status` finds it up to date (dvc_noop times a no-op `dvc repro` of every stage). Two need
# more than a laptop has to spare and run at full size only with FULL=1; without it each says so.
bench: bench-synthetic
	@if dvc status --quiet; then $(MAKE) --no-print-directory bench-demo; \
	else echo "make bench: skipped dvc_noop.py, eval_perplexity.py, screen_bench.py and distill_bench.py: they measure" \
		"the finished pipeline and \`dvc status\` says it is not up to date; run \`make demo screen\`, then \`make bench\`"; fi

bench-synthetic: $(STAMP)
	python bench/teacher_throughput.py
	python bench/determinism_bench.py
	python bench/calibrate_bench.py
	python bench/score_bench.py
	python bench/assemble_memory.py $(if $(FULL),,--small)
	$(if $(FULL),,@echo "make bench: assemble_memory.py ran --small (a 0.23 GB teacher, where its memory budget means" \
		"nothing); the budgets are for a 3.65 GB teacher (that much disk and page cache, ~3 min):" \
		"\`make bench FULL=1\` or \`python bench/assemble_memory.py\`")
	python bench/distill_data_memory.py $(if $(FULL),,--rows 256 --cache-rows 160 --seq-len 256 --top-n 16)
	python bench/prune_bench.py $(if $(FULL),,--small)
	$(if $(FULL),,@echo "make bench: prune_bench.py ran --small (its memory ratios are information there); the pruning" \
		"memory budget is for a 5 GB Qwen3-32B-wide teacher: \`make bench FULL=1\` or \`python bench/prune_bench.py\`")
	python bench/calibrate_offload_memory.py $(if $(FULL),,--small)
	python bench/quantized_convert.py $(if $(FULL),,--small)
	$(if $(FULL),,@echo "make bench: quantized_convert.py ran --small (its ratios are information there); the budgets are" \
		"for 2-layer teachers at GPT-OSS-20B and DeepSeek-V3 widths (~15 GB of disk, ~6 min):" \
		"\`make bench FULL=1\` or \`python bench/quantized_convert.py\`")
	$(if $(FULL),python bench/distill_loss_memory.py,@echo "make bench: skipped distill_loss_memory.py: the chunked loss" \
		"alone peaks near 5 GB and the naive one takes what memory is free (minus 6 GB), for minutes:" \
		"\`make bench FULL=1\` or \`python bench/distill_loss_memory.py\`")

bench-demo: $(STAMP)
	python bench/dvc_noop.py
	python bench/eval_perplexity.py
	python bench/screen_bench.py
	python bench/distill_bench.py throughput
	python bench/distill_bench.py cached
	python bench/distill_bench.py determinism

# Mutation testing of the algorithm modules against their fast unit tests ([tool.mutmut] in pyproject.toml); not
# part of `make test`: thousands of mutants. Prints the score per module and the surviving mutants (`mutmut show NAME`).
mutate: $(STAMP)
	rm -rf mutants
	mutmut run --max-children 2
	python tests/mutation_report.py --survivors --goal 90

# Removes what the pipeline built and nothing else: `git clean -X` deletes only files git ignores, so the committed
# metrics/, plots/ and checks/.gitignore stay (`make demo` rewrites the first two) and so does anything of yours.
OUTPUTS := data/prepared models reports calibration scores selection grouping teacher_logits eval_tasks eval screen \
	.screen_cache checks timings .distill_runs
clean:
	@git rev-parse --is-inside-work-tree >/dev/null 2>&1 || { echo "make clean: not a git checkout; it removes only" \
		"the files git ignores, so it needs git"; exit 2; }
	git clean -fdX -- $(OUTPUTS)
