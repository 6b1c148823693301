# Every target sets itself up from nothing: a virtual environment, torch pinned to a CPU
# build that installs in seconds (override: make test TORCH="torch==2.14.1"), then clipopt
# with its extras.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.clipopt-installed

.PHONY: setup test lint typecheck pytest docs demo plots bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,docs,optuna]"
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/python -m pytest -q

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

test: lint typecheck pytest docs

demo: setup
	$(BIN)/python examples/tune_max_norm.py

plots: setup
	$(BIN)/python docs/make_plots.py

bench: setup
	$(BIN)/python benchmarks/bench_step.py


clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache
