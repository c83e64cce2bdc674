"""The Tune trainable of a study: thin shells around ``brainage_core.training.train``.

One Tune function trial per sampled configuration (``run_trial``):

- ``num_workers > 1``: the trial builds a Ray Train ``TorchTrainer`` and calls ``fit()`` (the Train V2
  pattern under Tune). Its Train run has a stable name (``trial_<tune trial id>``) under an absolute
  storage path (``<study>/train_runs``), so a trial restarted after a driver crash finds its run's
  checkpoints and resumes. DDP over ``num_workers`` workers, gloo on CPU, NCCL on GPU. Every worker
  runs :func:`train_worker`, which calls ``train`` with a callback doing ``ray.train.report`` on every
  rank (rank 0 attaches the checkpoint folder). ``TuneReportCallback`` forwards rank 0's metrics to
  Tune (with ``checkpoint_path``). Worker deaths restart the worker group from the latest checkpoint
  (Train ``FailureConfig(max_failures)``), controller failures are bounded too.
- ``num_workers == 1``: the trial trains in its own process and reports with ``ray.tune.report``,
  attaching the same checkpoint folder; Tune's ``FailureConfig(max_failures)`` restarts a dead trial
  from its latest checkpoint (``ray.tune.get_checkpoint()``).

Both paths: metrics are reported at evaluation epochs only (``epoch`` is ASHA's time attribute), with
``compute_s = wall_s * num_workers`` added; a resumed trial whose training had already finished gets
its last metrics re-reported by ``train`` (nothing left to train), without copying the checkpoint
again (``checkpoint_path`` names the stored one). Checkpoint retention: ``checkpoints_to_keep`` best by
the objective (Train's / Tune's ``CheckpointConfig``; the latest is always kept as well).

Configuration and data errors (``BrainageError``) and a diverging run (``NonFiniteLossError``) are
deterministic: a trial that raises one fails once with :class:`TrialInputError` (one line: the cause),
which the driver does not retry (``study.run``), and a DDP trial's Train run does not restart its
workers for it (``study.train_run``). :func:`input_error_of` finds such a cause in any wrapper Ray puts
around it.

Study folders on object stores (``study_dir`` a URI, :mod:`study.storage`): Tune's and Train's storage
paths are URIs (Ray writes checkpoints through pyarrow), a restored checkpoint is downloaded
(``Checkpoint.to_directory``), ``train`` writes into a node-local work folder and the trial uploads its
metrics.jsonl / train_log.jsonl to ``<study>/trials/<id>/`` at every report; reported checkpoint paths
are URIs (:func:`checkpoint_location`).

Test hook (never set it in real runs): ``BRAINAGE_TEST_TRAIN_FN=module:function`` makes every trial and
Train worker call that function instead of ``brainage_core.training.train`` (same signature and
callback contract; :func:`training_function`). ``bench/cluster_sim.py`` injects its stand-in this way:
a realistic learning curve at a realistic pace, no model, through the runner's unchanged code path. A
function with a ``torch_backend`` attribute names the process-group backend its DDP trials need (the
stand-in's is gloo: it runs on fake GPUs, where NCCL cannot start).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study import compat
from study.space import SearchSpace
from study.storage import StudyFolder, is_uri, join_location

__all__ = ["TrialInputError", "input_error_of", "one_line", "TrialSpec", "run_trial", "train_worker",
           "trial_config_dict", "EXTRA_OVERRIDES", "NODE_ID", "checkpoint_location",
           "local_checkpoint_dir", "fetch_logs", "publish_logs", "training_function", "TRAIN_FN_ENV"]

CHECKPOINT_PATH = "checkpoint_path"
#: reported with every evaluation: the Ray node that ran the trial's training (rank 0 under DDP)
NODE_ID = "node_id"
#: key of a trial config holding {dotted key: value} set after the sampled parameters (study/final.py:
#: training.seed, training.train_on); Optuna never sees it
EXTRA_OVERRIDES = "_overrides"
#: test hook: "module:function" called instead of brainage_core.training.train (module docstring)
TRAIN_FN_ENV = "BRAINAGE_TEST_TRAIN_FN"


def training_function() -> Callable[..., Any]:
    """The function trials train with: ``brainage_core.training.train``, or the one the test hook
    :data:`TRAIN_FN_ENV` names. A bad hook value raises ConfigError naming the variable and value."""
    from brainage_core.errors import ConfigError

    target = os.environ.get(TRAIN_FN_ENV, "").strip() or "brainage_core.training:train"
    module_name, _, attr = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{TRAIN_FN_ENV}={target!r}: cannot load it ({exc}): expected module:function, "
                          f"importable on every node") from exc
    if not callable(fn):
        raise ConfigError(f"{TRAIN_FN_ENV}={target!r}: not a function: expected module:function")
    return fn


class TrialInputError(RuntimeError):
    """A trial failed for a deterministic reason (bad configuration or data, a non-finite loss): retrying
    it would fail the same way. ``str()`` is the one-line cause, ``ClassName: message``."""


def input_error_of(exc: BaseException | None) -> BaseException | None:
    """The configuration / data / non-finite-loss error behind ``exc``, or None.

    Looks through what Ray wraps a user error in: ``RayTaskError.cause``, Train's
    ``UserExceptionWithTraceback`` (``_base_exc``), ``WorkerGroupError.worker_failures`` (any rank) and
    the ``__cause__`` / ``__context__`` chain."""
    from brainage_core.errors import BrainageError, NonFiniteLossError

    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        inner = getattr(current, "cause", None)  # a RayTaskError (its class may derive from the cause's)
        if isinstance(inner, BaseException) and inner is not current:
            todo.insert(0, inner)
            continue
        if isinstance(current, TrialInputError | BrainageError | NonFiniteLossError):
            return current
        if not isinstance(current, BaseException):  # Tune's Result.error can be the error's text only
            continue
        todo += [getattr(current, "_base_exc", None), current.__cause__, current.__context__]
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            todo += [failures[k] for k in sorted(failures)]
    return None


def one_line(exc: BaseException) -> str:
    """``ClassName: message`` on one line (a TrialInputError: its message as is)."""
    if isinstance(exc, TrialInputError):
        return str(exc)
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"


@dataclass(frozen=True)
class TrialSpec:
    """What every trial of a study shares (passed with ``tune.with_parameters``)."""

    space: SearchSpace
    study_dir: str  # absolute
    store_path: str  # the prepared store, resolved once by the driver

    @property
    def train_storage(self) -> str:
        """Storage path of the Ray Train runs of DDP trials (a local path or a URI)."""
        return join_location(self.study_dir, "train_runs")

    def work_dir(self, trial_id: str) -> Path:
        """Where ``train`` writes metrics.jsonl, train_log.jsonl and its scratch checkpoint: the study's
        ``trials/<id>/`` for a local study; a node-local folder for a study on an object store (the logs
        are published to ``trials/<id>/`` there at every report, :func:`publish_logs`)."""
        if is_uri(self.study_dir):
            digest = hashlib.sha1(self.study_dir.encode()).hexdigest()[:16]
            return Path(tempfile.gettempdir()) / "brainage-study-trials" / digest / trial_id
        return Path(self.study_dir) / "trials" / trial_id

    def logs_location(self, trial_id: str) -> str | None:
        """Where a remote study keeps the trial's logs (``<study>/trials/<id>``); None for a local study."""
        return join_location(self.study_dir, f"trials/{trial_id}") if is_uri(self.study_dir) else None


