"""``results.parquet``: one row per trial and evaluation, written as results arrive.

:class:`ResultsTable` keeps the rows in memory and rewrites the whole file atomically (temporary file
+ ``os.replace``) after every new row and status change, so a crash of the driver loses no reported
evaluation and a reader never sees a half-written file. The driver attaches Tune's checkpoint path to a
row without a rewrite of its own (it follows with the trial's next row or status, or at the end of the
study: the whole-table rewrite costs O(rows), bench/cluster_sim.py), so a crash can lose the checkpoint
path of a running trial's last row; its checkpoint itself is in Tune's experiment, which a resume uses.

A study resumed with ``--resume`` loads the existing file and
keeps its rows; a row is identified by ``(trial_id, epoch)`` and a re-report of the same evaluation
(a resumed trial re-reporting its last checkpoint) replaces the row instead of duplicating it.

Columns (``docs/interfaces.md``): ``trial_id``, ``param.<dotted.key>`` for every searched key (the value
the trial ran with; null where a conditional parameter does not apply), ``epoch``, every reported
metric (``train_loss``, ``val_*``, ``test_*``...), ``protocol`` (the probes' protocol of that evaluation,
``fast`` or ``exact``; docs/probes.md), ``leaked``, ``status`` (``running`` while the trial
runs, then ``completed``, ``pruned`` (stopped early by ASHA) or ``error``), ``checkpoint_path``,
``wall_s`` (seconds of the trial's training since it first started, summed over restarts),
``compute_s`` (``wall_s`` x number of workers: worker-seconds), ``seed`` (``training.seed``),
``store_fingerprint``, ``git_commit``, ``versions`` (JSON: python, torch, ray, optuna, brainage_core).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["ResultsTable", "STATUSES", "git_commit", "package_versions", "FIXED_COLUMNS", "pareto_front",
           "write_pareto"]

STATUSES = ("running", "completed", "pruned", "error")
FIXED_COLUMNS = ("trial_id", "epoch", "leaked", "status", "checkpoint_path", "wall_s", "compute_s", "seed",
                 "store_fingerprint", "git_commit", "versions")


def git_commit(repo: str | Path | None = None) -> str:
    """The HEAD commit of the repository holding this code (``-dirty`` when tracked files changed), or
    ``unknown`` outside a git checkout."""
    where = str(repo or Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def package_versions() -> str:
    """JSON text of the versions that matter for reproducing a trial (read from the installed package
    metadata: the driver never needs to import torch)."""
    from importlib.metadata import PackageNotFoundError, version

    import brainage_core

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "unknown"

    return json.dumps({"python": platform.python_version(), "torch": installed("torch"), "ray": installed("ray"),
                       "optuna": installed("optuna"), "brainage_core": brainage_core.__version__}, sort_keys=True)


class ResultsTable:
    """The rows of ``results.parquet`` and their atomic writer.

    ``static``: columns equal for every row (seed excluded: it is per trial), e.g. store_fingerprint,
    git_commit, versions. ``param_keys``: the searched dotted keys (column order). ``on_write``: called
    after every rewrite of the file (e.g. publishing it to an object store).
    """

    def __init__(self, path: str | Path, *, param_keys: list[str], static: Mapping[str, Any], resume: bool,
                 on_write: Callable[[], None] | None = None):
        self.path = Path(path)
        self.on_write = on_write
        self.param_keys = list(param_keys)
        self.static = dict(static)
        self.rows: dict[tuple[str, int], dict[str, Any]] = {}
        self.dirty = False  # a change not written yet (set_checkpoint(write=False))
        if resume and self.path.exists():
            for row in pd.read_parquet(self.path).to_dict("records"):
                self.rows[(str(row["trial_id"]), int(row["epoch"]))] = row

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, trial_id: str, params: Mapping[str, Any], metrics: Mapping[str, Any], *, seed: int,
            status: str = "running") -> dict[str, Any]:
        """Add (or replace) the row of one evaluation and rewrite the file. ``metrics`` must hold ``epoch``."""
        row: dict[str, Any] = {"trial_id": trial_id}
        for key in self.param_keys:
            row[f"param.{key}"] = params.get(key)
        row["epoch"] = int(metrics["epoch"])
        for key, value in metrics.items():
            if key in ("epoch", "trial_id") or key.startswith("param."):
                continue
            row[key] = value
        row.setdefault("leaked", False)
        row["status"] = status
        row.setdefault("checkpoint_path", None)
        row["seed"] = seed
        row.update(self.static)
        self.rows[(trial_id, row["epoch"])] = row
        self.write()
        return row

    def set_checkpoint(self, trial_id: str, checkpoint_path: str, *, write: bool = True) -> None:
        """Attach a checkpoint path to the trial's latest row that has none. ``write=False``: the file gets
        it at the next write (:meth:`add`, :meth:`set_status`, :meth:`flush`)."""
        mine = [k for k in self.rows if k[0] == trial_id]
        if mine:
            row = self.rows[max(mine, key=lambda k: k[1])]
            if not row.get("checkpoint_path"):
                row["checkpoint_path"] = checkpoint_path
                if write:
                    self.write()
                else:
                    self.dirty = True

    def flush(self) -> None:
        """Write the file if a change is not in it yet."""
        if self.dirty:
            self.write()

    def set_status(self, trial_id: str, status: str) -> None:
        """Set the status of every row of one trial."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r}: expected one of {', '.join(STATUSES)}")
        changed = False
        for (tid, _), row in self.rows.items():
            if tid == trial_id and row["status"] != status:
                row["status"] = status
                changed = True
        if changed:
            self.write()

    def trial_ids(self) -> set[str]:
        return {k[0] for k in self.rows}

    def frame(self) -> pd.DataFrame:
        rows = sorted(self.rows.values(), key=lambda r: (str(r["trial_id"]), int(r["epoch"])))
        df = pd.DataFrame(rows)
        if df.empty:
            return df
        first = ["trial_id", *[f"param.{k}" for k in self.param_keys], "epoch"]
        last = [c for c in FIXED_COLUMNS if c not in first]
        metrics = sorted(c for c in df.columns if c not in first and c not in last)
        return df[[c for c in first + metrics + last if c in df.columns]]

    def write(self) -> None:
        df = self.frame()
        if df.empty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        df.to_parquet(tmp, index=False)
        os.replace(tmp, self.path)
        self.dirty = False
        if self.on_write is not None:
            self.on_write()


