# Quick start:  make demo   (creates .venv, installs, runs `grandmother run` on the in-package sample)
#               make test   (creates .venv, installs, runs the test suite)
# TORCH picks the PyTorch wheel: the default is the CPU build; `make demo TORCH=torch` takes a CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m grandmother run grandmother/sample/train --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

bench: $(STAMP)
	$(BIN)/python -m grandmother bench --preset small

clean-venv:
	rm -rf $(VENV)