#: the files of a trial's work folder published to a remote study's ``trials/<id>/``
PUBLISHED_LOGS = ("metrics.jsonl", "train_log.jsonl")


def fetch_logs(logs_location: str | None, work_dir: str | Path) -> None:
    """Before training: copy a remote study's published logs of this trial into its (node-local) work
    folder, so that a trial resumed on another node continues them (``train`` truncates them to the
    checkpoint's epoch). No-op for a local study."""
    if logs_location is None:
        return
    folder = StudyFolder(logs_location)
    for name in PUBLISHED_LOGS:
        folder.download(name, Path(work_dir) / name)


def publish_logs(logs_location: str | None, work_dir: str | Path) -> None:
    """Upload the trial's logs from its work folder to a remote study (one PUT each); no-op when local."""
    if logs_location is None:
        return
    folder = StudyFolder(logs_location)
    for name in PUBLISHED_LOGS:
        if (Path(work_dir) / name).exists():
            folder.upload(name, Path(work_dir) / name)


def checkpoint_location(checkpoint: Any) -> str:
    """A Ray checkpoint's location as ``results.parquet`` stores it: its local path, or a URI
    (``s3://bucket/...``) when it lives on an object store (Ray's ``path`` then has no scheme)."""
    fs_type = getattr(getattr(checkpoint, "filesystem", None), "type_name", "local")
    if fs_type in ("local", "mock"):
        return checkpoint.path
    scheme = {"gcs": "gs"}.get(fs_type, fs_type)
    return f"{scheme}://{checkpoint.path.lstrip('/')}"


