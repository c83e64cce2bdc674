"""``results.parquet``: one row per trial and evaluation, written as results arrive.

:class:`ResultsTable` keeps the rows in memory. Every change (a new row, a trial's status, a checkpoint
path) is appended at once as one JSON line to the journal ``results.journal.jsonl`` beside the table; the
whole table is rewritten atomically (temporary file + ``os.replace``) at most every
:data:`COMPACT_EVERY_S` seconds and at the end of the study, and the journal is then emptied. A crash of
the driver therefore loses no reported evaluation (the journal has it), a reader never sees a half-written
table, and the driver's cost per result is one short append instead of an O(rows) rewrite
(bench/cluster_sim.py, docs/cluster-sim.md). Journal operations are idempotent, so a crash between the
rewrite and the emptying replays operations the table already holds, to the same result.

:func:`read_results` is how every reader (``--resume``, ``final``, ``export``, ``analysis``) opens a
study's results: the table with the journal replayed over it. A study killed mid-run can be analysed as
it is; ``--resume`` folds the journal into the table. ``pd.read_parquet`` alone sees the table as of its
last rewrite (at most :data:`COMPACT_EVERY_S` behind a running study).

A study resumed with ``--resume`` loads the existing rows and keeps them; a row is identified by
``(trial_id, epoch)`` and a re-report of the same evaluation (a resumed trial re-reporting its last
checkpoint) replaces the row instead of duplicating it.

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
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from brainage_core.errors import DataError

__all__ = ["ResultsTable", "STATUSES", "git_commit", "package_versions", "FIXED_COLUMNS", "pareto_front",
           "write_pareto", "read_results", "journal_path", "COMPACT_EVERY_S"]

STATUSES = ("running", "completed", "pruned", "error")
FIXED_COLUMNS = ("trial_id", "epoch", "leaked", "status", "checkpoint_path", "wall_s", "compute_s", "seed",
                 "store_fingerprint", "git_commit", "versions")
#: at most this many seconds between two rewrites of ``results.parquet`` while a study runs
COMPACT_EVERY_S = 10.0
JOURNAL_SUFFIX = ".journal.jsonl"


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


def journal_path(path: str | Path) -> Path:
    """The journal beside a results table: ``results.parquet`` -> ``results.journal.jsonl``."""
    path = Path(path)
    return path.with_name(path.stem + JOURNAL_SUFFIX)


def _json_value(value: Any) -> Any:
    """JSON for the numpy scalars and arrays a metric may be."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} {value!r} is not a results-table value")


Row = dict[str, Any]
Key = tuple[str, int]


def _apply(rows: dict[Key, Row], op: Mapping[str, Any]) -> None:
    """One journal operation on ``rows`` (idempotent: applying it twice gives the same rows)."""
    kind = op["op"]
    if kind == "row":
        row = dict(op["row"])
        rows[(str(row["trial_id"]), int(row["epoch"]))] = row
    elif kind == "status":
        for (tid, _), row in rows.items():
            if tid == op["trial_id"]:
                row["status"] = op["status"]
    elif kind == "checkpoint":
        row = rows.get((op["trial_id"], int(op["epoch"])))
        if row is not None and not row.get("checkpoint_path"):
            row["checkpoint_path"] = op["path"]
    else:
        raise ValueError(f"unknown journal operation {kind!r}")


def _read_rows(path: Path) -> dict[Key, Row]:
    """The rows of the table at ``path`` with its journal replayed; raises DataError naming the file at fault."""
    rows: dict[Key, Row] = {}
    if path.exists():
        try:
            records = pd.read_parquet(path).to_dict("records")
        except Exception as exc:  # pyarrow raises several unrelated types
            raise DataError(f"{path} is not a readable parquet table ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:160]}); expected the study's results table") from None
        missing = [c for c in ("trial_id", "epoch") if records and c not in records[0]]
        if missing:
            raise DataError(f"{path} lacks the column(s) {', '.join(missing)}; expected one row per trial × "
                            "evaluation")
        for row in records:
            rows[(str(row["trial_id"]), int(row["epoch"]))] = row
    journal = journal_path(path)
    if journal.exists():
        lines = journal.read_text().split("\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                _apply(rows, json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:
                if number == len(lines):  # the driver died while appending it: that change was never made
                    break
                raise DataError(f"{journal}, line {number}: not a results-journal operation ({exc}); expected "
                                "one JSON object per line, written by study/run.py") from None
    return rows


def read_results(path: str | Path) -> pd.DataFrame:
    """The results of a study: the table at ``path`` (``<study>/results.parquet``) with its journal replayed,
    one row per trial and evaluation in the table's column order. Raises DataError when neither exists,
    when one is unreadable or when they hold no row."""
    path = Path(path)
    if not path.exists() and not journal_path(path).exists():
        raise DataError(f"{path} not found; expected the study's results table (has any trial reported yet?)")
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path} holds no row; expected one row per trial × evaluation (has any trial reported "
                        "yet?)")
    return _frame(rows.values())


