# mcie: the two commands a new machine needs are `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: install browser demo serve test lint bench clean

# The venv is (re)installed whenever pyproject.toml changes. The checkout installs editable through setuptools' finder
# (the stage folders map into the mcie namespace); its notice about folders named like the package is silenced.
$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	PYTHONWARNINGS='ignore:Editable installation' $(BIN)/python -m pip install --quiet --progress-bar off -e '.[dev]'
	@touch $@

install: $(BIN)/.installed

# Browser tests drive Debian's Chromium (never a browser downloaded by Playwright).
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium)); \
	else echo "note: install Debian's chromium ($(CHROMIUM)) to run the browser tests"; fi

browser: $(CHROMIUM)

# Builds the demo data, database and accounts, then serves the app on the embedded SQLite database (Ctrl-C stops).
demo: install
	$(BIN)/mcie demo
	@echo "serving on http://$(HOST):$(PORT)/ (log in as rater1 or lead, password mcie-demo)"
	$(BIN)/mcie serve --host $(HOST) --port $(PORT)

serve: install
	$(BIN)/mcie serve --host $(HOST) --port $(PORT)

lint: install
	$(BIN)/ruff check .

test: install browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# Every benchmark prints one JSON object; benchmarks are never part of `make test`.
bench: install
	@set -e; for script in bench/*.py; do echo "# $$script" >&2; $(BIN)/python $$script; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
