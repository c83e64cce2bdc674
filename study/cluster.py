"""Running a study on an existing Ray cluster: address, shared storage checks, code shipping
and the dashboard exposure rules. See ``docs/cluster.md`` for the user-facing guide.

Contracts:

- :func:`check_dashboard_exposure` returns the warnings to print for a dashboard host and raises ONE
  :class:`~brainage_core.errors.ConfigError` when token authentication is disabled
  (``RAY_AUTH_MODE=disabled``) while the dashboard is not on a loopback address, unless the user passed
  ``--i-understand-no-auth``: the dashboard's jobs API runs arbitrary code for whoever reaches it.
- :func:`check_visible_on_every_node` (Ray initialised) writes a marker file under a folder from the
  driver and runs one probe task pinned to each alive node (``NodeAffinitySchedulingStrategy``, 0 CPU)
  that reads it back; :func:`check_store_on_every_node` checks the prepared store's manifest and
  fingerprint the same way. Any node that cannot see the file (or cannot import the project's code)
  is named in one ConfigError. Folders may be local paths (a shared file system mounted at the same
  path on every node) or ``s3://`` / ``gs://`` URIs read through ``pyarrow.fs``.
- :func:`code_runtime_env` says how the project's code reaches the nodes: ``ship`` (default) uploads
  the ``brainage_core`` and ``study`` packages with the job (Ray ``runtime_env`` ``py_modules``);
  ``installed`` relies on the package being installed on every node (``pip install -e .``).
- :func:`local_optuna_db` / :func:`copy_sqlite`: sqlite must not live on network storage, so a cluster
  study keeps ``optuna.db`` on the driver's local disk and copies a consistent snapshot (sqlite backup
  API) into the study folder after each result.
- submitting a study as a Ray Job (``--submit``) is :mod:`study.jobs`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import os
import sqlite3
import tempfile
import uuid
from pathlib import Path
from typing import Any

from brainage_core.errors import ConfigError
from study.storage import (
    URI_SCHEMES,
    delete_location,
    is_uri,
    join_location,
    read_location_text,
    write_location_bytes,
    write_location_text,
)

__all__ = [
    "AUTH_MODE_ENV",
    "CODE_MODES",
    "URI_SCHEMES",
    "auth_headers",
    "check_dashboard_exposure",
    "check_store_on_every_node",
    "check_visible_on_every_node",
    "code_runtime_env",
    "ddp_trials_that_fit",
    "copy_sqlite",
    "dashboard_url",
    "inside_ray_job",
    "is_loopback",
    "is_uri",
    "local_optuna_db",
    "read_auth_token",
]

AUTH_MODE_ENV = "RAY_AUTH_MODE"
CODE_MODES = ("ship", "installed")
NO_AUTH_FLAG = "--i-understand-no-auth"
EXPOSURE_WARNING = (
    "warning: the Ray dashboard will listen on {host}, not on loopback: the dashboard and its jobs API run "
    "arbitrary code for anyone who can reach that address (the 'ShadowRay' attacks). Keep Ray's token "
    "authentication on, firewall the port, or use an SSH tunnel (ssh -L 8265:127.0.0.1:8265 HEAD)."
)
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# Dashboard exposure and auth
# --------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IPs (127.0.0.0/8, ::1)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost, or 0.0.0.0-like wildcards handled above


def check_dashboard_exposure(host: str, *, allow_no_auth: bool, auth_mode: str | None = None) -> list[str]:
    """Warnings for a dashboard bound to ``host``; ConfigError for a non-loopback host without auth.

    ``auth_mode`` defaults to ``$RAY_AUTH_MODE`` (Ray's default, unset, means token auth on)."""
    mode = (auth_mode if auth_mode is not None else os.environ.get(AUTH_MODE_ENV, "")).strip().lower()
    if is_loopback(host):
        return []
    if mode == "disabled" and not allow_no_auth:
        raise ConfigError(
            f"--dashboard-host {host} with {AUTH_MODE_ENV}=disabled: a dashboard reachable from the network without "
            f"token authentication lets anyone run code on the cluster: expected token auth on (unset "
            f"{AUTH_MODE_ENV}), a loopback host (127.0.0.1), or {NO_AUTH_FLAG} if this network is trusted"
        )
    warnings = [EXPOSURE_WARNING.format(host=host)]
    if mode == "disabled":
        warnings.append(f"warning: token authentication is OFF ({AUTH_MODE_ENV}=disabled, {NO_AUTH_FLAG} given)")
    return warnings


def read_auth_token() -> str | None:
    """Ray's auth token: ``$RAY_AUTH_TOKEN``, else the file ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``;
    None when there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    return token or None


def auth_headers() -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}`` when a token exists, else ``{}``."""
    token = read_auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def dashboard_url(address: str | None) -> str:
    """The dashboard URL of a Ray Jobs address: ``http://host:port`` kept as is, a bare ``host:port`` gets
    ``http://``; ``None`` or ``auto`` is the local default ``http://127.0.0.1:8265``."""
    if not address or address == "auto":
        return "http://127.0.0.1:8265"
    if address.startswith("ray://"):
        raise ConfigError(f"--address {address}: --submit talks to the dashboard's jobs API: expected its HTTP "
                          f"address, e.g. http://HEAD:8265")
    return address if address.startswith(("http://", "https://")) else f"http://{address}"


# --------------------------------------------------------------------------------------------------
# Storage every node sees
# --------------------------------------------------------------------------------------------------


def _probe(path: str, expected: str, json_key: str | None) -> tuple[bool, str, str]:
    """Runs on one node: (ok, detail, hostname). ``json_key``: compare that key of a JSON file."""
    import socket

    try:
        text = read_location_text(path)
    except (OSError, ValueError) as exc:
        return False, f"cannot read {path} ({type(exc).__name__}: {exc})", socket.gethostname()
    found = text.strip()
    if json_key is not None:
        try:
            found = str(json.loads(text).get(json_key))
        except (ValueError, AttributeError):
            return False, f"{path} is not the JSON the driver sees", socket.gethostname()
    if found != expected:
        return False, f"{path} holds {found[:40]!r}, the driver wrote {expected[:40]!r}", socket.gethostname()
    return True, "", socket.gethostname()


def _probe_every_node(path: str, expected: str, json_key: str | None, *, what: str, hint: str,
                      timeout_s: float = 300.0) -> list[str]:
    """Run :func:`_probe` on every alive node; returns the node ids checked, raises ConfigError on failure."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = {n["NodeID"]: probe.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(path, expected, json_key)
        for n in nodes}
    addresses = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in nodes}
    failures = []
    for node_id, ref in refs.items():
        where = f"node {addresses[node_id]} ({node_id[:12]})"
        try:
            ok, detail, host = ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            failures.append(f"{where}: no answer within {timeout_s:.0f} s")
            continue
        except ray.exceptions.RayError as exc:
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            if "ModuleNotFoundError" in str(exc) or "No module named" in str(exc):
                first = ("the project's code is not importable there: use --code ship (the default), or install "
                         "the package on every node")
            failures.append(f"{where}: {first}")
            continue
        if not ok:
            failures.append(f"{where} [{host}]: {detail}")
    if failures:
        raise ConfigError(f"{what} is not visible from every node of the Ray cluster: {'; '.join(failures)}: "
                          f"{hint}")
    return list(refs)


def check_visible_on_every_node(folder: str | os.PathLike[str], *, what: str = "study folder") -> list[str]:
    """Write a marker under ``folder`` and check every alive node reads it back (Ray initialised).

    Returns the node ids checked; ConfigError naming the nodes that do not see it."""
    folder = str(folder)
    token = uuid.uuid4().hex
    marker = join_location(folder, f".node-probe-{token[:12]}")
    try:
        write_location_text(marker, token)
    except OSError as exc:
        raise ConfigError(f"{what} {folder}: cannot write a marker file ({exc}): expected a writable folder") from None
    try:
        return _probe_every_node(
            marker, token, None, what=f"{what} {folder}",
            hint="expected a folder on storage every node sees (a shared file system mounted at the same path "
                 "on every node, or s3:// / gs://); see docs/cluster.md")
    finally:
        delete_location(marker)


def check_store_on_every_node(store_path: str | os.PathLike[str], fingerprint: str) -> list[str]:
    """Check every alive node reads the prepared store's ``manifest.json`` with the driver's fingerprint."""
    return _probe_every_node(
        join_location(str(store_path), "manifest.json"), fingerprint, "fingerprint",
        what=f"prepared store {store_path}",
        hint="expected data.store (or $BRAINAGE_CACHE, where the driver prepares it) on storage every node sees")


# --------------------------------------------------------------------------------------------------
# Code and the Optuna database
# --------------------------------------------------------------------------------------------------


def inside_ray_job() -> bool:
    """True in the driver of a submitted Ray Job: its runtime_env (code, env vars) is already the job's,
    and ``ray.init`` must not be given another one."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def code_runtime_env(code: str) -> dict[str, Any]:
    """The ``runtime_env`` keys that bring the project's code to every node (see the module docstring)."""
    if code not in CODE_MODES:
        raise ConfigError(f"--code {code!r}: expected one of {', '.join(CODE_MODES)}")
    if code == "installed":
        return {}
    return {"py_modules": [str(PACKAGE_ROOT / "brainage_core"), str(PACKAGE_ROOT / "study")],
            "excludes": ["__pycache__", "*.pyc"]}


def local_optuna_db(study_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The driver-local sqlite file of a cluster study: ``<cache>/optuna/<name>-<hash of the folder>.db``
    (cache: ``$BRAINAGE_CACHE`` or ``~/.cache/brainage-study``)."""
    cache = Path(cache_dir or os.environ.get("BRAINAGE_CACHE") or Path.home() / ".cache" / "brainage-study")
    digest = hashlib.sha1(str(study_dir).encode()).hexdigest()[:10]
    return cache / "optuna" / f"{Path(str(study_dir).rstrip('/')).name}-{digest}.db"


def copy_sqlite(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """A consistent copy of a live sqlite database (backup API), replaced atomically when ``dst`` is local."""
    src = str(src)
    if not Path(src).exists():
        return
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = Path(tmp) / "optuna.db"
        with sqlite3.connect(src) as source, sqlite3.connect(snapshot) as target:
            source.backup(target)
        source.close()
        target.close()
        if is_uri(dst):
            write_location_bytes(str(dst), snapshot.read_bytes())
            return
        tmp_dst = Path(dst).with_name(f".{Path(dst).name}.tmp-{os.getpid()}")
        tmp_dst.write_bytes(snapshot.read_bytes())
        os.replace(tmp_dst, dst)


def ddp_trials_that_fit(num_workers: int, use_gpu: bool, cpus_per_worker: float,
                        cluster_resources: dict[str, float]) -> int:
    """How many DDP trials of ``num_workers`` workers the cluster runs at once: each holds one CPU for
    its trial process (what Tune reserves) plus, for its Train run, ``num_workers`` x
    (``cpus_per_worker`` CPUs and one GPU when ``use_gpu``), which Tune does not see. Tune would start
    more trials than that; the extra ones would wait for their workers' placement group and fail after
    ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``. Raises ConfigError when not even one fits."""
    cpus = float(cluster_resources.get("CPU", 0.0))
    per_trial_cpu = 1.0 + num_workers * cpus_per_worker
    fits = math.floor(cpus / per_trial_cpu + 1e-9)
    need = f"{per_trial_cpu:g} CPUs"
    if use_gpu:
        fits = min(fits, math.floor(float(cluster_resources.get("GPU", 0.0)) / num_workers + 1e-9))
        need += f" and {num_workers} GPUs"
    if fits < 1:
        raise ConfigError(f"study.resources: a DDP trial of {num_workers} workers needs {need}; the Ray cluster has "
                          f"{cpus:g} CPUs and {float(cluster_resources.get('GPU', 0.0)):g} GPUs: expected fewer "
                          f"workers (study.resources.num_workers) or a larger cluster")
    return fits
