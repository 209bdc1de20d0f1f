# mcie: the two commands a new machine needs are `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: install demo test lint bench clean

# The venv is (re)installed whenever pyproject.toml changes.
$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --progress-bar off -e '.[dev]'
	@touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/mcie demo

lint: install
	$(BIN)/ruff check .

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# Every benchmark prints one JSON object; benchmarks are never part of `make test`.
bench: install
	@set -e; for script in bench/*.py; do echo "# $$script" >&2; $(BIN)/python $$script; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
