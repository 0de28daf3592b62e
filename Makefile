# loopline: `make demo` and `make test` work from a fresh clone with nothing but Python 3.11+ (make test: and
# Debian's chromium, which it installs as root when missing).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_ARGS ?=
DEMO_SERVE ?= 1
DEMO_PORT ?= 8000
DEMO_RESULTS ?= results
TEST_WORKERS ?= 2

.PHONY: install lint test browser demo clean

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

# Test files are spread over TEST_WORKERS processes (pytest-xdist), each with its own Redis; most tests wait on
# real workers, so two processes halve the suite's time even on two cores. TEST_WORKERS=0 runs it in one.
test: install browser
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# The dashboard's browser tests drive Debian's chromium through Playwright; no browser is ever downloaded.
browser:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the dashboard's browser tests"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else \
	    echo "make test needs chromium for the dashboard's browser tests: run 'apt-get install chromium' as root" >&2; \
	    exit 1; \
	  fi; }

# A small bench over every pool, its table, then the dashboard on it until Ctrl-C (DEMO_SERVE=0: stop after the table).
demo: install
	$(BIN)/loopline bench --out $(DEMO_RESULTS) $(DEMO_ARGS)
	@if [ "$(DEMO_SERVE)" != "0" ]; then $(BIN)/loopline dashboard --port $(DEMO_PORT) --results $(DEMO_RESULTS); fi

clean:
	rm -rf $(VENV) .loopline .pytest_cache .mypy_cache .ruff_cache *.egg-info
