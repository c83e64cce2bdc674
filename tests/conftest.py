"""Session-wide test settings shared by every test module.

Ray's CI settings from docs/ray-notes.md (and Ray's metrics off) are set before anything imports Ray; torch
runs single-threaded so that tests behave the same on the 2-core CI machine whatever else is running.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

for _key, _value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    # No Ray metrics in the tests' Rays (nothing here reads them): one exporter thread fewer in every Ray process,
    # and no repeat of a study driver's SIGSEGV in that thread (OpenTelemetry's TemporalMetricStorage::buildMetrics,
    # once in session 13's clean-clone runs, before any trial ran; a Ray-internal race).
    "RAY_enable_metrics_collection": "0",
    "OMP_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)



#: the modules that take minutes (Ray studies), longest first. They are collected first, so that under
#: pytest-xdist (``-n 2 --dist loadfile --no-loadscope-reorder``: a module's tests on one worker, where its
#: module-scoped fixtures, its Ray, its trained study, are built once) the long ones start at once instead of
#: last: the suite's wall time is at least its longest module's.
HEAVY_MODULES = ("test_study", "test_cluster_sim", "test_study_object_store", "test_loss_benchmark",
                 "test_smoke_study", "test_cluster", "test_multiobjective", "test_export", "test_predict",
                 "test_training")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Heavy modules first (:data:`HEAVY_MODULES`), each module's tests kept together and in order."""
    def rank(item):
        name = item.module.__name__
        return HEAVY_MODULES.index(name) if name in HEAVY_MODULES else len(HEAVY_MODULES)

    items.sort(key=rank)  # stable: the order within a module and among the others is kept


@pytest.fixture(autouse=True, scope="module")
def _no_ray_left_behind(request):
    """A module that leaves Ray initialised in the pytest process makes the next module's own local Ray fail
    ("ray.init twice"). After each module: shut such a Ray down and say which module left it (a warning in
    the summary), so the leak shows without breaking the modules that follow."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        warnings.warn(f"{request.module.__name__} left Ray initialised in the test process; shut down after it",
                      stacklevel=1)


@pytest.fixture(scope="session")
def store_cache(tmp_path_factory) -> Path:
    """The session's folder of synthetic cohorts and prepared stores, which the studies' caches link to
    (``study_fixtures.shared_store_cache``). Under pytest-xdist it is one folder for all workers (beside
    their base temp folders): the store's file lock makes the first study build it and the others wait."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / "shared-store-cache"
    path.mkdir(parents=True, exist_ok=True)
    return path
