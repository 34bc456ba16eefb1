# The two commands: `make run` and `make test`. Everything goes through `make install`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench chaos clean

install: $(STAMP)

# Reinstall only when the project definition changed: fast when nothing did.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,test,dev]'
	@touch $(STAMP)

run: install
	$(BIN)/ordercancel dev

# The gates first (lint), then the tests.
test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Developer tools from the checkout (tools/ is not installed, not in the image).
# The limit and the product side by side (docs/performance.md); BENCH_ARGS="--count 500".
bench: install
	$(BIN)/python -m tools.bench $(BENCH_ARGS)

# The reliability run (docs/reliability.md); CHAOS_ARGS="--count 5000".
chaos: install
	$(BIN)/python -m tools.chaos $(CHAOS_ARGS)

# The gates alone: ruff (lint, format), mypy (files in pyproject's [tool.mypy]) and import-linter
# (the layers: pyproject's [tool.importlinter]).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache
