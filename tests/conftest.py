"""Session-wide test settings shared by every test module.

Ray's CI settings from ray-notes.md are set before anything imports Ray; torch runs single-threaded
so that tests behave the same on the 2-core CI machine whatever else is running.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

for _key, _value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "OMP_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


#: the test groups that take minutes (Ray studies), longest first: a group is a module, or ``smoke_study``
#: for the tests of the session's :func:`smoke_study`. They are collected first, so that under pytest-xdist
#: (``--dist loadgroup --no-loadscope-reorder``) the long ones start at once instead of last: the suite's
#: wall time is at least its longest group's.
HEAVY_GROUPS = ("test_study", "test_cluster_sim", "test_study_object_store", "test_loss_benchmark", "smoke_study",
                "test_cluster", "test_multiobjective", "test_export", "test_predict", "test_training")


def _group(item: pytest.Item) -> str:
    return "smoke_study" if "smoke_study" in getattr(item, "fixturenames", ()) else item.module.__name__


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Heavy groups first (:data:`HEAVY_GROUPS`), each module's tests kept in order; every test gets an
    ``xdist_group`` marker (its group), so that ``pytest -n 2 --dist loadgroup`` runs a module's tests on
    one worker, where its module-scoped fixtures (its Ray, its trained study) are built once."""
    def rank(item):
        group = _group(item)
        return HEAVY_GROUPS.index(group) if group in HEAVY_GROUPS else len(HEAVY_GROUPS)

    items.sort(key=rank)  # stable: the order within a group and among the others is kept
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))


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


#: the search space and overrides of :func:`smoke_study`: smoke.yaml in-trial (one worker per trial) on 40 subjects
SMOKE_STUDY_ARGS = ("study.resources.num_workers=1", "data.synthetic.subjects=40")


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory, store_cache) -> dict:
    """One real smoke study shared by the tests that only read its outputs (report, export, final on a copy).

    ``python study/run.py search_spaces/smoke.yaml`` run from a folder outside the repository (2 trials of
    2 epochs, in-trial training, the 6 mm cohort of 40 subjects) as a user runs it: its own local Ray (no
    RAY_ADDRESS), its own cache (``BRAINAGE_CACHE``; the cohort and store from :func:`store_cache`).
    Returns ``{"dir": study folder, "env": the environment it ran with, "proc": the finished process}``.
    A test that writes into the study works on a copy (``shutil.copytree``)."""
    from study_fixtures import shared_store_cache

    root = tmp_path_factory.mktemp("smoke_study")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(BRAINAGE_CACHE=str(shared_store_cache(root / "cache", store_cache)), PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "study" / "run.py"), str(ROOT / "search_spaces" / "smoke.yaml"),
                           *SMOKE_STUDY_ARGS, "--storage", str(root / "studies")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return {"dir": root / "studies" / "smoke", "env": env, "proc": proc}
