"""Starting (or joining) Ray for a study, with the dashboard on 127.0.0.1 and token auth left on.

- With ``RAY_ADDRESS`` set (or Ray already initialised in this process, as in tests), the study joins
  that cluster and uses its resources as they are.
- Otherwise a local Ray is started with ``num_cpus = max(cpu count, CPUs one wave of trials needs)``:
  a logical over-commit, because each trial process needs 1 CPU besides its Train workers, which
  would otherwise leave 2 DDP workers unschedulable on a 2-core machine (see ray-notes.md).
- A local Ray listens on loopback only (:func:`local_ray_init`): its node address is 127.0.0.1, so that
  the GCS, raylet, object manager, dashboard agent and metrics servers bind 127.0.0.1 instead of every
  interface. Ray 2.60 on Linux resolves "127.0.0.1" to the host's public address in every process that
  believes the machine may be a cluster; for a local study none should: in this process Ray's private
  ``ENABLE_RAY_CLUSTER`` constant is cleared during ``ray.init`` (:func:`study.compat.loopback_node`), and
  every process the new Ray starts (its dashboard and the dashboard's modules, the raylet and its workers)
  inherits ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (:data:`NO_CLUSTER_ENV`, the variable that constant is
  read from). Without the latter the dashboard's Train module connected to the host's public address,
  where nothing listens, and the Train state API never answered (issue 12, case 11).
  Clusters keep their own addresses. A start whose node does not register within Ray's fixed 30 s (a
  loaded machine, the agents of a SIGKILLed study's Ray still exiting) is tried again, up to
  :data:`START_ATTEMPTS` times.
- Train's state tracking is on (``RAY_TRAIN_ENABLE_STATE_TRACKING=1``, also in the job's env_vars, as
  each trial process reads it): the dashboard's Train V2 state API (``/api/train/v2/runs/v1``; the
  older ``/api/train/v2/runs`` serves Train V1) lists the DDP trials' runs, attempts and workers.
- The dashboard is kept ON and bound to 127.0.0.1 (with it off, stopped trials left worker CPUs
  reserved in this Ray version). Ray's token authentication stays as Ray sets it (on by default):
  :func:`auth_token_location` says where the token is so a browser or ``curl -H "Authorization:
  Bearer ..."`` can use it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ray

from study import compat
from study.space import Resources

__all__ = ["RayInfo", "auth_token_location", "cpus_per_trial", "local_ray_init", "start_ray", "DEFAULT_ENV",
           "LOOPBACK", "NO_CLUSTER_ENV"]

LOOPBACK = "127.0.0.1"
#: the environment of a local Ray's processes: "this machine is no cluster" (see the module docstring)
NO_CLUSTER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
#: tries of a local ray.init whose node times out during startup (Ray waits a fixed 30 s for its raylet)
START_ATTEMPTS = 3

#: environment that makes Ray quieter and more robust on small machines (set only when unset)
DEFAULT_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    # A Train worker group that cannot start turns into an error after this, not an endless retry.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120",
    # Tune warns on every short epoch that forced experiment snapshots (num_to_keep) may be a bottleneck:
    # with evaluation epochs of seconds on CPU that is noise, not a problem.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    # The Train controller polls its workers every 2 s by default: each DDP trial waited up to that long
    # to see its workers start and again to see them finish (bench/study_overhead.py). At 0.1 s a stopped
    # trial's run is also aborted sooner (study.train_run); each poll is one small RPC per worker.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    # Per-run structured JSON logs of the Train controller and workers: files nobody reads here.
    "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING": "0",
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
    # The dashboard's Train state API (/api/train/v2/runs: runs, attempts, workers of the DDP trials).
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
    # A reused trial process waits this long for the previous trial's thread to end before Tune gives up
    # on the reuse and errors the next trial ("Trainable runner reuse requires reset_config() ... return
    # True"). The thread of a stopped DDP trial ends within study.train_run.ABORT_WAIT_S on an idle
    # machine; Tune's 2 s were exceeded under load (CI: 2 of 20 simulated DDP trials errored).
    "TUNE_FUNCTION_THREAD_TIMEOUT_S": "10",
}
#: the keys of :data:`DEFAULT_ENV` read in the trial processes themselves: also a job-level ``env_vars``,
#: so that the processes of a joined cluster (started before this job) get them
TRIAL_PROCESS_ENV = ("RAY_TRAIN_ENABLE_STATE_TRACKING", "TUNE_FUNCTION_THREAD_TIMEOUT_S")


def _is_loopback_address(address: str) -> bool:
    """Whether a GCS address ``host:port`` (or ``ray://host:port``) names this machine's loopback."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _loopback_node():
    """During ``ray.init``: Ray treats this machine as no cluster, so that 127.0.0.1 stays its address."""
    return compat.loopback_node()


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """While inside: ``os.environ`` also holds ``values`` (the processes started meanwhile inherit them).

    Only the keys of ``values`` are restored on exit, not the whole environment (so not
    ``unittest.mock.patch.dict``): what ``ray.init`` itself sets meanwhile must stay. Ray (2.60, the pinned
    version) turns token authentication on for a new local cluster by setting ``RAY_AUTH_MODE=token`` in the
    driver's environment; a driver that lost it starts children (``study/run.py --address``) that cannot connect.
    """
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def local_ray_init(**kwargs) -> object:
    """``ray.init(**kwargs)`` of a new single-machine Ray that listens on 127.0.0.1 only (see the module
    docstring), with :data:`DEFAULT_ENV` set (when unset) so that its processes inherit it."""
    for key, value in DEFAULT_ENV.items():
        os.environ.setdefault(key, value)
    address_before = os.environ.get("RAY_ADDRESS")
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            with _loopback_node(), environment(NO_CLUSTER_ENV):
                # address "local": a new Ray even when `ray start` left a cluster on this machine
                # (/tmp/ray/ray_current_cluster), which ray.init() would join and then refuse num_cpus
                return ray.init(_node_ip_address=LOOPBACK, **{"address": "local", **kwargs})
        except Exception as exc:  # Ray raises a bare Exception when its raylet does not register in 30 s
            if "timed out during startup" not in str(exc) or attempt == START_ATTEMPTS:
                raise
            ray.shutdown()
            # the failed start left RAY_ADDRESS naming its GCS: the next ray.init would try to join it
            if address_before is None:
                os.environ.pop("RAY_ADDRESS", None)
            else:
                os.environ["RAY_ADDRESS"] = address_before
            print(f"[study] Ray's node did not start within Ray's 30 s (attempt {attempt}/{START_ATTEMPTS}: a busy "
                  "machine, or the agents of a killed Ray still exiting); starting it again", file=sys.stderr,
                  flush=True)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class RayInfo:
    dashboard_url: str | None
    started_here: bool
    num_cpus: float
    auth: str
    #: this call connected the process to Ray (a local start or ``address``), so the caller disconnects
    connected_here: bool = False


def cpus_per_trial(resources: Resources) -> float:
    """Logical CPUs one trial holds: the trial process (1) plus its Train workers when num_workers > 1;
    in-trial training (num_workers == 1) runs in the trial process with ``cpus_per_worker``."""
    if resources.num_workers == 1:
        return resources.cpus_per_worker
    return 1.0 + resources.num_workers * resources.cpus_per_worker


def auth_token_location() -> str:
    """Where Ray's dashboard/API token is (or that auth is disabled)."""
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode == "disabled":
        return "token authentication disabled (RAY_AUTH_MODE=disabled)"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "token in the RAY_AUTH_TOKEN environment variable"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return f"token in {path} (send 'Authorization: Bearer <token>')"


def start_ray(resources: Resources, max_concurrent_trials: int, env: dict[str, str] | None = None, *,
              address: str | None = None, dashboard_host: str = "127.0.0.1",
              runtime_env: dict | None = None) -> RayInfo:
    """Initialise Ray for a study (see the module docstring); prints nothing.

    ``env``: environment variables every trial and Train worker of this job gets (a job-level
    ``runtime_env``), e.g. the data cache folder; ``runtime_env``: more job-level keys (``py_modules``
    shipping the project's code to a cluster, see ``study.cluster.code_runtime_env``); both ignored when
    Ray is already initialised here. ``address`` (else ``$RAY_ADDRESS``) joins an existing cluster;
    ``dashboard_host`` binds the dashboard of a Ray started here (the caller checks exposure rules).
    """
    if env is not None:  # read in each trial process: a joined cluster's processes need them from the job too
        env = {**{key: DEFAULT_ENV[key] for key in TRIAL_PROCESS_ENV}, **env}
    runtime_env = {**(runtime_env or {}), **({"env_vars": dict(env)} if env else {})} or None
    address = address or os.environ.get("RAY_ADDRESS")
    for key, value in DEFAULT_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        url = compat.joined_dashboard_url()  # the dashboard of the Ray this process already joined
        return RayInfo(_url(url), False, ray.cluster_resources().get("CPU", 0.0), auth_token_location())
    if address:
        if _is_loopback_address(address):  # a Ray started by local_ray_init: its node's address is 127.0.0.1
            with _loopback_node():
                context = ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env,
                                   _node_ip_address=LOOPBACK)
        else:
            context = ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env)
        return RayInfo(_url(context.dashboard_url), False, ray.cluster_resources().get("CPU", 0.0),
                       auth_token_location(), connected_here=True)
    needed = cpus_per_trial(resources) * max_concurrent_trials
    num_cpus = max(os.cpu_count() or 1, math.ceil(needed))
    num_gpus = None
    context = local_ray_init(
        num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True, dashboard_host=dashboard_host,
        logging_level=logging.WARNING, runtime_env=runtime_env,
    )
    return RayInfo(_url(context.dashboard_url), True, float(num_cpus), auth_token_location(), connected_here=True)


def _url(url: str | None) -> str | None:
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"
