# The commands a person types. Everything installs itself into .venv on first use.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3.11
BIN := $(VENV)/bin
STAMP := $(VENV)/.cxr-spark-installed
RUN_DIR ?= runs/demo
export PYTHONHASHSEED := 0

.PHONY: install demo test test-fast bench clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install: $(STAMP)  ## create .venv with the pinned stack and Horovod built from source

$(STAMP): pyproject.toml constraints.txt scripts/install.sh
	VENV=$(VENV) PYTHON=$(PYTHON) bash scripts/install.sh
	@touch $@

demo: install  ## synthetic NIH dump -> ingest -> preprocess -> Horovod training -> scoring -> report
	$(BIN)/cxr-spark demo --run-dir $(RUN_DIR)

test: install  ## the whole test suite, including a real 2-process Horovod run
	$(BIN)/python -m pytest -q tests

test-fast: install  ## the tests that need no Horovod run
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:  ## remove demo outputs (keeps .venv)
	rm -rf runs .pytest_cache
