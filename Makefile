# `make demo` and `make test` work on a fresh machine: each sets up .venv first.
SHELL   := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PY      ?= python3.11
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

.PHONY: setup browser demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(BIN)/python -c "import torch, slmforge; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

demo: setup
	$(BIN)/slmforge run recipes/demo.yaml

# The report test renders HTML in headless Chromium (Debian's package; needs root on a fresh machine).
browser:
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

test: setup browser
	$(BIN)/python -m pytest -n 2 --timeout 600 tests

bench: setup
	$(BIN)/python benchmarks/data_throughput.py

clean:
	rm -rf runs .pytest_cache
