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

Where the pieces live: opening the study (YAML, folder, store; all before Ray) in :mod:`study.opening`,
the driver callback (results.parquet, progress, Optuna snapshots, after-result hooks) in
:mod:`study.callback`, the progress table in :mod:`study.progress`, how a study fails (error registries,
the doomed-study stopper, one-line causes) in :mod:`study.failures`; this module starts Ray, chooses the
Optuna storage, builds the Tuner and reports the end.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from brainage_core.errors import BrainageError, ConfigError
from study.callback import StudyCallback
from study.failures import (
    INPUT_ERRORS,
    WRITE_ERRORS,
    DoomedStudyStopper,
    StudyFailed,
    cause_of,
    has_results,
    no_retry_on_input_errors,
    unwritable,
)
from study.opening import Study, open_study, resolved_config, write_folder
from study.progress import progress_table
from study.space import load_search_space
from study.storage import StudyFolder, is_uri, join_location

__all__ = ["main", "run_study", "DoomedStudyStopper", "StudyCallback", "StudyFailed", "progress_table",
           "resolved_config"]

# the names the tests reach through this module (they live in study.failures and study.opening)
_cause, _no_retry_on_input_errors, _unwritable = cause_of, no_retry_on_input_errors, unwritable
_write_folder = write_folder

#: each trial process is reused for the next trial: no new process, no re-import of torch and Ray
#: (bench/study_overhead.py). DDP trials only where study.train_run can abort a stopped trial's Train run
#: (reusing a trial blocked in TorchTrainer.fit() made the next trial fail, ray-notes.md).
REUSE_ACTORS = True
#: the driver's environment while Tune runs a study with ``study.tune_loggers: false``: Tune's documented
#: switch for its automatic JSON / CSV / TensorBoard logger callbacks
TUNE_LOGGERS_OFF = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
#: the logger of Tune's ResultGrid, which warns once per trial that it found no result.json / progress.csv:
#: with the loggers off there are none by design (every row is in results.parquet)
RESULT_GRID_LOGGER = "ray.tune.analysis.experiment_analysis"
#: environment variables forwarded to every trial and worker (job-level runtime_env)
FORWARDED_ENV_PREFIXES = ("BRAINAGE_", "OPENBHB_ROOT", "RAY_TRAIN_ENABLE_STATE_TRACKING")
#: forwarded too when the study folder is on an object store: credentials, endpoints, regions
CLOUD_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_")


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
    p.add_argument("--optuna-storage", help="Optuna RDB URL shared by several drivers (e.g. postgresql://...), or "
                                            "journal:PATH, an Optuna journal file (faster for hundreds of trials); "
                                            "default: sqlite optuna.db in the study folder")
    p.add_argument("--dashboard-host", default="127.0.0.1",
                   help="interface of the dashboard of a Ray started here (default 127.0.0.1)")
    p.add_argument("--i-understand-no-auth", action="store_true",
                   help="allow RAY_AUTH_MODE=disabled with a dashboard reachable from the network")
    p.add_argument("--job-python", default="python", help="--submit: the interpreter of the job on the head node")
    return p.parse_intermixed_args(argv)


def _forwarded_env(cloud: bool = False) -> dict[str, str]:
    """The environment every trial and worker gets; ``cloud``: also the object-store credentials and
    endpoints (:data:`CLOUD_ENV_PREFIXES`; visible in the job's runtime_env on the dashboard)."""
    prefixes = FORWARDED_ENV_PREFIXES + (CLOUD_ENV_PREFIXES if cloud else ())
    return {k: v for k, v in os.environ.items() if k.startswith(prefixes)}


