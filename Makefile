# loopline: `make demo` and `make test` work from a fresh clone with nothing but Python 3.11+.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_ARGS ?=

.PHONY: install lint test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -c 'import sys; assert sys.version_info >= (3, 11), "loopline needs Python 3.11 or newer"'
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test: install
	$(BIN)/python -m pytest

demo: install
	$(BIN)/loopline bench $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .loopline .pytest_cache .mypy_cache .ruff_cache *.egg-info