def local_checkpoint_dir(checkpoint: Any) -> str:
    """A folder holding the files of a restored Ray checkpoint: read in place when it is a local folder,
    downloaded (``Checkpoint.to_directory``) when it lives on an object store."""
    return checkpoint.path if os.path.isdir(checkpoint.path) else checkpoint.to_directory()


def trial_config_dict(spec: TrialSpec, sampled: dict[str, Any]) -> dict[str, Any]:
    """The experiment dict of one trial: the base config, the sampled values, the driver's store."""
    d = spec.space.trial_dict(sampled)
    data = dict(d.get("data") or {})
    data.update(store=spec.store_path, source=None, synthetic=None)
    d["data"] = data
    for dotted, value in (sampled.get(EXTRA_OVERRIDES) or {}).items():
        node = d
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return d


def _device(spec: TrialSpec) -> str:
    return "cuda" if spec.space.study.resources.use_gpu else "cpu"


def _same_dir(a: Any, b: Any) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def run_trial(sampled: dict[str, Any], spec: TrialSpec) -> None:
    """The Tune function trainable (see the module docstring)."""
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    config = trial_config_dict(spec, sampled)
    try:
        if spec.space.study.resources.num_workers > 1:
            _run_torch_trainer(config, spec, trial_id)
        else:
            _run_in_trial(config, spec, trial_id)
    except Exception as exc:
        cause = input_error_of(exc)
        if cause is None:
            raise
        raise TrialInputError(one_line(cause)) from None


# --------------------------------------------------------------------------------------------------
# num_workers == 1: train inside the Tune trial
# --------------------------------------------------------------------------------------------------


