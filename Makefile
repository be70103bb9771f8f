# Every target makes (or reuses) a local virtualenv, so a fresh clone needs only python3.
# Another interpreter gets a virtualenv of its own:
#   make test PYTHON=/var/cache/isolator/python3.13/bin/python3.13 VENV=.venv313
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Extra requirements installed with the package (make test-floor pins the floor with it).
PINS ?=
FLOOR_VENV ?= .venv-floor
# The floor this package claims, read from pyproject.toml: "pytest>=8.0" becomes "pytest==8.0.*";
# plus pluggy, which isolator imports and takes from pytest (pytest 8.0 accepts pluggy 1.3).
FLOOR := $(shell sed -n 's/^ *"\(pytest\|pytest-xdist\|psutil\)>=\([0-9.]*\)",*$$/\1==\2.*/p' pyproject.toml) pluggy==1.3.*

.DEFAULT_GOAL := help
.PHONY: help venv test test-floor test-installed lint demo bench conformance clean

help: ## Show this help
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e . --group dev $(PINS)
	touch $(STAMP)

venv: $(STAMP) ## Create the virtualenv with the package and dev tools

test: $(STAMP) ## Run the project's tests
	$(PY) -m pytest -q

test-floor: ## Run the tests against the lowest pytest, pytest-xdist, psutil and pluggy we claim
	$(MAKE) test VENV=$(FLOOR_VENV) PINS="$(FLOOR)"
	$(FLOOR_VENV)/bin/python -m pip list 2>/dev/null | grep -E '^(pytest|pytest-xdist|psutil|pluggy) '

test-installed: $(STAMP) ## Run the tests against the built wheel, away from the checkout
	rm -rf .wheel .venv-installed .installed-tests
	$(PY) -m pip wheel -q --no-deps -w .wheel .
	$(PYTHON) -m venv .venv-installed
	.venv-installed/bin/python -m pip install -q --upgrade pip
	.venv-installed/bin/python -m pip install -q .wheel/*.whl pytest-cov pytest-timeout pytest-rerunfailures pytest-randomly
	mkdir -p .installed-tests && cp -r tests conftest.py pyproject.toml .installed-tests/
	cd .installed-tests && ../.venv-installed/bin/python -c "import isolator, sys; assert 'site-packages' in isolator.__file__, isolator.__file__"
	cd .installed-tests && ../.venv-installed/bin/python -m pytest -q -x

lint: $(STAMP) ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

demo: $(STAMP) ## Run the bundled example suite plain and isolated, side by side
	$(PY) examples/demo.py

bench: $(STAMP) ## Wall and CPU ratios vs plain pytest, per-worker costs (torch, pytest-forked in .bench venvs)
	$(PY) bench/bench.py

conformance: $(STAMP) ## Same verdict for every test of networkx and toolz, isolated or not
	$(PY) bench/conformance.py --xdist

clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) .venv313 .venv-floor .venv-installed .wheel .installed-tests .pytest_cache .mypy_cache .ruff_cache .bench .conformance
