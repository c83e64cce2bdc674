"""Session-wide test settings shared by every test module.

Ray's CI settings from ray-notes.md are set before anything imports Ray; torch runs single-threaded
so that tests behave the same on the 2-core CI machine whatever else is running.
"""

from __future__ import annotations

import os
import sys
import warnings

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
