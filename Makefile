# The two commands of the README: `make demo` (set up + main job) and `make test` (set up + tests).
# Both create .venv in the repository root and install the pinned set idempotently: the stamp
# file is rebuilt only when setup.cfg or pyproject.toml change, so a second run installs nothing.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_TRAIN_ENABLE_PREEMPTION_WATCHER ?= 0
export RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS ?= 0

.PHONY: venv demo test lint clean-venv

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	$(PY) -m pip check
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m study.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check brainage_core study analysis tests bench

test: $(STAMP) lint
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