def _run_in_trial(config: dict[str, Any], spec: TrialSpec, trial_id: str) -> None:
    import ray.tune
    from ray.tune import Checkpoint

    train = training_function()
    restored = ray.tune.get_checkpoint()
    resume_from = local_checkpoint_dir(restored) if restored is not None else None
    work_dir, logs_at = spec.work_dir(trial_id), spec.logs_location(trial_id)
    fetch_logs(logs_at, work_dir)
    node_id = ray.get_runtime_context().get_node_id()
    # Tune logs "Checkpoint successfully created at ..." at INFO for every report: the driver's progress
    # lines already say it, so keep the terminal to warnings.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("brainage_core").setLevel(logging.WARNING)

    def callback(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        payload = {**metrics, "compute_s": float(metrics.get("wall_s", 0.0)), NODE_ID: node_id}
        publish_logs(logs_at, work_dir)
        if checkpoint_dir is None or _same_dir(checkpoint_dir, resume_from):
            # A finished trial re-reporting its stored checkpoint: do not store it a second time.
            payload[CHECKPOINT_PATH] = checkpoint_location(restored) if restored is not None else None
            ray.tune.report(payload)
        else:
            ray.tune.report(payload, checkpoint=Checkpoint.from_directory(str(checkpoint_dir)))

    train(config, work_dir, callback=callback, rank=0, world_size=1, device=_device(spec),
          resume_from=resume_from)
    _drop_scratch_checkpoints(work_dir)


def _drop_scratch_checkpoints(work_dir: Path) -> None:
    """Remove train's own checkpoint folders once the trial has finished: every reported checkpoint was
    copied into Tune's / Train's storage (the ones a resume reads), so these would only triple the disk
    use (~400 MB each for a full-size ResNet-18 with Adam state)."""
    import shutil

    for path in Path(work_dir).glob("checkpoint*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# num_workers > 1: a TorchTrainer inside the Tune trial
# --------------------------------------------------------------------------------------------------


def _run_torch_trainer(config: dict[str, Any], spec: TrialSpec, trial_id: str) -> None:
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from study.train_run import (
        AbortOnStopFlag,
        LeanTorchTrainer,
        TuneReportUntilStopped,
        fit_until_stopped,
        reuse_supported,
        stop_flag_path,
    )

    st = spec.space.study
    res = st.resources
    stoppable = reuse_supported()
    flag = stop_flag_path(trial_id) if stoppable else None
    callbacks = [TuneReportUntilStopped(flag), AbortOnStopFlag(flag)] if stoppable else [TuneReportCallback()]
    trainer = (LeanTorchTrainer if stoppable else TorchTrainer)(
        train_worker,
        train_loop_config={"config": config, "out_dir": str(spec.work_dir(trial_id)), "device": _device(spec),
                           "num_workers": res.num_workers, "logs_location": spec.logs_location(trial_id)},
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                     resources_per_worker={"CPU": res.cpus_per_worker}),
        torch_config=TorchConfig(backend=getattr(training_function(), "torch_backend", None)
                                 or ("nccl" if res.use_gpu else "gloo")),
        run_config=RunConfig(
            name=f"trial_{trial_id}",
            storage_path=spec.train_storage,
            failure_config=FailureConfig(max_failures=st.max_failures, controller_failure_limit=st.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=st.checkpoints_to_keep,
                                               checkpoint_score_attribute=st.objective,
                                               checkpoint_score_order=st.mode),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    if stoppable:
        if fit_until_stopped(trainer, flag) is None:
            print(f"[study] trial {trial_id} stopped by the scheduler: its Train run was aborted", flush=True)
    else:
        trainer.fit()


def train_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function: set up nothing, call ``train``, report at every evaluation."""
    import ray
    import ray.train
    from ray.train import Checkpoint

    train = training_function()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    restored = ray.train.get_checkpoint()
    resume_from = None
    if restored is not None:
        # Each rank needs the files (RNG states of every rank); a local storage path is read in place.
        resume_from = local_checkpoint_dir(restored)
    num_workers = int(loop_config["num_workers"])
    logs_at = loop_config.get("logs_location") if rank == 0 else None
    fetch_logs(logs_at, loop_config["out_dir"])
    node_id = ray.get_runtime_context().get_node_id()

    def callback(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        payload = {**metrics, "compute_s": float(metrics.get("wall_s", 0.0)) * num_workers, NODE_ID: node_id}
        publish_logs(logs_at, loop_config["out_dir"])
        if rank == 0 and checkpoint_dir is not None and not _same_dir(checkpoint_dir, resume_from):
            ray.train.report(payload, checkpoint=Checkpoint.from_directory(str(checkpoint_dir)))
        else:
            if rank == 0 and checkpoint_dir is not None:  # a finished run re-reporting its stored checkpoint
                payload[CHECKPOINT_PATH] = checkpoint_location(restored)
            ray.train.report(payload)

    logging.getLogger("brainage_core").setLevel(logging.WARNING)
    report_logger = compat.train_report_logger_name()  # Train V2 logs every report's metrics at INFO
    if report_logger is not None:
        logging.getLogger(report_logger).setLevel(logging.WARNING)
    train(loop_config["config"], loop_config["out_dir"], callback=callback, rank=rank, world_size=world_size,
          device=loop_config["device"], resume_from=resume_from)
    if rank == 0:
        _drop_scratch_checkpoints(Path(loop_config["out_dir"]))
