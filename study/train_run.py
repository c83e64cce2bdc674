"""One Ray Train run inside one Tune trial, built to be cheap and stoppable.

A DDP trial (``num_workers > 1``) is a Tune function trial that builds a ``TorchTrainer`` and calls
``fit()`` (the Train V2 pattern, ray-notes.md). Two things made each such trial cost more than it must
in Ray 2.60 (``bench/study_overhead.py``):

- **a new trial process per trial.** Tune can reuse a trial's process for the next trial
  (``reuse_actors``), which saves starting a process and re-importing torch and ``ray.train.torch``
  (~2.5 CPU-seconds per trial here). But when ASHA stops a trial, Tune keeps the process for the next
  trial and asks its training thread to finish within ``TUNE_FUNCTION_THREAD_TIMEOUT_S`` (2 s); the
  thread is blocked in ``fit()`` while the Train run goes on, so the reset failed ("Trainable runner
  reuse requires reset_config() to be implemented and return True") and the next trial errored.
  :func:`fit_until_stopped` makes the run stoppable: ``fit()`` runs in a helper thread, the trial's
  thread watches Tune's stop request and, when it comes, drops a flag file that the Train controller
  (which Train places on the trial's node) sees at its next status poll (:class:`AbortOnStopFlag`) or
  report (:class:`TuneReportUntilStopped`) and aborts the run: workers killed, placement group freed,
  ``fit()`` ends. The trial's thread returns at once, so the reset succeeds. The reporter matters:
  Tune's own ``TuneReportCallback`` waits forever to hand a report to a trial that no longer reads them
  (a queue of one), which would block the controller before it could see the flag.
- **an unused dataset-manager process.** Train starts an actor that serves Ray Data shards even when
  the trainer has no datasets; it imports Ray Data (~1 CPU-second). :class:`LeanTorchTrainer` leaves
  that callback out when ``datasets`` is empty.

A third: a worker error that is deterministic (a configuration or data error, a non-finite loss:
``study.trial.input_error_of``) does not restart the worker group ``max_failures`` times; the
failure policy of :class:`LeanTorchTrainer` raises it at once (worker deaths are still retried).

All rely on interfaces Ray marks as developer or internal APIs (``WorkerGroupCallback``, the trainer's
default callbacks and controller start, Train's failure policy, the Tune session's stop event), reached
through :mod:`study.compat` only; :func:`reuse_supported` checks that they are there
(Ray is pinned to 2.60.0) and the runner falls back to a new process per DDP trial and Ray's plain
``TorchTrainer`` when they are not, or when ``BRAINAGE_DDP_REUSE=0`` is set (an escape hatch, and the
"before" of ``bench/study_overhead.py``).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from study import compat

__all__ = ["REUSE_ENV", "AbortOnStopFlag", "LeanTorchTrainer", "TuneReportUntilStopped", "fit_until_stopped",
           "reuse_supported", "stop_flag_path"]

log = logging.getLogger(__name__)

#: set to "0" to run DDP trials the plain way (a new trial process each, Ray's TorchTrainer)
REUSE_ENV = "BRAINAGE_DDP_REUSE"
#: how often the trial's thread looks at Tune's stop request while ``fit()`` runs (seconds)
STOP_POLL_S = 0.1
#: how long the trial's thread waits for an aborted run to end before returning anyway (seconds); the
#: helper thread is a daemon and ends on its own once the controller has exited
ABORT_WAIT_S = 1.5
#: how long a trial whose run has ended waits for Tune to take the run's last report (seconds)
HANDOVER_WAIT_S = 60.0


def reuse_supported() -> bool:
    """Whether this Ray has what a reusable DDP trial needs and ``BRAINAGE_DDP_REUSE`` is not "0"."""
    if os.environ.get(REUSE_ENV, "1").strip() == "0":
        return False
    try:
        from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback  # noqa: F401 - presence
    except ImportError:
        return False
    train_run_symbols = [s.name for s in compat.PRIVATE_SYMBOLS if s.used_by == "study/train_run.py"]
    gone = compat.missing()
    return hasattr(TuneReportCallback, "after_report") and not any(name in gone for name in train_run_symbols)


def stop_flag_path(trial_id: str) -> Path:
    """A fresh node-local file path for one Train run's stop flag (the file does not exist yet)."""
    folder = Path(tempfile.gettempdir()) / "brainage-study-stop"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{trial_id}-{uuid.uuid4().hex[:12]}"


@functools.cache  # one class per process (the trial process runs many trials)
def _make_abort_callback_class() -> type:
    class AbortOnStopFlagImpl(compat.worker_group_callback_class()):
        """In the Train controller: abort the run once ``flag`` exists (checked at each status poll,
        ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``)."""

        def __init__(self, flag: str):
            self.flag = flag
            self.aborting = False

        def after_worker_group_poll_status(self, worker_group_status: Any) -> None:
            if self.aborting or not Path(self.flag).exists():
                return
            self.aborting = True
            log.info("Tune stopped this trial: aborting its Train run")
            _abort_this_controller(self.flag)

    return AbortOnStopFlagImpl


def _abort_this_controller(flag: str) -> None:
    """Ask the Train controller this runs in to abort (what Ctrl-C on a driver does): it kills the
    workers, frees the placement group and ends the controller, so ``fit()`` returns in the trial.
    The flag file has done its work and is removed."""
    import ray

    ray.get_runtime_context().current_actor.abort.remote()
    Path(flag).unlink(missing_ok=True)


