# rewardctl developer commands. `make demo` and `make test` work on a fresh machine: they create
# .venv, install the pinned CPU torch wheel first when torch is absent (an unpinned torch requirement
# would pull a multi-GB CUDA build on a CPU machine), then install rewardctl with its extras.
# GPU users: create the venv with your CUDA torch first, or set TORCH_SPEC.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BENCH_VENV ?= .venv-bench
BENCH_BIN := $(BENCH_VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# The versions the suite last passed with, so CI is the same from run to run (empty: resolve freely).
CONSTRAINTS ?= constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
export HF_HUB_OFFLINE ?= 1

.PHONY: setup setup-bench demo test test-slow check lint bench bench-gpu samples constraints clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The test venv holds every optional extra a test needs, so no test is a permanent skip in CI: the
# acceptance encoder, TRL 0.29.1 (the last with BCO and PRM, for the parity tests) and tensorboard.
$(VENV)/.installed-dev: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install $(PIP_C) -e ".[dev,acceptance,parity,tensorboard,serve]"
	touch $@

# The benchmarks measure TRL 1.16's RewardTrainer, which cannot share a venv with the parity tests'
# TRL 0.29.1: a venv of their own, same constraints but for trl.
$(BENCH_BIN)/python:
	$(PYTHON) -m venv $(BENCH_VENV)

$(BENCH_VENV)/.installed-bench: pyproject.toml $(CONSTRAINTS) | $(BENCH_BIN)/python
	$(BENCH_BIN)/python -c "import torch" 2>/dev/null || $(BENCH_BIN)/pip install "$(TORCH_SPEC)"
	$(if $(CONSTRAINTS),grep -v '^trl==' $(CONSTRAINTS) > $(BENCH_VENV)/constraints.txt)
	$(BENCH_BIN)/pip install $(if $(CONSTRAINTS),-c $(BENCH_VENV)/constraints.txt) -e ".[dev,bench]"
	touch $@

# Both also build rewardctl's fused CPU kernels for their torch (once per machine, about 30 s on 2 cores;
# `rewardctl kernels build`). Without a C++ compiler they are skipped: runs then use torch's operators.
KERNELS_SKIPPED := echo "make: fused CPU kernels not built (no C++ compiler or ninja?); runs use torch's operators"

setup: $(VENV)/.installed-dev
	@$(BIN)/rewardctl kernels build || $(KERNELS_SKIPPED)

setup-bench: $(BENCH_VENV)/.installed-bench
	@$(BENCH_BIN)/rewardctl kernels build || $(KERNELS_SKIPPED)

## Train the embedded default (tiny model, bundled sample, CPU) into outputs/<date>/<time>/.
demo: setup
	$(BIN)/rewardctl train

## Lint, then the test suite: unit tests and the end-to-end runs of every command (7-15 min on
## 2 CPU cores). The long runs (real-data acceptance, several processes) are `make test-slow`.
test: setup lint
	REWARDCTL_REQUIRE_EXTRAS=1 $(BIN)/python -m pytest -m "not slow"

## The long runs: acceptance on ../shared/data (or $$REWARDCTL_SHARED_DATA) with the real MiniLM
## encoder, and the multi-process runs (8-19 min on 2 CPU cores).
test-slow: setup
	REWARDCTL_REQUIRE_EXTRAS=1 $(BIN)/python -m pytest -m slow

## What CI runs on a fresh clone: both.
check: test test-slow

lint: setup
	$(BIN)/ruff check rewardctl tests benchmarks conf
	$(BIN)/ruff format --check rewardctl tests benchmarks
	$(BIN)/lint-imports

## Speed against TRL's RewardTrainer at its best CPU settings on ../shared/data, one run, ratios against
## TRL measured in the same run (about 13-15 min on 2 CPU cores): MiniLM pairwise, decoder pairwise with
## a shared prompt, decoder ranklist, and the embedded default's wall time. Sizes: --steps, --batch,
## --eval-rows, --cases (BENCH_ARGS="--cases minilm --steps 10"). The ranklist vs per-text-loop
## comparison no longer fits this budget; run it alone: python benchmarks/ranklist_vs_per_text_loop.py
bench: setup-bench
	$(BENCH_BIN)/python benchmarks/speed_vs_trl.py $(BENCH_ARGS)

## On a GPU machine: items/s and peak GPU memory of every method on a Qwen2.5-0.5B-shaped model (bf16).
bench-gpu: setup
	$(BIN)/python benchmarks/gpu_methods.py
	$(BIN)/python benchmarks/gpu_methods.py --peft lora --gradient-checkpointing

## Regenerate the bundled sample data and the tiny model asset.
samples: setup
	$(BIN)/python -m rewardctl.samples.generate
	$(BIN)/python -m rewardctl.assets.build_tiny_llama

## Record the installed versions as the new constraints (after a green `make test`).
constraints: setup
	{ sed -n '1,2p' $(CONSTRAINTS); $(BIN)/pip freeze --exclude-editable | grep -viE '^(torch|rewardctl)==|@ file' | sort -f; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) outputs multirun bench-results .pytest_cache .ruff_cache
