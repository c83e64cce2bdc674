"""The study driver's Tune callback (:func:`StudyCallback`): what happens in the driver at each result.

- results persistence: one ``results.parquet`` row per trial and evaluation, trial statuses and
  checkpoint paths (:class:`study.results.ResultsTable`; a remote study folder: written in its local
  mirror and uploaded after each write), the Pareto set of a multi-objective study at each trial end;
- progress: one line per result, the progress table (:mod:`study.progress`);
- Optuna snapshots: on clusters and object stores the Optuna sqlite lives on the driver's disk and is
  copied into the study folder at each result (``optuna_copy``);
- finished trials: Tune's statistics of every result key but the objectives are dropped at a trial's
  end (~40 KB of driver memory per trial; :func:`study.compat.forget_metric_history`);
- write failures: an OSError writing the study folder is said once and recorded in
  :data:`study.failures.WRITE_ERRORS`, which stops the study (no traceback from inside Tune);
- after-result hooks: every function in :data:`AFTER_RESULT_HOOKS` is called as ``hook(written)`` once
  the driver has written its ``written``-th row. The library registers none; the tests supply a crashing
  driver this way (``tests/fault_site/fault_hooks.py``).

Ray is imported only when the callback is built, so importing this module needs no Ray.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from study.failures import WRITE_ERRORS
from study.progress import PROGRESS_TABLE_EVERY_S, PROGRESS_TABLE_ROWS, fmt, progress_table
from study.space import SearchSpace
from study.storage import StudyFolder

__all__ = ["AFTER_RESULT_HOOKS", "StudyCallback", "add_after_result_hook", "best_trial", "result_metrics"]

#: functions called as ``hook(written)`` after each result row the driver writes (see the module docstring)
AFTER_RESULT_HOOKS: list[Callable[[int], None]] = []


def add_after_result_hook(hook: Callable[[int], None]) -> Callable[[], None]:
    """Call ``hook(written)`` after every result row a study driver in this process writes (``written``:
    rows written by this driver so far, 1-based); returns a function that removes it."""
    AFTER_RESULT_HOOKS.append(hook)
    return lambda: AFTER_RESULT_HOOKS.remove(hook) if hook in AFTER_RESULT_HOOKS else None


def _after_result(written: int) -> None:
    # a module-level function: Tune pickles the callback class by value, and a restored study's callback
    # must see this process's hooks, not a copy of the list taken when the study started
    for hook in tuple(AFTER_RESULT_HOOKS):
        hook(written)


def result_metrics(result: dict[str, Any], folder: StudyFolder) -> dict[str, Any]:
    """The scalar metrics of a Tune result (Tune's own keys left out); a DDP trial's Train checkpoint
    path (Ray's has no scheme) becomes a location in ``folder``."""
    from ray.tune.result import AUTO_RESULT_KEYS

    metrics = {k: v for k, v in result.items()
               if k not in AUTO_RESULT_KEYS and k not in ("config", "done", "should_checkpoint")
               and not isinstance(v, dict | list)}
    path = metrics.get("checkpoint_path")
    if isinstance(path, str) and path:
        metrics["checkpoint_path"] = folder.uri_of(path)
    return metrics


def best_trial(rows: Any, objective: str, mode: str) -> tuple[str | None, float | None]:
    """``(trial id, value)`` of the best ``objective`` over the results-table rows (NaN and None skipped)."""
    best: tuple[str | None, float | None] = (None, None)
    for row in rows:
        v = row.get(objective)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        if best[1] is None or (v < best[1] if mode == "min" else v > best[1]):
            best = (row["trial_id"], v)
    return best


def _guard_writes(method):
    """Tune callback hook wrapper: an OSError writing the study folder (turned read-only, disk full) is
    recorded in :data:`WRITE_ERRORS` and said once, instead of a traceback from inside Tune; the study's
    stopper then ends the study (``run_study`` raises one line)."""

    @functools.wraps(method)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except OSError as exc:
            if not WRITE_ERRORS:
                print(f"[study] cannot write the study folder ({exc.strerror or exc}: {exc.filename}): stopping the "
                      "study", file=sys.stderr, flush=True)
            WRITE_ERRORS.append(f"{exc.strerror or exc}: {exc.filename}")
            return None

    return guarded


class _OptunaSnapshots:
    """The callback's Optuna snapshots: on clusters and object stores, the driver-local sqlite copied
    into the study folder (``optuna_copy``: (sqlite the study writes, where its snapshot goes), or None)."""

    optuna_copy: tuple[str, str] | None

    def sync_optuna(self) -> None:
        if self.optuna_copy:
            from study.cluster import copy_sqlite

            copy_sqlite(*self.optuna_copy)


class _FinishedTrials:
    """What the callback drops of a finished trial: Tune's statistics of its result keys other than the
    objectives, ~40 KB of driver memory per trial (:func:`study.compat.forget_metric_history`)."""

    space: SearchSpace

    def forget_metric_history(self, trial: Any) -> None:
        from study.compat import forget_metric_history

        st = self.space.study
        forget_metric_history(trial, {st.objective, *st.objectives})


class _ProgressLines:
    """The callback's progress output: one line per result and, at most every
    :data:`~study.progress.PROGRESS_TABLE_EVERY_S`, the progress table (whole at the end)."""

    space: SearchSpace
    table: Any
    started: float
    table_printed: float

    def print_result(self, trial: Any, result: dict) -> None:
        st = self.space.study
        best = best_trial(self.table.rows.values(), st.objective, st.mode)
        print(f"[study] trial {trial.trial_id} epoch {result['epoch']}/{self.space.config.training.epochs} "
              f"{st.objective}={fmt(result.get(st.objective))} | best {fmt(best[1])} (trial {best[0]}) | "
              f"{len(self.table)} rows, {time.time() - self.started:.0f} s", flush=True)

    def print_table(self, trials: list, *, final: bool = False) -> None:
        # every PROGRESS_TABLE_EVERY_S at most, the best PROGRESS_TABLE_ROWS: printed at every trial end,
        # the whole table made a 500-trial study's driver spend a quarter of its time on it
        # (bench/cluster_sim.py) and wrote O(trials^2) lines to its log
        now = time.time()
        if not final and now - self.table_printed < PROGRESS_TABLE_EVERY_S:
            return
        self.table_printed = now
        print(progress_table(self.table.frame(), self.space, max_rows=None if final else PROGRESS_TABLE_ROWS),
              flush=True)


def _make_callback_class():
    from ray.tune import Callback

    class StudyCallbackImpl(_ProgressLines, _OptunaSnapshots, _FinishedTrials, Callback):
        """Driver-side: results.parquet rows, trial statuses, the after-result hooks; the progress lines,
        the Optuna snapshots and what a finished trial leaves behind come from the three mixins.

        Holds only picklable settings (Tune pickles callbacks into its experiment); the table and the
        static columns are (re)built in ``setup``, so a restored study continues the existing file.
        ``study_dir`` may be a URI: the files are written in its local mirror and uploaded after each write.
        """

        def __init__(self, study_dir: str, space: SearchSpace, store_path: str,
                     optuna_copy: tuple[str, str] | None = None):
            self.folder = StudyFolder(study_dir)
            self.study_dir = str(self.folder.local)
            self.space = space
            self.store_path = store_path
            self.optuna_copy = optuna_copy  # (driver-local sqlite, copy in the study folder) on clusters
            self.table = None
            self.written = 0
            self.started = time.time()
            self.table_printed = 0.0

        # -- results persistence ---------------------------------------------------------------------

        @_guard_writes
        def setup(self, **info: Any) -> None:
            from brainage_core.data.store import open_store
            from study.results import ResultsTable, git_commit, package_versions

            static = {"store_fingerprint": open_store(self.store_path).fingerprint, "git_commit": git_commit(),
                      "versions": package_versions()}
            self.table = ResultsTable(Path(self.study_dir) / "results.parquet", param_keys=self.space.keys,
                                      static=static, resume=True,
                                      on_write=self.folder.upload)
            self.written = 0
            self.started = time.time()
            self.table_printed = 0.0

        @_guard_writes
        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            if "epoch" not in result:
                return
            seed = int(self.space.trial_dict(trial.config).get("training", {}).get("seed", 0) or 0)
            self.table.add(trial.trial_id, self.space.overrides(trial.config), result_metrics(result, self.folder),
                           seed=seed)
            self.written += 1
            self.sync_optuna()
            self.print_result(trial, result)
            _after_result(self.written)

        @_guard_writes
        def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
            from study.trial import checkpoint_location

            self.table.set_checkpoint(trial.trial_id, checkpoint_location(checkpoint))

        @_guard_writes
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            from study.searcher import EARLY_STOPPED

            self.table.set_status(trial.trial_id, "pruned" if trial.trial_id in EARLY_STOPPED else "completed")
            self.forget_metric_history(trial)
            self.print_table(trials)
            self.sync_optuna()
            if self.space.study.multi_objective:
                from study.results import write_pareto

                st = self.space.study
                write_pareto(self.study_dir, self.table.frame(), st.objectives, st.modes, on_write=self.folder.upload)

        @_guard_writes
        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.table.set_status(trial.trial_id, "error")
            self.forget_metric_history(trial)
            self.print_table(trials)

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            if self.table is not None and len(self.table):
                self.table.flush()
                self.print_table(trials, final=True)

    return StudyCallbackImpl


def StudyCallback(study_dir: str, space: SearchSpace, store_path: str,  # noqa: N802 - a class factory
                  optuna_copy: tuple[str, str] | None = None):
    """The driver callback (a ``ray.tune.Callback``; built lazily so importing this module needs no Ray)."""
    return _make_callback_class()(study_dir, space, store_path, optuna_copy)