def run_study(space_path: str | Path, overrides: Sequence[str] = (), *, name: str | None = None,
              storage: str | Path = "studies", resume: bool = False, address: str | None = None,
              code: str = "ship", optuna_storage: str | None = None, dashboard_host: str = "127.0.0.1",
              allow_no_auth: bool = False) -> Path:
    """Run (or resume) a study; returns the study folder. Errors on bad input are BrainageError.

    ``address`` (else ``$RAY_ADDRESS``): an existing Ray cluster (see the module docstring)."""
    from study.cluster import check_dashboard_exposure, inside_ray_job

    for warning in check_dashboard_exposure(dashboard_host, allow_no_auth=allow_no_auth):
        print(warning, file=sys.stderr, flush=True)
    if optuna_storage is not None:
        from study.searcher import JOURNAL_PREFIX, journal_path

        journal = journal_path(optuna_storage)  # checked before anything is written; absolute for the workers
        optuna_storage = optuna_storage if journal is None else f"{JOURNAL_PREFIX}{journal}"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if inside_ray_job():
        # Tune's TensorBoard logger imports torch late; in a job's driver, loading libtorch_cpu after Ray's
        # libraries failed ("oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"). Loading it first works.
        import torch  # noqa: F401
    study = open_study(space_path, overrides, name=name, storage=storage, resume=resume)

    import ray

    info = _start_ray(study, address=address, code=code, dashboard_host=dashboard_host)
    storage_url, optuna_copy = _optuna_storage(study, info, address=address, optuna_storage=optuna_storage)
    from study.searcher import dashboard_target, optuna_storage_url

    dashboard = dashboard_target(storage_url or optuna_storage_url(study.study_dir))
    print(f"[study] Optuna dashboard: optuna-dashboard {dashboard}", flush=True)
    if study.space.study.tune_loggers:
        print(f"[study] TensorBoard: tensorboard --logdir {study.folder.child('tune')}", flush=True)
    trainable, concurrency = _trainable(study)
    no_retry_on_input_errors()
    INPUT_ERRORS.clear()
    WRITE_ERRORS.clear()
    try:
        from study.ray_runtime import environment

        loggers_off = not study.space.study.tune_loggers
        with environment(TUNE_LOGGERS_OFF if loggers_off else {}), _no_missing_metrics_warning(loggers_off):
            results = _fit(_tuner(study, trainable, concurrency, storage_url, optuna_copy), study.folder)
    finally:
        if info.connected_here:  # also a joined cluster: disconnecting stops the forwarded worker logs, so
            ray.shutdown()       # that nothing is printed after the study's last line
    return _finish(study, results, optuna_copy)


def _start_ray(study: Study, *, address: str | None, code: str, dashboard_host: str) -> Any:
    """Start (or join) Ray with the study's resources (:mod:`study.ray_runtime`) and check its GPUs;
    returns the ``RayInfo``."""
    import ray

    from study.cluster import code_runtime_env, inside_ray_job
    from study.ray_runtime import start_ray

    st = study.space.study
    in_job = inside_ray_job()  # a submitted job already carries its runtime_env (code, env vars)
    info = start_ray(st.resources, st.max_concurrent_trials,
                     env=None if in_job else _forwarded_env(study.folder.is_remote),
                     address=address, dashboard_host=dashboard_host,
                     runtime_env=code_runtime_env(code) if address and not in_job else None)
    if st.resources.use_gpu and not ray.cluster_resources().get("GPU"):
        raise ConfigError(f"{study.space_path}: study.resources.use_gpu = true but the Ray cluster has no GPU: "
                          f"expected a GPU machine, or study.resources.use_gpu=false training.device=cpu")
    where = f"bound to {dashboard_host}" if info.started_here else "the cluster's dashboard"
    print(f"[study] Ray dashboard: {info.dashboard_url or 'unavailable'} ({where}); {info.auth}", flush=True)
    return info


def _optuna_storage(study: Study, info: Any, *, address: str | None,
                    optuna_storage: str | None) -> tuple[str | None, tuple[str, str] | None]:
    """``(storage URL, optuna_copy)`` for the study's topology. A local study: ``--optuna-storage`` or
    None (the searcher's sqlite in the study folder). A joined cluster: every node must see the study
    folder and the store; a sqlite on the driver's local disk (not on network storage), copied into the
    study folder at each result. A remote study folder: the mirror's sqlite (downloaded by --resume),
    uploaded at each result. ``optuna_copy``: (sqlite the study writes, where its snapshot goes)."""
    folder, study_dir = study.folder, study.study_dir
    optuna_copy = None
    storage_url = optuna_storage
    if address and not info.started_here:
        from study.cluster import check_store_on_every_node, check_visible_on_every_node, copy_sqlite, local_optuna_db

        nodes = check_visible_on_every_node(folder.location, what="study folder")
        check_store_on_every_node(study.store.path, study.store.fingerprint)
        print(f"[study] cluster {address}: {len(nodes)} node(s) see the study folder and the store", flush=True)
        if storage_url is None and not folder.is_remote:
            local_db = local_optuna_db(study_dir)
            local_db.parent.mkdir(parents=True, exist_ok=True)
            if study.resume and not local_db.exists() and (study_dir / "optuna.db").exists():
                copy_sqlite(study_dir / "optuna.db", local_db)
            elif not study.resume:
                local_db.unlink(missing_ok=True)
            storage_url = f"sqlite:///{local_db}"
            optuna_copy = (str(local_db), str(study_dir / "optuna.db"))
    if folder.is_remote and storage_url is None:
        storage_url = f"sqlite:///{study_dir / 'optuna.db'}"
        optuna_copy = (str(study_dir / "optuna.db"), folder.child("optuna.db"))
    return storage_url, optuna_copy


