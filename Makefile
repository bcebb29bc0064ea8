# Two commands: `make serve` (set up, then run the server on the demo model) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where the CPU torch wheel comes from: empty = pip's configured index (our machines: a local CPU wheel store).
# Elsewhere: `make serve TORCH_INDEX=https://download.pytorch.org/whl/cpu` (PyPI's Linux wheel is the CUDA build).
TORCH_INDEX ?=

.PHONY: setup serve test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch 2.13.0; GPU users install their own torch into .venv first.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[train,dev]"
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(BIN)/python -m server

test: $(STAMP)
	$(BIN)/python -m pytest
