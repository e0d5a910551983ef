# m2mgw: the two set-up commands are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck unit bench clean venv

venv: $(STAMP)

# One virtual environment with the test and dev extras; the checkout goes on
# sys.path (editable "compat" mode) so that twistd finds twisted/plugins/.
$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "m2mgw needs Python 3.10 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev]' --config-settings editable_mode=compat
	@touch $@

## Start the gateway on the embedded defaults (data in ./var/m2mgw).
run: $(STAMP)
	$(BIN)/twistd --pidfile= -n m2mgw

## The whole suite: lint, types, tests.
test: $(STAMP) lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check m2mgw tests twisted $(wildcard bench)
	$(BIN)/ruff format --check m2mgw tests twisted $(wildcard bench)

typecheck: $(STAMP)
	$(BIN)/mypy

# tests/pg-setup makes PostgreSQL binaries available for the postgres store's
# tests where it can (see the script); without them those tests are skipped.
unit: $(STAMP)
	@sh tests/pg-setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
