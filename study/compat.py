"""Every private Ray and Optuna symbol the project relies on, in one place.

Ray (2.60.0) and Optuna (5.0.0) are pinned. A few behaviours the studies need have no public API:

- stopping a DDP trial's Train run when Tune stops the trial, and reusing the trial's process
  (``study/train_run.py``): the Tune session's stop event, Train's worker-group callbacks, the trainer's
  default callbacks (to leave out the dataset manager), the report callback's hand-over queue;
- recording the trials ASHA stops as PRUNED in Optuna with their intermediate values
  (``study/searcher.py``): ASHA's clock and horizon, OptunaSearch's trial map, finished set and study, an
  Optuna trial's storage id;
- forgetting a finished trial's per-metric statistics, which Tune keeps for every numeric result key of
  every trial for the whole study (``study/callback.py``, :func:`forget_metric_history`);
- quieting Train V2's per-report INFO logger (``study/trial.py``), finding the dashboard of a Ray this
  process already joined (``study/ray_runtime.py``), and turning Ray's token authentication on in a test.

No other module names a private Ray/Optuna attribute or module: they call the helpers below.
:data:`PRIVATE_SYMBOLS` lists each symbol with where it is used, and :func:`missing` checks each one
against the installed versions; ``tests/test_compat.py`` fails, naming the symbol, when an upgrade moves
one. :data:`EARLY_STOPPED` is the one piece of state shared between the scheduler and the searcher.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["EARLY_STOPPED", "PRIVATE_SYMBOLS", "PrivateSymbol", "asha_max_t", "asha_time_attr",
           "controller_start_method", "datasets_callback_class", "default_callbacks_method", "token_auth",
           "failure_policy_classes", "forget_metric_history", "joined_dashboard_url", "loopback_node", "missing",
           "optuna_completed", "optuna_intermediate_values", "optuna_study", "optuna_trials", "report_queue",
           "train_report_logger_name", "tune_session", "user_exception_class", "worker_group_callback_class"]


@dataclass(frozen=True)
class PrivateSymbol:
    """One private symbol: ``module`` and a dotted ``attribute`` path inside it (``""``: the module
    itself). ``kind``: ``"import"`` (module attribute), ``"class attribute"``, ``"instance attribute"``
    (``Class.method:attr``: checked in the source of the method that assigns it), ``"runtime"`` (its
    attributes exist only in a running process: the object itself is checked). ``used_by``: the project
    file; ``why``: what it is needed for."""

    module: str
    attribute: str
    kind: str
    used_by: str
    why: str

    @property
    def name(self) -> str:
        return f"{self.module}.{self.attribute}" if self.attribute else self.module


PRIVATE_SYMBOLS: tuple[PrivateSymbol, ...] = (
    PrivateSymbol("ray.train._internal.session", "get_session", "import", "study/train_run.py",
                  "the Tune session of this trial, for its stop event"),
    PrivateSymbol("ray.train._internal.session", "_TrainSession.reset", "class attribute", "study/train_run.py",
                  "a reused trial process resets its session (checked before reuse is turned on)"),
    PrivateSymbol("ray.train._internal.session", "_TrainSession.reset:stop_event", "instance attribute",
                  "study/train_run.py", "Tune's stop request, polled while fit() runs in a helper thread"),
    PrivateSymbol("ray.train.v2._internal.execution.callback", "WorkerGroupCallback.after_worker_group_poll_status",
                  "class attribute", "study/train_run.py", "the controller-side callback that aborts a stopped run"),
    PrivateSymbol("ray.train.v2._internal.callbacks.datasets", "DatasetsCallback", "import", "study/train_run.py",
                  "the dataset-manager callback left out when a trainer has no datasets"),
    PrivateSymbol("ray.train.v2.api.data_parallel_trainer", "DataParallelTrainer._create_default_callbacks",
                  "class attribute", "study/train_run.py", "overridden to drop the dataset manager"),
    PrivateSymbol("ray.train.v2.api.data_parallel_trainer", "DataParallelTrainer._initialize_and_run_controller",
                  "class attribute", "study/train_run.py", "overridden to install the no-retry failure policy"),
    PrivateSymbol("ray.train.v2._internal.execution.failure_handling", "DefaultFailurePolicy", "import",
                  "study/train_run.py", "the base of the policy that does not retry configuration/data errors"),
    PrivateSymbol("ray.train.v2._internal.execution.failure_handling", "FailureDecision", "import",
                  "study/train_run.py", "the decision RAISE returned for a deterministic worker error"),
    PrivateSymbol("ray.tune.integration.ray_train", "TuneReportCallback.__init__:_training_actor_item_queue",
                  "instance attribute", "study/train_run.py", "the queue a report is handed to, with a timeout"),
    PrivateSymbol("ray.train.v2._internal.execution", "context", "import", "study/trial.py",
                  "its file path names the logger of Train V2's per-report INFO lines"),
    PrivateSymbol("ray._private.worker", "global_worker", "runtime", "study/ray_runtime.py",
                  "the dashboard URL of a Ray this process already joined (best effort)"),
    PrivateSymbol("ray.tune.schedulers.async_hyperband", "AsyncHyperBandScheduler.__init__:_time_attr",
                  "instance attribute", "study/searcher.py", "ASHA's clock (the reported epoch)"),
    PrivateSymbol("ray.tune.schedulers.async_hyperband", "AsyncHyperBandScheduler.__init__:_max_t",
                  "instance attribute", "study/searcher.py", "a stop before max_t is an early stop (PRUNED)"),
    PrivateSymbol("ray.tune.search.optuna.optuna_search", "OptunaSearch.__init__:_ot_trials", "instance attribute",
                  "study/searcher.py", "Tune trial id -> Optuna trial"),
    PrivateSymbol("ray.tune.search.optuna.optuna_search", "OptunaSearch.__init__:_completed_trials",
                  "instance attribute", "study/searcher.py", "the trials already told to Optuna"),
    PrivateSymbol("ray.tune.search.optuna.optuna_search", "OptunaSearch.__init__:_ot_study", "instance attribute",
                  "study/searcher.py", "the Optuna study, told PRUNED / FAIL directly"),
    PrivateSymbol("optuna.trial._trial", "Trial.__init__:_trial_id", "instance attribute", "study/searcher.py",
                  "the storage id, to read a live trial's intermediate values"),
    PrivateSymbol("ray.tune.trainable.metadata", "_TrainingRunMetadata.__init__:metric_analysis", "instance attribute",
                  "study/callback.py", "a finished trial's per-metric statistics, kept for the objectives only"),
    PrivateSymbol("ray.tune.trainable.metadata", "_TrainingRunMetadata.__init__:metric_n_steps", "instance attribute",
                  "study/callback.py", "the same statistics' last-5 / last-10 windows"),
    PrivateSymbol("ray._private.ray_constants", "ENABLE_RAY_CLUSTER", "import", "study/ray_runtime.py",
                  "cleared during ray.init so that a local Ray keeps 127.0.0.1 as its node address"),
    PrivateSymbol("ray.train.v2._internal.exceptions", "UserExceptionWithTraceback", "import",
                  "tests/test_study_failures.py", "the wrapper Train puts around a worker's exception"),
    PrivateSymbol("ray._raylet", "AuthenticationTokenLoader", "import", "tests/test_cluster.py",
                  "its cached token re-read after the test sets RAY_AUTH_TOKEN_PATH"),
    PrivateSymbol("ray._raylet", "Config", "import", "tests/test_cluster.py",
                  "Ray's cached config re-read after the test restores RAY_AUTH_MODE"),
)


def _resolve(symbol: PrivateSymbol) -> str | None:
    """None when ``symbol`` is present in the installed packages, else what is missing."""
    try:
        obj: Any = importlib.import_module(symbol.module)
    except ImportError as exc:
        return f"module {symbol.module} cannot be imported ({exc})"
    path, _, attribute = symbol.attribute.partition(":")
    for part in [p for p in path.split(".") if p]:
        if not hasattr(obj, part):
            return f"{symbol.module} has no {path} (missing {part!r})"
        obj = getattr(obj, part)
    if attribute:  # an instance attribute assigned in __init__: look for the assignment in its source
        try:
            source = inspect.getsource(obj)
        except (OSError, TypeError) as exc:
            return f"the source of {symbol.module}.{path} cannot be read ({exc})"
        if f"self.{attribute} =" not in source and f"self.{attribute}=" not in source:
            return f"{symbol.module}.{path} no longer assigns self.{attribute}"
    return None


def missing() -> dict[str, str]:
    """``{symbol name: what is wrong}`` for every entry of :data:`PRIVATE_SYMBOLS` the installed Ray /
    Optuna lack; empty when all are there."""
    out = {}
    for symbol in PRIVATE_SYMBOLS:
        problem = _resolve(symbol)
        if problem is not None:
            out[symbol.name] = f"{problem}; used by {symbol.used_by} for {symbol.why}"
    return out


#: Tune trial ids that ASHA stopped before ``max_t``, in the driver process. The scheduler adds to it
#: (Tune calls the scheduler before the searcher); the searcher and the driver's callback read it.
EARLY_STOPPED: set[str] = set()


# --- Ray Train / Tune (study/train_run.py, study/trial.py) -------------------------------------------------

def tune_session() -> Any:
    """The Tune/Train session of this process (``ray.train._internal.session.get_session()``), or None."""
    from ray.train._internal.session import get_session

    return get_session()


def train_session_class() -> type:
    from ray.train._internal.session import _TrainSession

    return _TrainSession


def worker_group_callback_class() -> type:
    """Train V2's ``WorkerGroupCallback`` base class (runs in the Train controller)."""
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    return WorkerGroupCallback


