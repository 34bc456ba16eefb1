# The two commands: `make run` and `make test`. Everything goes through `make install`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The locked versions (`make lock` writes them): the venv of make and CI (every extra make uses),
# and the production image (deploy/Dockerfile: the base dependencies alone).
DEV_LOCK := requirements/dev.txt
RUNTIME_LOCK := requirements/runtime.txt
PIP_VERSION := 26.3

.PHONY: install run test lint lock bench chaos clean

install: $(STAMP)

# Reinstall only when the project definition or the lock changed: fast when nothing did.
# The lock first, then the project itself with --no-deps: every version comes from the lock.
$(STAMP): pyproject.toml $(DEV_LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet 'pip==$(PIP_VERSION)'
	$(BIN)/python -m pip install --quiet --requirement $(DEV_LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --editable .
	@touch $(STAMP)

run: install
	$(BIN)/ordercancel dev

# The gates first (lint), then the tests, on TEST_WORKERS pytest-xdist workers: most of the suite
# waits on its servers. Each worker takes whole modules (a module's servers start once), the
# slowest first (tests/conftest.py); each has its own PostgreSQL, time-skipping server and ports.
# `make test TEST_WORKERS=0` runs in this one process (e.g. with `PYTEST_ARGS=--pdb`).
TEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The gates alone: ruff (lint, format), mypy (files in pyproject's [tool.mypy]) and import-linter
# (the layers: pyproject's [tool.importlinter]).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# Regenerate the locks from pyproject.toml, with uv (in the dev extra) resolving against PyPI for
# every platform (--universal: Linux amd64/arm64 image builds, developers' macOS too):
#   make lock                                     # after changing a dependency in pyproject.toml
#   make lock LOCK_ARGS=--upgrade                 # every package to its newest allowed version
#   make lock LOCK_ARGS="--upgrade-package stripe"
# The runtime lock is constrained by the dev lock, so the image ships the versions CI tested.
# Its hashes are checked by pip in the image. Commit both files; `make install` then follows them.
LOCK_FLAGS := --quiet --universal --python-version 3.11 --annotation-style line --custom-compile-command "make lock"
lock: install
	$(BIN)/uv pip compile $(LOCK_FLAGS) $(LOCK_ARGS) pyproject.toml \
		--extra embedded --extra test --extra dev --output-file $(DEV_LOCK)
	$(BIN)/uv pip compile $(LOCK_FLAGS) $(LOCK_ARGS) pyproject.toml --generate-hashes \
		--constraint $(DEV_LOCK) --output-file $(RUNTIME_LOCK)

# Developer tools from the checkout (tools/ is not installed, not in the image).
# The limit and the product side by side (docs/performance.md); BENCH_ARGS="--count 500".
bench: install
	$(BIN)/python -m tools.bench $(BENCH_ARGS)

# The reliability run (docs/reliability.md); CHAOS_ARGS="--count 5000".
chaos: install
	$(BIN)/python -m tools.chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache
