"""Run a hyper-parameter study: ``python study/run.py SPACE.yaml [a.b=c ...] [--name N] [--storage DIR] [--resume]``.

The study folder is ``<storage>/<name>/`` (``--storage`` defaults to ``./studies``, ``--name`` to the
YAML's file stem, so ``--resume`` finds a study by the same command). It holds ``space.yaml`` (the
input), ``config.yaml`` (the resolved configuration: base experiment, search block, study settings,
overrides), ``optuna.db`` (the Optuna study, sqlite), ``results.parquet`` (one row per trial and
evaluation, see :mod:`study.results`), ``tune/`` (Ray Tune's experiment folder: trial folders,
TensorBoard logs, in-trial checkpoints), ``train_runs/`` (the Ray Train runs of DDP trials and their
checkpoints) and ``trials/<trial id>/`` (each trial's metrics.jsonl and train_log.jsonl).

Flow: validate the YAML (:mod:`study.space`), prepare the data store once
(``brainage_core.data.sources.resolve_store``), start Ray (:mod:`study.ray_runtime`), run Tune with
Optuna + ASHA (:mod:`study.searcher`) over the trainable of :mod:`study.trial`, writing
``results.parquet`` from a driver callback and printing a progress table.

``--resume`` restores Tune's experiment (unfinished and errored trials resume from their checkpoints,
finished ones are not re-run) with the same Optuna storage; the existing ``results.parquet`` rows are
kept.

Clusters (``docs/cluster.md``, :mod:`study.cluster`): ``--address ADDR`` (or ``RAY_ADDRESS``) joins an
existing Ray cluster, ships the project's code with the job (``--code ship``, default) and checks at start
that every node sees the study folder and the prepared store; ``optuna.db`` then lives on the driver's
local disk and a snapshot is copied into the study folder at each result (or ``--optuna-storage URL``,
e.g. PostgreSQL, shared by several drivers). ``--submit`` runs the same command as a Ray Job (dashboard
Jobs view) and follows its logs. ``--dashboard-host`` other than loopback prints a warning; with
``RAY_AUTH_MODE=disabled`` it is refused unless ``--i-understand-no-auth``.

Object stores (``--storage s3://bucket/prefix`` or ``gs://...``, :mod:`study.storage`): checked at start
(a marker is written, read back and deleted: one ConfigError naming the URI otherwise, before anything
is written). The driver writes config.yaml, space.yaml, results.parquet and pareto.* into a local mirror
(``$BRAINAGE_CACHE/studies/<hash>/<name>``) and uploads each after every write; optuna.db is a sqlite in
that mirror whose snapshot is uploaded at each result; Tune's experiment (``tune/``) and the DDP trials'
Train runs (``train_runs/``) are written by Ray straight to the URI; trials train in a node-local folder
and upload metrics.jsonl / train_log.jsonl to ``trials/<id>/``. ``--resume`` downloads config.yaml,
results.parquet and optuna.db first and restores Tune from the URI. Credentials and endpoints come from
the usual environment (AWS_*, GOOGLE_*, GCS_*), forwarded to every trial.

Multi-objective studies (``study.objectives``) write their Pareto set to ``pareto.csv`` and
``pareto.parquet`` (see :func:`study.results.pareto_front`).

Test-only hook: ``BRAINAGE_FAULT_KILL_DRIVER_AFTER_RESULTS=n`` makes the driver SIGKILL itself after
writing its n-th result row (simulates a crashed driver; never set it in real runs).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from brainage_core.config import config_differences
from brainage_core.errors import BrainageError, ConfigError, DataError
from study.space import SearchSpace, load_search_space
from study.storage import StudyFolder, is_uri, join_location

__all__ = ["main", "run_study", "StudyCallback", "FAULT_KILL_DRIVER_AFTER_RESULTS"]

FAULT_KILL_DRIVER_AFTER_RESULTS = "BRAINAGE_FAULT_KILL_DRIVER_AFTER_RESULTS"
#: each trial process is reused for the next trial: no new process, no re-import of torch and Ray
#: (bench/study_overhead.py). DDP trials only where study.train_run can abort a stopped trial's Train run
#: (reusing a trial blocked in TorchTrainer.fit() made the next trial fail, ray-notes.md).
REUSE_ACTORS = True
#: environment variables forwarded to every trial and worker (job-level runtime_env)
FORWARDED_ENV_PREFIXES = ("BRAINAGE_", "OPENBHB_ROOT", "RAY_TRAIN_ENABLE_STATE_TRACKING")
#: forwarded too when the study folder is on an object store: credentials, endpoints, regions
CLOUD_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_")
#: the driver's progress table: printed at most this often (seconds; and once, whole, at the end) ...
PROGRESS_TABLE_EVERY_S = 30.0
#: ... showing the best this many trials
PROGRESS_TABLE_ROWS = 20


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python study/run.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("space", help="search-space YAML (see search_spaces/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides a.b=c (study.* keys set the study block)")
    p.add_argument("--name", help="study name (default: the YAML's file stem)")
    p.add_argument("--storage", default="studies", help="folder holding the studies, or s3://bucket/prefix / "
                                                         "gs://bucket/prefix (default: ./studies)")
    p.add_argument("--resume", action="store_true", help="continue the killed or interrupted study of that name")
    p.add_argument("--address", help="join an existing Ray cluster (default: $RAY_ADDRESS; with --submit: the "
                                     "dashboard's http://HEAD:8265)")
    p.add_argument("--submit", action="store_true", help="submit the study as a Ray Job and follow its logs")
    p.add_argument("--code", choices=("ship", "installed"), default="ship",
                   help="how the project's code reaches cluster nodes: ship it with the job (runtime_env "
                        "py_modules, default) or rely on the package installed on every node")
    p.add_argument("--optuna-storage", help="Optuna RDB URL shared by several drivers (e.g. postgresql://...); "
                                            "default: sqlite optuna.db in the study folder")
    p.add_argument("--dashboard-host", default="127.0.0.1",
                   help="interface of the dashboard of a Ray started here (default 127.0.0.1)")
    p.add_argument("--i-understand-no-auth", action="store_true",
                   help="allow RAY_AUTH_MODE=disabled with a dashboard reachable from the network")
    p.add_argument("--job-python", default="python", help="--submit: the interpreter of the job on the head node")
    return p.parse_intermixed_args(argv)


def resolved_config(space: SearchSpace, overrides: Sequence[str]) -> dict[str, Any]:
    """What ``config.yaml`` holds."""
    search = {k: v for k, v in (yaml.safe_load(Path(space.source).read_text()) or {}).get("search", {}).items()}
    return {**space.config.to_dict(), "search": search, "study": space.study.to_dict(), "overrides": list(overrides)}


def _check_folder(folder: StudyFolder, space_path: Path, config: dict[str, Any], resume: bool) -> None:
    """Check the folder against ``--resume`` without writing into it (a remote folder: ``--resume`` first
    downloads config.yaml, results.parquet and optuna.db into its local mirror). ``--resume`` also checks
    that results.parquet, when there is one, is readable (before Ray starts)."""
    study_dir = folder.local
    config_path = study_dir / "config.yaml"
    where = folder.child("config.yaml")
    if resume:
        if not folder.exists("config.yaml"):
            raise ConfigError(f"--resume: no study in {folder.location} (no config.yaml): run without --resume first")
        if folder.is_remote:
            folder.clear_mirror()
            for rel in ("config.yaml", "space.yaml", "results.parquet", "optuna.db"):
                folder.download(rel)
        try:
            before = yaml.safe_load(config_path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"--resume: {where} is unreadable ({' '.join(str(exc).split())[:160]}); expected the "
                              "config.yaml the study wrote") from None
        if before != config:
            changed = [key for key, _, _ in config_differences(before, config)]
            raise ConfigError(f"--resume: {space_path} and overrides differ from {where} at "
                              f"{', '.join(changed[:5])}: expected the command that started the study")
        results = study_dir / "results.parquet"
        if results.exists():
            import pandas as pd

            try:
                pd.read_parquet(results)
            except Exception as exc:  # pyarrow raises several types
                raise DataError(
                    f"--resume: {folder.child('results.parquet')} is unreadable ({type(exc).__name__}: "
                    f"{' '.join(str(exc).split())[:160]}); expected the study's results table: restore it from a "
                    "backup, or move it away to resume with an empty table"
                ) from None
        return
    if folder.exists("tune") or folder.exists("config.yaml"):
        raise ConfigError(f"study folder {folder.location} already holds a study: add --resume to continue it, or "
                          f"choose another --name / --storage")


def _write_folder(folder: StudyFolder, space_path: Path, config: dict[str, Any]) -> None:
    """Write space.yaml / config.yaml of a new study (a remote folder: into its mirror, then uploaded).
    Called only once everything that can be validated before Ray starts has been (the data store too)."""
    study_dir = folder.local
    folder.clear_mirror()  # a stale mirror of an earlier study of that URI
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
        (study_dir / "space.yaml").write_text(space_path.read_text())
        (study_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    except OSError as exc:
        raise ConfigError(f"study folder {folder.location}: cannot write ({exc.strerror}: {exc.filename}); expected a "
                          "writable --storage") from None
    folder.upload("space.yaml")
    folder.upload("config.yaml")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


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


def _make_callback_class():
    from ray.tune import Callback

    class StudyCallbackImpl(Callback):
        """Driver-side: results.parquet rows, trial statuses, the progress table, the driver fault hook.

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

        @_guard_writes
        def setup(self, **info: Any) -> None:
            from brainage_core.data.store import open_store
            from study.results import ResultsTable, git_commit, package_versions

            static = {"store_fingerprint": open_store(self.store_path).fingerprint, "git_commit": git_commit(),
                      "versions": package_versions()}
            self.table = ResultsTable(Path(self.study_dir) / "results.parquet", param_keys=self.space.keys,
                                      static=static, resume=True,
                                      on_write=functools.partial(self.folder.upload, "results.parquet"))
            self.written = 0
            self.started = time.time()
            self.table_printed = 0.0

        def _params(self, trial: Any) -> dict[str, Any]:
            return self.space.overrides(trial.config)

        @_guard_writes
        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            if "epoch" not in result:
                return
            from ray.tune.result import AUTO_RESULT_KEYS

            metrics = {k: v for k, v in result.items()
                       if k not in AUTO_RESULT_KEYS and k not in ("config", "done", "should_checkpoint")
                       and not isinstance(v, dict | list)}
            path = metrics.get("checkpoint_path")
            if isinstance(path, str) and path:  # a DDP trial's Train checkpoint: Ray's path has no scheme
                metrics["checkpoint_path"] = self.folder.uri_of(path)
            seed = int(self.space.trial_dict(trial.config).get("training", {}).get("seed", 0) or 0)
            self.table.add(trial.trial_id, self._params(trial), metrics, seed=seed)
            self.written += 1
            self.sync_optuna()
            st = self.space.study
            best = self._best()
            print(f"[study] trial {trial.trial_id} epoch {result['epoch']}/{self.space.config.training.epochs} "
                  f"{st.objective}={_fmt(result.get(st.objective))} | best {_fmt(best[1])} (trial {best[0]}) | "
                  f"{len(self.table)} rows, {time.time() - self.started:.0f} s", flush=True)
            limit = os.environ.get(FAULT_KILL_DRIVER_AFTER_RESULTS)
            if limit and self.written >= int(limit):
                print(f"[study] test fault hook: killing the driver after {self.written} results", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        @_guard_writes
        def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
            from study.trial import checkpoint_location

            # Tune calls this right after on_trial_result: the path reaches the file with the trial's next row
            # or status (or at the end), not by a second rewrite of the whole table per result
            self.table.set_checkpoint(trial.trial_id, checkpoint_location(checkpoint), write=False)

        @_guard_writes
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            from study.searcher import EARLY_STOPPED

            self.table.set_status(trial.trial_id, "pruned" if trial.trial_id in EARLY_STOPPED else "completed")
            self.print_table(trials)
            self.sync_optuna()
            if self.space.study.multi_objective:
                from study.results import write_pareto

                st = self.space.study
                write_pareto(self.study_dir, self.table.frame(), st.objectives, st.modes, on_write=self.folder.upload)

        def sync_optuna(self) -> None:
            if self.optuna_copy:
                from study.cluster import copy_sqlite

                copy_sqlite(*self.optuna_copy)

        @_guard_writes
        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.table.set_status(trial.trial_id, "error")
            self.print_table(trials)

        def _best(self) -> tuple[str | None, float | None]:
            st = self.space.study
            best: tuple[str | None, float | None] = (None, None)
            for row in self.table.rows.values():
                v = row.get(st.objective)
                if v is None or (isinstance(v, float) and math.isnan(v)):
                    continue
                if best[1] is None or (v < best[1] if st.mode == "min" else v > best[1]):
                    best = (row["trial_id"], v)
            return best

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

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            if self.table is not None and len(self.table):
                self.table.flush()
                self.print_table(trials, final=True)

    return StudyCallbackImpl


def _fmt_pair(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(v) else (f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}")


def progress_table(df: Any, space: SearchSpace, max_rows: int | None = None) -> str:
    """One line per trial: status, last epoch, parameters, the last evaluation's validation MAEs next to
    their constant baselines and BAcc next to chance (``4.1/9.3``: model/baseline, when the results have
    them), last and best objective; best trial marked. ``max_rows``: only the best that many trials, then
    a line saying how many more there are."""
    st = space.study
    if df is None or len(df) == 0:
        return "[study] no results yet"
    lines = []
    pairs = [(m, b) for m, b in (("val_mae_int", "val_mae_int_const"), ("val_mae_ext", "val_mae_ext_const"),
                                 ("val_bacc", "val_bacc_chance")) if m in df.columns and b in df.columns]
    header = ["trial", "status", "epoch", *space.keys, *[f"{m[4:]}/{'chance' if 'bacc' in m else 'const'}"
                                                           for m, _ in pairs], st.objective, f"best {st.objective}"]
    rows = []
    best_trial, best_value = None, None
    for trial_id, g in df.groupby("trial_id", sort=False):
        g = g.sort_values("epoch")
        values = g[st.objective].dropna()
        trial_best = (values.min() if st.mode == "min" else values.max()) if len(values) else None
        last = g.iloc[-1]
        rows.append([trial_id, last["status"], last["epoch"], *[last.get(f"param.{k}") for k in space.keys],
                     *[f"{_fmt_pair(last.get(m))}/{_fmt_pair(last.get(b))}" for m, b in pairs],
                     last.get(st.objective), trial_best])
        if trial_best is not None and (best_value is None or (trial_best < best_value if st.mode == "min"
                                                              else trial_best > best_value)):
            best_trial, best_value = trial_id, trial_best
    sign = 1 if st.mode == "min" else -1
    rows.sort(key=lambda r: (r[-1] is None, sign * r[-1] if r[-1] is not None else 0.0))  # leaderboard order
    done = sum(1 for r in rows if r[1] in ("completed", "pruned"))
    hidden = len(rows) - max_rows if max_rows is not None and len(rows) > max_rows else 0
    if hidden:
        rows = rows[:max_rows]
    cells = [header] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, r in enumerate(cells):
        mark = " *" if i and rows[i - 1][0] == best_trial else ""
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + mark)
    if hidden:
        lines.append(f"... {hidden} more trial(s): every row is in results.parquet")
    return (f"[study] {done}/{st.num_samples} trials done; best {st.objective} = {_fmt(best_value)} "
            f"(trial {best_trial}, marked *)\n" + "\n".join(lines))


def StudyCallback(study_dir: str, space: SearchSpace, store_path: str,  # noqa: N802 - a class factory
                  optuna_copy: tuple[str, str] | None = None):
    """The driver callback (a ``ray.tune.Callback``; built lazily so importing this module needs no Ray)."""
    return _make_callback_class()(study_dir, space, store_path, optuna_copy)


def _forwarded_env(cloud: bool = False) -> dict[str, str]:
    """The environment every trial and worker gets; ``cloud``: also the object-store credentials and
    endpoints (:data:`CLOUD_ENV_PREFIXES`; visible in the job's runtime_env on the dashboard)."""
    prefixes = FORWARDED_ENV_PREFIXES + (CLOUD_ENV_PREFIXES if cloud else ())
    return {k: v for k, v in os.environ.items() if k.startswith(prefixes) and k != FAULT_KILL_DRIVER_AFTER_RESULTS}


def _local_space(space_path: str | Path) -> Path:
    """The search-space YAML as a local file: a URI (``--submit`` stages it in the bucket) is downloaded
    into the cache, keeping its file name."""
    if not is_uri(space_path):
        return Path(space_path)
    from brainage_core.data.sources import cache_dir_of

    base, _, query = str(space_path).partition("?")
    parent, _, file_name = base.rpartition("/")
    target = cache_dir_of() / "studies" / ".jobs" / file_name
    if StudyFolder(f"{parent}?{query}" if query else parent).download(file_name, target) is None:
        raise ConfigError(f"{space_path}: no such search-space YAML on the object store")
    return target


def run_study(space_path: str | Path, overrides: Sequence[str] = (), *, name: str | None = None,
              storage: str | Path = "studies", resume: bool = False, address: str | None = None,
              code: str = "ship", optuna_storage: str | None = None, dashboard_host: str = "127.0.0.1",
              allow_no_auth: bool = False) -> Path:
    """Run (or resume) a study; returns the study folder. Errors on bad input are BrainageError.

    ``address`` (else ``$RAY_ADDRESS``): an existing Ray cluster (see the module docstring)."""
    from study.cluster import check_dashboard_exposure, code_runtime_env, inside_ray_job

    for warning in check_dashboard_exposure(dashboard_host, allow_no_auth=allow_no_auth):
        print(warning, file=sys.stderr, flush=True)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if inside_ray_job():
        # Tune's TensorBoard logger imports torch late; in a job's driver, loading libtorch_cpu after Ray's
        # libraries failed ("oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"). Loading it first works.
        import torch  # noqa: F401
    space_path = _local_space(space_path)
    space = load_search_space(space_path, overrides)
    name = name or space_path.stem
    folder = StudyFolder(join_location(str(storage), name))
    if folder.is_remote:
        folder.check_writable()  # before anything is written
    study_dir = folder.local  # where the driver writes (a remote folder: its local mirror)
    config = resolved_config(space, overrides)
    _check_folder(folder, space_path, config, resume)

    from brainage_core.data.sources import resolve_store

    print(f"[study] {name}: {space.study.num_samples} trials ({space.study.searcher}), objective "
          f"{space.study.objective} ({space.study.mode}); folder {folder.location}", flush=True)
    store = resolve_store(space.config.data, progress=True)  # bad data fails here: nothing written yet
    print(f"[study] data store {store.path} (fingerprint {store.fingerprint})", flush=True)
    if not resume:
        _write_folder(folder, space_path, config)

    import ray
    from ray import tune

    from study.ray_runtime import start_ray
    from study.searcher import build_scheduler, build_searcher, optuna_storage_url
    from study.train_run import reuse_supported
    from study.trial import TrialSpec, run_trial

    st = space.study
    in_job = inside_ray_job()  # a submitted job already carries its runtime_env (code, env vars)
    info = start_ray(st.resources, st.max_concurrent_trials, env=None if in_job else _forwarded_env(folder.is_remote),
                     address=address, dashboard_host=dashboard_host,
                     runtime_env=code_runtime_env(code) if address and not in_job else None)
    if st.resources.use_gpu and not ray.cluster_resources().get("GPU"):
        raise ConfigError(f"{space_path}: study.resources.use_gpu = true but the Ray cluster has no GPU: expected "
                          f"a GPU machine, or study.resources.use_gpu=false training.device=cpu")
    where = f"bound to {dashboard_host}" if info.started_here else "the cluster's dashboard"
    print(f"[study] Ray dashboard: {info.dashboard_url or 'unavailable'} ({where}); {info.auth}", flush=True)
    optuna_copy = None
    storage_url = optuna_storage
    if address and not info.started_here:
        from study.cluster import check_store_on_every_node, check_visible_on_every_node, copy_sqlite, local_optuna_db

        nodes = check_visible_on_every_node(folder.location, what="study folder")
        check_store_on_every_node(store.path, store.fingerprint)
        print(f"[study] cluster {address}: {len(nodes)} node(s) see the study folder and the store", flush=True)
        if storage_url is None and not folder.is_remote:
            # sqlite must not live on network storage: the driver's local disk, copied at each result
            local_db = local_optuna_db(study_dir)
            local_db.parent.mkdir(parents=True, exist_ok=True)
            if resume and not local_db.exists() and (study_dir / "optuna.db").exists():
                copy_sqlite(study_dir / "optuna.db", local_db)
            elif not resume:
                local_db.unlink(missing_ok=True)
            storage_url = f"sqlite:///{local_db}"
            optuna_copy = (str(local_db), str(study_dir / "optuna.db"))
    if folder.is_remote and storage_url is None:
        # the mirror's sqlite (local disk, downloaded by --resume); a snapshot is uploaded at each result
        storage_url = f"sqlite:///{study_dir / 'optuna.db'}"
        optuna_copy = (str(study_dir / "optuna.db"), folder.child("optuna.db"))
    print(f"[study] Optuna dashboard: optuna-dashboard {storage_url or optuna_storage_url(study_dir)}", flush=True)
    print(f"[study] TensorBoard: tensorboard --logdir {folder.child('tune')}", flush=True)

    spec = TrialSpec(space=space, study_dir=folder.location, store_path=str(store.path))
    trainable = tune.with_parameters(run_trial, spec=spec)
    res = st.resources
    if res.num_workers > 1:
        trial_resources = {"cpu": 1}
    else:
        trial_resources = {"cpu": res.cpus_per_worker, "gpu": 1 if res.use_gpu else 0}
    trainable = tune.with_resources(trainable, trial_resources)
    concurrency = st.max_concurrent_trials
    if res.num_workers > 1:  # Tune sees only the trial's own CPU, not its Train workers (docs/cluster.md)
        from study.cluster import ddp_trials_that_fit

        fits = ddp_trials_that_fit(res.num_workers, res.use_gpu, res.cpus_per_worker, ray.cluster_resources())
        if concurrency > fits:
            print(f"[study] study.max_concurrent_trials = {concurrency}, but the cluster fits {fits} trials of "
                  f"{res.num_workers} workers at once: running {fits} at a time", flush=True)
            concurrency = fits
    tune_dir = folder.child("tune")
    _no_retry_on_input_errors()
    INPUT_ERRORS.clear()
    WRITE_ERRORS.clear()
    try:
        if resume and tune.Tuner.can_restore(tune_dir):
            tuner = tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=build_searcher(space, study_dir, name,
                                                                      storage_url=storage_url),
                                            scheduler=build_scheduler(space), num_samples=st.num_samples,
                                            max_concurrent_trials=concurrency,
                                            reuse_actors=REUSE_ACTORS and (res.num_workers == 1 or reuse_supported())),
                run_config=tune.RunConfig(
                    name="tune", storage_path=folder.location,
                    # DDP trials already restart their worker group (Train's FailureConfig); one Tune-level
                    # retry covers the trial process itself, so failures do not multiply.
                    failure_config=tune.FailureConfig(
                        max_failures=min(1, st.max_failures) if res.num_workers > 1 else st.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=st.checkpoints_to_keep,
                                                            checkpoint_score_attribute=st.objective,
                                                            checkpoint_score_order=st.mode),
                    callbacks=[StudyCallback(folder.location, space, str(store.path), optuna_copy)],
                    stop=DoomedStudyStopper(st.num_samples),
                    verbose=0,
                ),
            )
        try:
            results = tuner.fit()
        except Exception as exc:
            if not WRITE_ERRORS and not isinstance(exc, OSError):
                raise
            reason = WRITE_ERRORS[0] if WRITE_ERRORS else f"{exc.strerror or exc}: {exc.filename}"
            raise StudyFailed(_unwritable(folder, reason)) from None
    finally:
        if info.connected_here:  # also a joined cluster: disconnecting stops the forwarded worker logs, so
            ray.shutdown()       # that nothing is printed after the study's last line
    if WRITE_ERRORS:
        raise StudyFailed(_unwritable(folder, WRITE_ERRORS[0]))
    if optuna_copy:
        from study.cluster import copy_sqlite

        copy_sqlite(*optuna_copy)
    if st.multi_objective and (study_dir / "results.parquet").exists():
        import pandas as pd

        from study.results import write_pareto

        front = write_pareto(study_dir, pd.read_parquet(study_dir / "results.parquet"), st.objectives, st.modes,
                             on_write=folder.upload)
        print(f"[study] Pareto set ({', '.join(st.objectives)}): {len(front)} trial(s) in "
              f"{folder.child('pareto.csv')}", flush=True)
    errors = [r for r in results if r.error is not None]
    for r in errors:
        print(f"[study] failed trial in {r.path}: {_cause(r.error)}", file=sys.stderr, flush=True)
    if not _has_results(study_dir / "results.parquet"):
        causes = list(dict.fromkeys(_cause(r.error) for r in errors))
        cause = causes[0] if causes else "no trial reported an evaluation"
        more = f" (+{len(causes) - 1} other cause(s) above)" if len(causes) > 1 else ""
        raise StudyFailed(f"study {name}: no trial produced a result ({len(errors)} of {len(results)} trial(s) "
                          f"failed); cause: {cause}{more}")
    print(f"[study] done: {folder.child('results.parquet')}; {len(errors)} trial(s) failed", flush=True)
    return study_dir