def datasets_callback_class() -> type:
    """Train V2's callback that starts the Ray Data dataset manager."""
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    return DatasetsCallback


def default_callbacks_method() -> str:
    """The name of the trainer method building Train's default callbacks (overridden by a subclass)."""
    return "_create_default_callbacks"


def controller_start_method() -> str:
    """The name of the trainer method that builds and runs the Train controller (its keyword arguments
    include ``failure_policy``)."""
    return "_initialize_and_run_controller"


def failure_policy_classes() -> tuple[type, Any]:
    """Train V2's ``DefaultFailurePolicy`` class and its ``FailureDecision`` enum."""
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision

    return DefaultFailurePolicy, FailureDecision


def report_queue(callback: Any) -> Any:
    """The queue a ``TuneReportCallback`` hands each report to (``put(item, timeout=...)``)."""
    return callback._training_actor_item_queue


def train_report_logger_name() -> str | None:
    """The name of the logger Train V2 writes every report's metrics to at INFO (its file path); None
    when this Ray has no such module."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # pragma: no cover - another Ray version
        return None
    return train_context.__file__


def joined_dashboard_url() -> str | None:
    """The dashboard URL of the Ray this process is connected to, or None (best effort)."""
    import ray

    try:
        return ray._private.worker.global_worker.node.webui_url
    except AttributeError:
        return None


@contextlib.contextmanager
def loopback_node() -> Iterator[None]:
    """While inside: Ray treats this machine as no cluster (``ENABLE_RAY_CLUSTER`` off), so that a Ray
    started with ``_node_ip_address="127.0.0.1"`` keeps that address for every listener."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def user_exception_class() -> type:
    """Train V2's ``UserExceptionWithTraceback`` (the wrapper of a worker's own exception; tests build one)."""
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    return UserExceptionWithTraceback


