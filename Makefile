# Every target sets itself up from nothing: a virtual environment, torch pinned to a CPU
# build that installs in seconds (override: make test TORCH="torch==2.14.1"), then clipopt
# with its extras.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.clipopt-installed
# Pinned versions of every tool and extra (not torch): see the file's header.
CONSTRAINTS := requirements/constraints.txt
PIN := '^(torch|clipopt|pip|setuptools|wheel)(==| @)'
# make demo: its own lighter environment (torch and clipopt[optuna], no dev/docs extras)
DEMO_VENV ?= .venv-demo
DEMO_STAMP := $(DEMO_VENV)/.clipopt-demo-installed

.PHONY: setup test lint typecheck pytest docs demo plots bench stability stability-quick lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) "$(TORCH)"
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev,docs,optuna]"
	touch $(STAMP)

# Resolve the newest versions that pyproject.toml allows, in a scratch venv, and write
# them to $(CONSTRAINTS): review the diff, run make test, commit.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet "$(TORCH)"
	.venv-lock/bin/python -m pip install --quiet -e ".[dev,docs,optuna]"
	head -n 3 $(CONSTRAINTS) > $(CONSTRAINTS).new
	.venv-lock/bin/python -m pip freeze --exclude-editable | grep -v -E $(PIN) \
		>> $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS) && rm -rf .venv-lock

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/python -m pytest -p randomly  # random order; the header prints the seed

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

test: lint typecheck pytest docs

$(DEMO_STAMP): pyproject.toml Makefile
	@start=$$(date +%s); set -e; \
	test -x $(DEMO_VENV)/bin/python || $(PYTHON) -m venv $(DEMO_VENV); \
	$(DEMO_VENV)/bin/python -m pip install --quiet "$(TORCH)"; \
	$(DEMO_VENV)/bin/python -m pip install --quiet -e ".[optuna]"; \
	touch $(DEMO_STAMP); \
	echo "demo: setup took $$(( $$(date +%s) - start )) s ($$(du -sh $(DEMO_VENV) | cut -f1))"

demo: $(DEMO_STAMP)
	@start=$$(date +%s); $(DEMO_VENV)/bin/python examples/tune_max_norm.py && \
	echo "demo: the job took $$(( $$(date +%s) - start )) s"

plots: setup
	$(BIN)/python docs/make_plots.py

bench: setup
	$(BIN)/python benchmarks/bench_step.py

# The stability benchmark: 9 tasks x 10 seeds x ~35 methods on one thread (~35 min);
# prints the gap table, writes benchmarks/stability/results/latest.{md,json}.
stability: setup
	PYTHONPATH=. $(BIN)/python -m benchmarks.stability.run

# Its quick subset (2 seeds, a coarse grid; a few minutes); make test runs a smaller one.
stability-quick: setup
	PYTHONPATH=. $(BIN)/python -m benchmarks.stability.run --quick


clean:
	rm -rf $(VENV) $(DEMO_VENV) .venv-lock site .pytest_cache .mypy_cache .ruff_cache