def _unwritable(folder: StudyFolder, reason: str) -> str:
    return (f"study folder {folder.location} became unwritable ({reason}): the study was stopped; the rows written "
            "before are in results.parquet; make the folder writable and continue with --resume")


class StudyFailed(RuntimeError):
    """No trial of the study produced a result; ``str()`` is the one-line cause."""


#: OSErrors met writing the study folder from the driver callback (driver-process registry)
WRITE_ERRORS: list[str] = []

#: Tune trial id -> one-line cause of the deterministic error it failed with (driver-process registry,
#: filled by the patched ``Trial.handle_error``, read by :class:`DoomedStudyStopper`)
INPUT_ERRORS: dict[str, str] = {}


def _cause(error: BaseException | None) -> str:
    """One line saying why a trial failed: the deterministic cause when there is one, else the last
    line of Ray's error text (the exception raised in the trial)."""
    from study.trial import input_error_of, one_line

    cause = input_error_of(error)
    if cause is not None:
        return one_line(cause)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _has_results(path: Path) -> bool:
    if not path.exists():
        return False
    import pandas as pd

    try:
        return len(pd.read_parquet(path)) > 0
    except Exception:  # noqa: BLE001 - an unreadable table holds no usable result
        return False


def _no_retry_on_input_errors() -> None:
    """Make Tune not retry a trial that failed with a deterministic error (``study.trial.TrialInputError``):
    its ``max_failures`` becomes 0 as its error is recorded, before Tune decides on recovery (Ray 2.60 has no
    per-error retry setting). Other failures (a killed worker or trial process) are retried as configured.
    Idempotent; driver process only."""
    from ray.tune.experiment.trial import Trial

    from study.trial import input_error_of, one_line

    if getattr(Trial.handle_error, "_brainage_no_retry", False):
        return
    original = Trial.handle_error

    def handle_error(self: Any, exc: BaseException | None = None) -> None:
        original(self, exc)
        cause = input_error_of(exc)
        if cause is not None:
            self.max_failures = 0
            INPUT_ERRORS[self.trial_id] = one_line(cause)

    handle_error._brainage_no_retry = True  # type: ignore[attr-defined]
    Trial.handle_error = handle_error