@contextlib.contextmanager
def token_auth(token_file: str | os.PathLike[str]) -> Iterator[None]:
    """Ray's token authentication on, with the token in ``token_file``, for a Ray started in this process
    while the block runs (tests); the previous mode and token path come back afterwards.

    Sets ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` for this process and its children, and makes
    Ray re-read both (its config and token loader cache what they read first). A Ray started with
    ``ray.cluster_utils.Cluster`` creates no token (``ray.init`` would write ``~/.ray/auth_token``), and its
    GCS aborts when token mode is on and no token exists: hence the explicit file."""
    from ray._raylet import AuthenticationTokenLoader, Config

    from study.ray_runtime import environment

    def reread() -> None:
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

    try:
        with environment({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}):
            reread()
            yield
    finally:
        reread()


# --- Tune's trial bookkeeping (study/callback.py) ---------------------------------------------------------

def forget_metric_history(trial: Any, keep: set[str]) -> None:
    """Drop a finished Tune trial's statistics of every result key but ``keep``.

    Tune keeps, for every numeric key of a trial's results (~30: ours and its own), min / max / mean / last
    and last-5 / last-10 windows, in the driver for the whole study and in every experiment snapshot:
    ~40 KB of driver memory per trial, the largest part of what a study's driver grows by per trial
    (docs/cluster-sim.md). Nothing reads them once the trial has ended except
    ``ResultGrid.get_best_result(metric, scope=...)``, which keeps working for the metrics in ``keep``
    (the study's objectives). The trial's last result (``Result.metrics``) is untouched."""
    meta = trial.run_metadata
    meta.metric_analysis = {k: v for k, v in meta.metric_analysis.items() if k in keep}
    meta.metric_n_steps = {k: v for k, v in meta.metric_n_steps.items() if k in keep}


# --- ASHA and OptunaSearch (study/searcher.py) -------------------------------------------------------------

def asha_time_attr(scheduler: Any) -> str:
    """The result key ASHA uses as its clock."""
    return scheduler._time_attr


def asha_max_t(scheduler: Any) -> float:
    """ASHA's horizon: a stop at a clock value below it is an early stop."""
    return scheduler._max_t


def optuna_trials(searcher: Any) -> dict[str, Any]:
    """OptunaSearch's map from Tune trial id to Optuna trial (the live dict, not a copy)."""
    return searcher._ot_trials


def optuna_completed(searcher: Any) -> set[str]:
    """The Tune trial ids OptunaSearch has already told Optuna about (the live set)."""
    return searcher._completed_trials


def optuna_study(searcher: Any) -> Any:
    """The ``optuna.Study`` behind an OptunaSearch (None before it has a search space)."""
    return searcher._ot_study


def optuna_intermediate_values(ot_trial: Any) -> dict[int, float]:
    """The intermediate values already stored for a live ``optuna.Trial`` (step -> value)."""
    return ot_trial.storage.get_trial(ot_trial._trial_id).intermediate_values