def pareto_front(df: pd.DataFrame, objectives: list[str] | tuple[str, ...],
                 modes: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """The non-dominated trials of a multi-objective study.

    Candidates: the last evaluation of each ``completed`` trial (pruned trials did not train the full
    budget) with every objective finite. A trial is dominated when another is at least as good on every
    objective and strictly better on one (``mode`` min: lower is better). Sorted by the first objective.
    """
    if df is None or df.empty:
        return pd.DataFrame()
    done = df[df["status"] == "completed"].sort_values("epoch").groupby("trial_id", sort=False).tail(1)
    done = done.dropna(subset=list(objectives))
    signs = [1.0 if m == "min" else -1.0 for m in modes]
    values = [[sign * float(row[o]) for o, sign in zip(objectives, signs)] for _, row in done.iterrows()]
    keep = []
    for i, a in enumerate(values):
        dominated = any(all(b_k <= a_k for a_k, b_k in zip(a, b)) and any(b_k < a_k for a_k, b_k in zip(a, b))
                        for j, b in enumerate(values) if j != i)
        keep.append(not dominated)
    front = done[keep].sort_values(list(objectives), ascending=[m == "min" for m in modes])
    return front.reset_index(drop=True)


def write_pareto(study_dir: str | Path, df: pd.DataFrame, objectives: list[str] | tuple[str, ...],
                 modes: list[str] | tuple[str, ...], *,
                 on_write: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Write ``pareto.csv`` and ``pareto.parquet`` (the :func:`pareto_front` rows) into the study folder;
    ``on_write(file name)`` is called after each file is in place (e.g. publishing it to an object store)."""
    front = pareto_front(df, objectives, modes)
    study_dir = Path(study_dir)
    for name, writer in (("pareto.parquet", lambda t: front.to_parquet(t, index=False)),
                         ("pareto.csv", lambda t: front.to_csv(t, index=False))):
        tmp = study_dir / f".{name}.tmp-{os.getpid()}"
        writer(tmp)
        os.replace(tmp, study_dir / name)
        if on_write is not None:
            on_write(name)
    return front
