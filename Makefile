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

.PHONY: venv demo test test-fast test-slow lint clean-venv

venv: $(STAMP)

# The pinned set is installed with uv (pinned below; from the package registry into the venv): ~50 s on
# 2 cores where pip took ~4 minutes (it fetches and unpacks ~150 wheels one after another). uv reads no
# pip.conf: pip's find-links (where this machine keeps its CPU torch wheel) are passed on as UV_FIND_LINKS.
# Where uv cannot be installed or fails, pip installs the same set (`USE_UV=0` to ask for pip).
UV_VERSION := 0.13.8
USE_UV ?= 1
export UV_FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ "$(USE_UV)" = 1 ] && $(PY) -m pip install --quiet --disable-pip-version-check 'uv==$(UV_VERSION)' \
	    && $(VENV)/bin/uv pip install --quiet --python $(PY) --compile-bytecode -e '.[test]'; then \
	  echo "installed with uv $(UV_VERSION)"; \
	else \
	  echo "installing with pip"; $(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'; \
	fi
	$(PY) -m pip check
	@touch $(STAMP)

# The main job: a small study on the synthetic cohort (generated and prepared on first use) on a
# local Ray, then the HTML report. Each run is a new study folder under studies/.
DEMO_NAME ?= quickstart-$(shell date +%Y%m%d-%H%M%S)
demo: $(STAMP)
	$(PY) study/run.py search_spaces/quickstart.yaml --name $(DEMO_NAME)
	$(PY) analysis/report.py studies/$(DEMO_NAME) --out studies/$(DEMO_NAME)/report.html
	@echo "report: studies/$(DEMO_NAME)/report.html"

lint: $(STAMP)
	$(VENV)/bin/ruff check brainage_core study analysis tests bench

# The whole suite on 2 workers (pytest-xdist): the Ray studies wait on process starts and sleeps as much
# as they compute, so two at a time fill the 2 cores. --dist loadfile keeps each module on one worker (its
# module-scoped Ray and fixtures are built once); tests/conftest.py collects the longest modules first and
# --no-loadscope-reorder keeps that order. (--dist loadgroup would need xdist_group markers, which
# pytest-xdist 3.8.0 does not apply under pytest 9: it sets Node._nodeid, which pytest 9 no longer reads.)
# Serially: `$(PY) -m pytest -q` (also fine: nothing depends on the workers).
TEST_WORKERS ?= 2
test: $(STAMP) lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The library alone (brainage_core: no Ray, no study), slow tests deselected: the check to run before
# every commit. Slow tests carry @pytest.mark.slow (setup.cfg lists the marker); `make test` runs all.
LIBRARY_TESTS := tests/test_layers.py tests/test_config.py tests/test_metrics.py tests/test_losses.py \
	tests/test_losses_distributed.py tests/test_models.py tests/test_data_dataset.py tests/test_data_nifti.py \
	tests/test_data_openbhb.py tests/test_data_ramp.py tests/test_sources.py tests/test_synthetic.py \
	tests/test_synthetic_offline.py tests/test_realism.py tests/test_evaluation.py tests/test_training.py
test-fast: $(STAMP) lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow" $(LIBRARY_TESTS)

# Only the slow tests (Ray studies, subprocess pipelines, gloo ranks).
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean-venv:
	rm -rf $(VENV)
