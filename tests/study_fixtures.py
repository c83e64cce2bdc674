"""Helpers of the study tests: a trained study folder without Ray, RAMP rows, the module's test Ray.

:func:`trained_study` trains tiny models (resnet18, base width 4, 6 mm grid) with the project's own
training loop and writes the study folder as the runner does (``config.yaml``, ``results.parquet``
through ``study.results.ResultsTable``, one checkpoint folder per evaluation), so that the export reads
real checkpoints and real metrics in a few seconds. :func:`full_grid_store` prepares a handful of
full-grid synthetic subjects (one row of the kit's width is 14.6 MB: keep them few).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import yaml

from brainage_core.data.prepare import prepare
from brainage_core.data.synthetic import generate_cohort

#: folder whose ``sitecustomize.py`` installs the test fault hooks (``fault_site/fault_hooks.py``) in a process
FAULT_SITE = Path(__file__).resolve().parent / "fault_site"


def fault_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with :data:`FAULT_SITE` first on ``PYTHONPATH``: a process started with it honours the
    ``BRAINAGE_FAULT_*`` variables of ``fault_hooks``."""
    rest = env.get("PYTHONPATH")
    return {**env, "PYTHONPATH": os.pathsep.join([str(FAULT_SITE), *([rest] if rest else [])])}


#: the folders of a BRAINAGE_CACHE that hold synthetic cohorts and prepared stores (and their locks)
STORE_CACHE_PARTS = ("cohorts", "stores", "locks")


def shared_store_cache(cache: Path, shared: Path) -> Path:
    """``cache`` (a new BRAINAGE_CACHE folder) whose ``cohorts/``, ``stores/`` and ``locks/`` are links to
    ``shared`` (the session's :func:`conftest.store_cache`); returns ``cache``.

    The synthetic cohort of a configuration is then generated and prepared once for the whole test
    session (the first study that asks for it, under the store's file lock; the others open it), instead
    of once per test: ~10-25 s each on 2 cores, most of it building the anatomy templates. Everything
    else a study keeps in its cache (Optuna databases, study mirrors, downloaded checkpoints) stays in
    ``cache``, the test's own."""
    cache.mkdir(parents=True, exist_ok=True)
    for part in STORE_CACHE_PARTS:
        (shared / part).mkdir(parents=True, exist_ok=True)
        link = cache / part
        if not link.exists():
            link.symlink_to(shared / part, target_is_directory=True)
    return cache


def start_test_ray() -> str:
    """Start the local Ray that a test module's studies join (RAY_ADDRESS); returns its GCS address.

    Started like a study's local Ray (``study.ray_runtime.local_ray_init``: loopback only, Train state
    tracking on). 4 logical CPUs on 2 cores (a DDP trial holds 1 + 2 workers), dashboard on (Ray 2.60 left
    stopped trials' CPUs reserved without it), a small object store. Its processes start with
    :data:`FAULT_SITE` on their path, so trials honour a study's ``BRAINAGE_FAULT_*`` variables. The caller
    shuts it down (``ray.shutdown()``)."""
    import ray

    from study.ray_runtime import local_ray_init

    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = fault_env(dict(os.environ))["PYTHONPATH"]
    try:  # the raylet and every worker it starts inherit this environment
        local_ray_init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                       object_store_memory=200 * 2**20, logging_level=logging.WARNING)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    return ray.get_runtime_context().gcs_address


def small_store(root: Path, *, subjects: int = 30, sites: int = 4, seed: int = 0) -> Path:
    """A 6 mm synthetic store (openbhb layout) under ``root``."""
    generate_cohort(root / "cohort6", subjects=subjects, sites=sites, grid="6mm", seed=seed, progress=False)
    prepare(root / "cohort6", layout="openbhb", out=root / "store6", grid="6mm", progress=False)
    return root / "store6"


def experiment_config(store: Path, *, temperature: float, epochs: int = 2, augment: dict | None = None) -> dict:
    """A tiny yaware experiment; ``augment``: ``training.augment`` options (default: all off)."""
    return {
        "data": {"store": str(store), "grid": "6mm"},
        "model": {"backbone": "resnet18", "base_width": 4},
        "loss": {"method": "yaware", "kernel": "rbf", "sigma": 5.0, "temperature": temperature},
        "optimizer": {"name": "adam", "lr": 1.0e-3, "weight_decay": 0.0},
        "schedule": {"name": "none"},
        "training": {"epochs": epochs, "batch_size": 6, "views": 2, "loader_workers": 0, "device": "cpu", "seed": 0,
                     "augment": {"crop": False, "cutout": False, "zscore": False, **(augment or {})}},
        "evaluation": {"eval_every": 1, "batch_size": 12, "val_internal_frac": 0.15, "val_external_frac": 0.2},
    }


def trained_study(
    folder: Path, store: Path, *, temperatures: tuple[float, ...] = (0.1, 0.5), epochs: int = 2,
    augment: dict | None = None,
) -> Path:
    """Train one trial per temperature (``augment``: ``training.augment`` options) and write the study folder."""
    from brainage_core.training import train
    from study.results import ResultsTable

    folder.mkdir(parents=True, exist_ok=True)
    base = experiment_config(store, temperature=temperatures[0], epochs=epochs, augment=augment)
    (folder / "config.yaml").write_text(
        yaml.safe_dump({**base, "search": {"loss.temperature": {"loguniform": [0.05, 1.0]}}, "study": {}})
    )
    table = ResultsTable(folder / "results.parquet", param_keys=["loss.temperature"],
                         static={"store_fingerprint": "", "git_commit": "test", "versions": "{}"}, resume=False)
    for i, temperature in enumerate(temperatures):
        trial = f"trial{i}"

        def keep(metrics: dict, checkpoint_dir: Path | None, trial: str = trial, temperature: float = temperature):
            row = table.add(trial, {"loss.temperature": temperature}, metrics, seed=0)
            if checkpoint_dir is not None:
                kept = folder / "checkpoints" / trial / f"epoch{row['epoch']}"
                shutil.copytree(checkpoint_dir, kept)
                table.set_checkpoint(trial, str(kept))

        config = experiment_config(store, temperature=temperature, epochs=epochs, augment=augment)
        train(config, folder / "runs" / trial, callback=keep)
        table.set_status(trial, "completed")
    table.flush()  # the study's end: the journal folded into results.parquet
    return folder


def full_grid_store(root: Path, *, subjects: int = 5, sites: int = 2) -> Path:
    """A full-grid synthetic store (train, internal and external rows) under ``root``."""
    generate_cohort(root / "cohort_full", subjects=subjects, sites=sites, grid="full", seed=1, progress=False)
    prepare(root / "cohort_full", layout="openbhb", out=root / "store_full", progress=False)
    return root / "store_full"