@functools.cache  # one class per process (the trial process runs many trials)
def _make_reporter_class() -> type:
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
    from ray.util.queue import Full

    class TuneReportUntilStoppedImpl(TuneReportCallback):
        """``TuneReportCallback`` that gives up handing a report over once ``flag`` exists."""

        def __init__(self, flag: str):
            super().__init__()
            self.flag = flag
            self.aborting = False

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            item = dict(metrics[0])
            if checkpoint:
                item[CHECKPOINT_PATH_KEY] = checkpoint.path
            while not self.aborting:
                if Path(self.flag).exists():
                    self.aborting = True
                    _abort_this_controller(self.flag)
                    return
                try:
                    compat.report_queue(self).put(item, timeout=STOP_POLL_S)
                    return
                except Full:
                    continue

    return TuneReportUntilStoppedImpl


def TuneReportUntilStopped(flag: str | Path) -> Any:  # noqa: N802 - a class factory
    """Forward rank 0's metrics (and ``checkpoint_path``) to the Tune trial, as ``TuneReportCallback``
    does, until the run's stop flag appears (then abort the run instead of waiting)."""
    return _make_reporter_class()(str(flag))


def AbortOnStopFlag(flag: str | Path) -> Any:  # noqa: N802 - a class factory (Ray imported lazily)
    """The controller-side half of :func:`fit_until_stopped` (a Train ``WorkerGroupCallback``)."""
    return _make_abort_callback_class()(str(flag))


@functools.cache  # one class per process (the trial process runs many trials)
def _make_lean_trainer_class() -> type:
    from ray.train.torch import TorchTrainer

    datasets_callback = compat.datasets_callback_class()
    method = compat.default_callbacks_method()
    inherited = getattr(TorchTrainer, method)
    start_method = compat.controller_start_method()
    inherited_start = getattr(TorchTrainer, start_method)

    def start_controller(self: Any, **kwargs: Any) -> Any:
        if "failure_policy" in kwargs:
            kwargs["failure_policy"] = _make_failure_policy_class()(self.run_config.failure_config)
        return inherited_start(self, **kwargs)

    def default_callbacks(self: Any) -> list:
        callbacks = inherited(self)
        if self.datasets:
            return callbacks
        return [c for c in callbacks if not isinstance(c, datasets_callback)]

    return type("LeanTorchTrainerImpl", (TorchTrainer,), {
        method: default_callbacks,
        start_method: start_controller,
        "__doc__": "``TorchTrainer`` without the dataset-manager actor when it has no datasets, whose failure "
                   "policy does not retry deterministic worker errors.",
    })


@functools.cache
def _make_failure_policy_class() -> type:
    from ray.train.v2.api.exceptions import WorkerGroupError

    DefaultFailurePolicy, FailureDecision = compat.failure_policy_classes()  # noqa: N806 - classes

    class NoRetryOnInputErrorImpl(DefaultFailurePolicy):
        """Train's default policy, except that a worker group failing with a configuration / data error or a
        non-finite loss on any rank is not restarted (it would fail the same way)."""

        def make_decision(self, training_failed_error: Any) -> Any:
            from study.trial import input_error_of

            if isinstance(training_failed_error, WorkerGroupError) and input_error_of(training_failed_error):
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    return NoRetryOnInputErrorImpl


def LeanTorchTrainer(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - a class factory
    """A ``ray.train.torch.TorchTrainer`` (same arguments) that starts no dataset manager without datasets."""
    return _make_lean_trainer_class()(*args, **kwargs)


def fit_until_stopped(trainer: Any, flag: Path) -> Any:
    """Run ``trainer.fit()`` until it ends or Tune asks this trial to stop.

    ``trainer`` must carry ``TuneReportUntilStopped(flag)`` and ``AbortOnStopFlag(flag)`` in its
    ``run_config.callbacks``. Returns fit's result, re-raises its error; returns None when the run was
    stopped by Tune (ASHA): the flag is written, the controller aborts the run, and this returns within
    ``ABORT_WAIT_S`` even if the abort is still under way.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the trial's thread
            outcome["error"] = exc

    runner = threading.Thread(target=target, name="train-fit", daemon=True)
    runner.start()
    session = compat.tune_session()
    stop_event = getattr(session, "stop_event", None)
    try:
        while runner.is_alive():
            runner.join(STOP_POLL_S)
            if stop_event is not None and stop_event.is_set() and runner.is_alive():
                flag.touch()
                runner.join(ABORT_WAIT_S)
                return None
        _wait_for_handover(trainer)
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("result")
    finally:
        if not runner.is_alive():
            flag.unlink(missing_ok=True)


def _wait_for_handover(trainer: Any, timeout: float = HANDOVER_WAIT_S) -> None:
    """Wait until Tune has taken the last report that the run's controller handed to this trial.

    The controller puts each report into a queue of one (``TuneReportUntilStopped``) that the trial's Tune
    session empties while the training function runs. A run whose last report was still in that queue when
    ``fit()`` returned left it to the session's last fetch after the training function had ended, where the
    trial hung in Ray 2.60 (seen once on a loaded 2-core machine: the epoch's row never reached the driver
    and the trial never ended). Returning only once the queue is empty keeps that report on the normal path.
    """
    reporter = _make_reporter_class()
    queues = [compat.report_queue(c) for c in (trainer.run_config.callbacks or []) if isinstance(c, reporter)]
    deadline = time.monotonic() + timeout
    for queue in queues:
        while time.monotonic() < deadline:
            try:
                if queue.empty():
                    break
            except Exception:  # noqa: BLE001 - the queue's actor is gone: nothing left to hand over
                break
            time.sleep(STOP_POLL_S)