def _frame(rows: Iterable[Row], param_keys: Sequence[str] | None = None) -> pd.DataFrame:
    rows = sorted(rows, key=lambda r: (str(r["trial_id"]), int(r["epoch"])))
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    params = ([f"param.{k}" for k in param_keys] if param_keys is not None
              else [c for c in df.columns if c.startswith("param.")])
    first = ["trial_id", *params, "epoch"]
    last = [c for c in FIXED_COLUMNS if c not in first]
    metrics = sorted(c for c in df.columns if c not in first and c not in last)
    return df[[c for c in first + metrics + last if c in df.columns]]


class ResultsTable:
    """The rows of ``results.parquet``, their journal and their atomic writer (see the module docstring).

    ``static``: columns equal for every row (seed excluded: it is per trial), e.g. store_fingerprint,
    git_commit, versions. ``param_keys``: the searched dotted keys (column order). ``on_write(name)``: called
    with the file name after every write of the table or the journal (e.g. publishing it to an object store).
    ``compact_every_s``: the longest time between two rewrites of the table (0: after every change; None:
    :data:`COMPACT_EVERY_S`, read when the table is made).
    """

    def __init__(self, path: str | Path, *, param_keys: list[str], static: Mapping[str, Any], resume: bool,
                 on_write: Callable[[str], None] | None = None, compact_every_s: float | None = None):
        self.path = Path(path)
        self.journal = journal_path(self.path)
        self.on_write = on_write
        self.param_keys = list(param_keys)
        self.static = dict(static)
        self.compact_every_s = COMPACT_EVERY_S if compact_every_s is None else compact_every_s
        self.rows: dict[Key, Row] = _read_rows(self.path) if resume else {}
        self.pending = 0  # journal operations not in the table yet
        self.compacted_at = time.monotonic()
        if self.journal.exists() and self.journal.stat().st_size:  # the previous driver's last changes
            if not resume:
                raise DataError(f"{self.journal} holds changes of an earlier run of this study: expected a resume "
                                "(--resume), or the study folder moved away")
            self.compact()

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, trial_id: str, params: Mapping[str, Any], metrics: Mapping[str, Any], *, seed: int,
            status: str = "running") -> Row:
        """Add (or replace) the row of one evaluation. ``metrics`` must hold ``epoch``."""
        row: Row = {"trial_id": trial_id}
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
        self._record({"op": "row", "row": row})
        return self.rows[(trial_id, row["epoch"])]

    def set_checkpoint(self, trial_id: str, checkpoint_path: str) -> None:
        """Attach a checkpoint path to the trial's latest row that has none."""
        mine = [k for k in self.rows if k[0] == trial_id]
        if mine:
            epoch = max(mine, key=lambda k: k[1])[1]
            if not self.rows[(trial_id, epoch)].get("checkpoint_path"):
                self._record({"op": "checkpoint", "trial_id": trial_id, "epoch": epoch, "path": checkpoint_path})

    def set_status(self, trial_id: str, status: str) -> None:
        """Set the status of every row of one trial."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r}: expected one of {', '.join(STATUSES)}")
        if any(tid == trial_id and row["status"] != status for (tid, _), row in self.rows.items()):
            self._record({"op": "status", "trial_id": trial_id, "status": status})

    def flush(self) -> None:
        """Fold the journal into the table now (the end of a study)."""
        if self.pending:
            self.compact()

    def trial_ids(self) -> set[str]:
        return {k[0] for k in self.rows}

    def frame(self) -> pd.DataFrame:
        return _frame(self.rows.values(), self.param_keys)

    def _record(self, op: dict[str, Any]) -> None:
        _apply(self.rows, op)
        self.pending += 1
        if time.monotonic() - self.compacted_at >= self.compact_every_s:
            self.compact()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(op, default=_json_value, allow_nan=True) + "\n"
        with open(self.journal, "a", encoding="utf-8") as f:  # one write() per line: a crash tears the last only
            f.write(line)
        if self.on_write is not None:
            self.on_write(self.journal.name)

    def compact(self) -> None:
        """Rewrite the table atomically with every row, then empty the journal."""
        df = self.frame()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not df.empty:
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            df.to_parquet(tmp, index=False)
            os.replace(tmp, self.path)
        self.journal.write_text("")  # emptied, not removed: a mirror on an object store gets the empty file
        self.pending = 0
        self.compacted_at = time.monotonic()
        if self.on_write is not None:
            if not df.empty:
                self.on_write(self.path.name)
            self.on_write(self.journal.name)


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