def _make_stopper_class() -> type:
    from ray.tune import Stopper

    class DoomedStudyStopperImpl(Stopper):
        """Stops the whole study when it is doomed: no trial has reported a result and the same
        deterministic error ended 2 trials (or every trial of a 1-trial study), so that it does not
        depend on the sampled parameters."""

        def __init__(self, num_samples: int):
            self.needed = min(2, max(1, int(num_samples)))
            self.reported = False

        def __call__(self, trial_id: str, result: dict) -> bool:
            if "epoch" in result:
                self.reported = True
            return False

        def stop_all(self) -> bool:
            if WRITE_ERRORS:
                return True
            if self.reported or not INPUT_ERRORS:
                return False
            counts: dict[str, int] = {}
            for cause in INPUT_ERRORS.values():
                counts[cause] = counts.get(cause, 0) + 1
            if max(counts.values()) >= self.needed:
                print(f"[study] stopping: {max(counts.values())} trial(s) failed with the same error before any "
                      "result; the study cannot succeed", file=sys.stderr, flush=True)
                return True
            return False

    return DoomedStudyStopperImpl


def DoomedStudyStopper(num_samples: int):  # noqa: N802 - a class factory (Ray imported lazily)
    """The study's Tune ``Stopper`` (see ``_make_stopper_class``)."""
    return _make_stopper_class()(num_samples)


