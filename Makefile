# The commands a person types. Everything installs itself into .venv on first use.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3.11
BIN := $(VENV)/bin
STAMP := $(VENV)/.cxr-spark-installed
RUN_DIR ?= runs/demo
# Defined before any rule: make expands prerequisites as it reads each rule.
BENCH_ARGS ?=
# make bench: its images and outputs (reused by the next run), and the figures as JSON
BENCH_DIR ?= runs/bench
BENCH_JSON ?= $(BENCH_DIR)/bench.json
# make scale: images in the synthetic dump (every row of NIH's metadata at 112120), their side, where it all goes
SCALE_N ?= 112120
SCALE_SIZE ?= 512
SCALE_DIR ?= runs/scale
SCALE_ARGS ?=
PACK_ENV := build/pack-env
ENV_ARCHIVE := dist/cxr-spark-env.tar.gz
export PYTHONHASHSEED := 0

.PHONY: install jvm-archive demo test test-fast cluster-test package bench scale mutate clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install: $(STAMP)  ## create .venv with the pinned stack and Horovod built from source

$(STAMP): pyproject.toml constraints.txt scripts/install.sh
	VENV=$(VENV) PYTHON=$(PYTHON) bash scripts/install.sh
	@touch $@

demo: install jvm-archive  ## synthetic NIH dump -> ingest -> preprocess -> Horovod training -> scoring -> report
	$(BIN)/cxr-spark demo --run-dir $(RUN_DIR)

test: install jvm-archive  ## the test suite, including a real 2-process Horovod run (not the cluster tests)
	$(BIN)/python -m pytest -q -m "not cluster" --doctest-modules cxr_spark tests

test-fast: install jvm-archive  ## the tests that need no Horovod run
	$(BIN)/python -m pytest -q -m "not slow and not cluster" --doctest-modules cxr_spark tests

jvm-archive: install  ## the local driver JVM's class-data archive, made again when Java or Spark changed (a check otherwise)
	@$(BIN)/python -m cxr_spark.make_jvm_archive

cluster-test: install $(ENV_ARCHIVE)  ## a Spark standalone master + 2 workers on 127.0.0.1: the pipeline via spark-submit, a killed executor, the shipped environment
	$(BIN)/python -m pytest -q -m cluster tests/cluster

bench: install jvm-archive  ## ingest, training input vs model, input workers, Horovod scaling, scoring and batch-score, fixed costs: ratios measured side by side (no timed tests), figures in BENCH_JSON
	PYTHONPATH=$(CURDIR) $(BIN)/python -m benchmarks.bench --keep $(BENCH_DIR) --json $(BENCH_JSON) $(BENCH_ARGS)  # PYTHONPATH: Spark's and Horovod's workers import it too

scale: install jvm-archive  ## every stage as its own cxr-spark command on SCALE_N synthetic images with NIH's real metadata, 2 GB driver: time, CPU, memory, sizes per stage, one JSON line (the longest run: docs/scale.md; not in CI)
	PYTHONPATH=$(CURDIR) $(BIN)/python -m benchmarks.scale --n-images $(SCALE_N) --size $(SCALE_SIZE) --dir $(SCALE_DIR) $(SCALE_ARGS)

mutate: install  ## mutation score of the pure modules against the tests that need no Spark (minutes; not in CI)
	$(BIN)/python -m pip install -q --disable-pip-version-check "mutmut==3.8.1"
	rm -rf mutants
	$(BIN)/mutmut run
	$(BIN)/python scripts/mutation_score.py --equivalent tests/mutation_equivalent.txt

package: $(ENV_ARCHIVE)  ## dist/: the project wheel and a relocatable environment archive for --archives

$(ENV_ARCHIVE): $(STAMP) $(shell find cxr_spark -name "*.py")
	rm -rf $(PACK_ENV) dist && mkdir -p dist
	$(BIN)/python -m pip wheel -q --no-deps -w dist .
	VENV=$(PACK_ENV) PYTHON=$(PYTHON) EDITABLE=0 bash scripts/install.sh
	$(BIN)/venv-pack -p $(PACK_ENV) -o $(ENV_ARCHIVE) --force --quiet
	rm -rf $(PACK_ENV)  # 2.3 GB rebuilt on every package anyway; the archive holds it
	@ls -lh dist

clean:  ## remove demo outputs (keeps .venv)
	rm -rf runs .pytest_cache build dist mutants
