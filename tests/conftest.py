"""Session-wide test settings shared by every test module.

Ray's CI settings from ray-notes.md are set before anything imports Ray; torch runs single-threaded
so that tests behave the same on the 2-core CI machine whatever else is running.
"""

from __future__ import annotations

import os

for _key, _value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "OMP_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

torch.set_num_threads(1)