def _submit(args: argparse.Namespace) -> int:
    """``--submit``: validate here, then run the same study as a Ray Job on the cluster."""
    from urllib.parse import urlparse

    from study.cluster import check_dashboard_exposure, dashboard_url, submit_study

    url = dashboard_url(args.address or os.environ.get("RAY_ADDRESS"))
    for warning in check_dashboard_exposure(urlparse(url).hostname or "", allow_no_auth=args.i_understand_no_auth):
        print(warning, file=sys.stderr, flush=True)
    load_search_space(args.space, args.overrides)  # bad input fails here, before anything is submitted
    remote = is_uri(args.storage)
    run_args = [*args.overrides, "--name", args.name or Path(args.space).stem,
                "--storage", args.storage if remote else str(Path(args.storage).resolve()), "--code", args.code]
    if args.resume:
        run_args.append("--resume")
    if args.optuna_storage:
        run_args += ["--optuna-storage", args.optuna_storage]
    stage_dir = join_location(args.storage, ".jobs") if remote else Path(args.storage) / ".jobs"
    return submit_study(address=url, space_path=Path(args.space), stage_dir=stage_dir, run_args=run_args,
                        code=args.code, env=_forwarded_env(remote), python=args.job_python)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        if args.submit:
            return _submit(args)
        run_study(args.space, args.overrides, name=args.name, storage=args.storage, resume=args.resume,
                  address=args.address, code=args.code, optuna_storage=args.optuna_storage,
                  dashboard_host=args.dashboard_host, allow_no_auth=args.i_understand_no_auth)
    except BrainageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StudyFailed as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
