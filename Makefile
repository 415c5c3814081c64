# scmc developer commands. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install graphviz test test-fast fuzz demo bench golden lint clean

install: $(STAMP) graphviz

# Graphviz's `dot` program draws `scmc graph -o *.svg|png` (a .dot file needs none): installed with
# apt where we are root and apt is there, else a note naming the command (the build goes on).
graphviz:
	@command -v dot >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get install -y -q graphviz >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q graphviz >/dev/null; }; \
	  else echo "note: Graphviz's dot is missing (scmc graph -o *.svg needs it): sudo apt-get install -y graphviz"; fi; }

# torch first, pinned, so pip takes the local copy instead of resolving a CUDA build.
$(STAMP): pyproject.toml runtime/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e "runtime[train]" -e ".[dev,export,timm]"
	touch $(STAMP)

test: $(STAMP) graphviz
	$(PY) -m pytest -q -rs

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# 1000 random templates through the compiler (CI runs 40 fixed ones as part of `make test`).
fuzz: $(STAMP)
	SCMC_FUZZ_EXAMPLES=1000 $(PY) -m pytest -q tests/test_fuzz.py

demo: $(STAMP) graphviz
	$(PY) scripts/demo.py

bench: $(STAMP)
	$(PY) benchmarks/run.py

golden: $(STAMP)
	$(PY) tests/golden/regenerate.py

# black, then ruff and mypy (their settings, and which files they check, are in pyproject.toml).
lint: $(STAMP)
	$(PY) -m black --check scmc runtime/src tests benchmarks scripts
	$(PY) -m ruff check scmc runtime/src
	$(PY) -m mypy

clean:
	rm -rf artifacts/*/ runs .pytest_cache