def _trainable(study: Study) -> tuple[Any, int]:
    """The Tune trainable (:func:`study.trial.run_trial` with its resources) and the trials run at once
    (``study.max_concurrent_trials``, fewer when the cluster fits fewer DDP trials)."""
    import ray
    from ray import tune

    from study.trial import TrialSpec, run_trial

    spec = TrialSpec(space=study.space, study_dir=study.folder.location, store_path=str(study.store.path))
    trainable = tune.with_parameters(run_trial, spec=spec)
    st = study.space.study
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
    return trainable, concurrency


def _tuner(study: Study, trainable: Any, concurrency: int, storage_url: str | None,
           optuna_copy: tuple[str, str] | None) -> Any:
    """A new study's Tuner (Optuna searcher, ASHA, the driver callback, the doomed-study stopper), or
    with ``--resume`` the restored one (unfinished and errored trials resume from their checkpoints)."""
    from ray import tune

    from study.searcher import build_scheduler, build_searcher
    from study.train_run import reuse_supported

    space, folder, st = study.space, study.folder, study.space.study
    res = st.resources
    tune_dir = folder.child("tune")
    if study.resume and tune.Tuner.can_restore(tune_dir):
        return tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=build_searcher(space, study.study_dir, study.name,
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
            callbacks=[StudyCallback(folder.location, space, str(study.store.path), optuna_copy)],
            stop=DoomedStudyStopper(st.num_samples),
            verbose=0,
        ),
    )


class _MissingMetricsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to fetch metrics for")


@contextlib.contextmanager
def _no_missing_metrics_warning(active: bool) -> Iterator[None]:
    """While the block runs (``active``: ``study.tune_loggers: false``), drop the ResultGrid's warning that
    each trial has no result.json / progress.csv: without Tune's loggers that is the expected state."""
    if not active:
        yield
        return
    log, only = logging.getLogger(RESULT_GRID_LOGGER), _MissingMetricsFilter()
    log.addFilter(only)
    try:
        yield
    finally:
        log.removeFilter(only)


def _fit(tuner: Any, folder: StudyFolder) -> Any:
    """``tuner.fit()``; the study folder turning unwritable becomes one StudyFailed line."""
    try:
        return tuner.fit()
    except Exception as exc:
        if not WRITE_ERRORS and not isinstance(exc, OSError):
            raise
        reason = WRITE_ERRORS[0] if WRITE_ERRORS else f"{exc.strerror or exc}: {exc.filename}"
        raise StudyFailed(unwritable(folder, reason)) from None


def _finish(study: Study, results: Any, optuna_copy: tuple[str, str] | None) -> Path:
    """After Tune: the last Optuna snapshot, the Pareto set, the failed trials; StudyFailed when the
    folder became unwritable or no trial produced a result. Returns the study folder."""
    folder, study_dir, st = study.folder, study.study_dir, study.space.study
    if WRITE_ERRORS:
        raise StudyFailed(unwritable(folder, WRITE_ERRORS[0]))
    if optuna_copy:
        from study.cluster import copy_sqlite

        copy_sqlite(*optuna_copy)
    if st.multi_objective and has_results(study_dir / "results.parquet"):
        from study.results import read_results, write_pareto

        front = write_pareto(study_dir, read_results(study_dir / "results.parquet"), st.objectives, st.modes,
                             on_write=folder.upload)
        print(f"[study] Pareto set ({', '.join(st.objectives)}): {len(front)} trial(s) in "
              f"{folder.child('pareto.csv')}", flush=True)
    errors = [r for r in results if r.error is not None]
    for r in errors:
        print(f"[study] failed trial in {r.path}: {cause_of(r.error)}", file=sys.stderr, flush=True)
    if not has_results(study_dir / "results.parquet"):
        causes = list(dict.fromkeys(cause_of(r.error) for r in errors))
        cause = causes[0] if causes else "no trial reported an evaluation"
        more = f" (+{len(causes) - 1} other cause(s) above)" if len(causes) > 1 else ""
        raise StudyFailed(f"study {study.name}: no trial produced a result ({len(errors)} of {len(results)} "
                          f"trial(s) failed); cause: {cause}{more}")
    print(f"[study] done: {folder.child('results.parquet')}; {len(errors)} trial(s) failed", flush=True)
    return study_dir


def _submit(args: argparse.Namespace) -> int:
    """``--submit``: validate here, then run the same study as a Ray Job on the cluster."""
    from urllib.parse import urlparse

    from study.cluster import check_dashboard_exposure, dashboard_url
    from study.jobs import submit_study

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
