# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PYTHON ?= python3
CATALOG ?= ../shared/data/luma
DEMO_CATALOG ?= demo-catalog
BIN = $(VENV)/bin

.PHONY: setup demo test test-fast lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/python scripts/demo.py --source $(CATALOG) --catalog $(DEMO_CATALOG)

test: setup
	$(BIN)/python -m pytest -q

# The unit tests alone: no shared data, training, browser or slow tests (markers in pyproject.toml).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not data and not train and not browser and not slow"

lint: setup
	$(BIN)/ruff check src tests bench scripts

bench: setup
	$(BIN)/python bench/report.py

clean:
	rm -rf $(DEMO_CATALOG) .pytest_cache
