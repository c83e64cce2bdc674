"""Submitting a study as a Ray Job (``python study/run.py SPACE --submit``): the space YAML staged on the
shared storage, ``python -m study.run ...`` submitted through the dashboard's jobs API
(``JobSubmissionClient`` with the ``Authorization: Bearer`` token header), its logs printed as they come.
:func:`submit_study` returns the process exit code: 0 only when the job SUCCEEDED. See ``docs/cluster.md``.
"""

from __future__ import annotations

import shlex
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from brainage_core.errors import ConfigError
from study.cluster import auth_headers, code_runtime_env, dashboard_url
from study.storage import is_uri, join_location, write_location_text

__all__ = ["AGENT_WAIT_S", "submit_study"]

_JOB_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


#: how long a submission retries while the dashboard has no job agent yet (a cluster that has just started)
AGENT_WAIT_S = 60.0

NO_AGENT = "No available agent to submit job"


def _submit_when_an_agent_is_up(submit: Callable[[], str], wait_s: float = AGENT_WAIT_S, url: str = "") -> str:
    """``submit()``, retried every 2 s for up to ``wait_s`` while Ray answers "No available agent to submit
    job, please try again later" (its job agents register some seconds after the head node starts).

    Raises ConfigError when the head node's agent is still missing after ``wait_s``: Ray's jobs API only uses
    the head node's dashboard agent, and an agent whose HTTP port was taken stays up without registering."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return submit()
        except RuntimeError as exc:
            if NO_AGENT not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"--submit: the Ray jobs API at {url or 'the dashboard'} still had no job agent after "
                    f"{wait_s:g} s ({NO_AGENT}): expected the head node's dashboard agent to serve HTTP. Its port "
                    f"(`ray start --head --dashboard-agent-listen-port`, 52365 by default) is probably held by "
                    f"another Ray on the head node; its logs/dashboard_agent.log says 'Failed to start HTTP "
                    f"server'. Restart the head node with a free --dashboard-agent-listen-port") from None
            time.sleep(2.0)


def submit_study(*, address: str | None, space_path: Path, stage_dir: Path | str, run_args: Sequence[str], code: str,
                 env: dict[str, str], python: str = "python", poll_s: float = 2.0,
                 submission_id: str | None = None, out: Any = None) -> int:
    """Submit the study as a Ray Job and follow it; returns 0 when it SUCCEEDED, 1 otherwise.

    The space YAML is copied to ``stage_dir`` (a folder on the shared storage, e.g. ``<storage>/.jobs``, or
    a URI for a study on an object store: ``study.run`` downloads a URI space)
    and the job runs ``python -m study.run <that copy> <run_args>``; ``run_args`` are the ``study.run``
    arguments after the space (overrides, ``--name``, an absolute ``--storage``...). ``env`` goes to every
    process of the job (``env_vars``). No ``working_dir`` is used: Ray removed the unpacked working
    directory under a running study's driver (its cwd) in Ray 2.60, which broke Tune at the end."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = out or sys.stdout
    url = dashboard_url(address)
    headers = auth_headers()
    try:
        client = JobSubmissionClient(url, headers=headers)
    except Exception as exc:  # noqa: BLE001 - the SDK raises plain exceptions for unreachable/unauthorised
        raise ConfigError(f"--submit: cannot reach the Ray jobs API at {url} ({str(exc).splitlines()[0]}): expected "
                          f"the head node's dashboard address (--address http://HEAD:8265 or RAY_ADDRESS) and, with "
                          f"token auth, ~/.ray/auth_token or RAY_AUTH_TOKEN") from None
    # on an object store, the job's driver downloads the staged YAML from there
    folder = str(stage_dir) if is_uri(stage_dir) else str(Path(stage_dir).resolve())
    staged = join_location(folder, f"{Path(space_path).stem}-{uuid.uuid4().hex[:8]}.yaml")
    write_location_text(staged, Path(space_path).read_text())
    runtime_env: dict[str, Any] = dict(code_runtime_env(code))
    if env:
        runtime_env["env_vars"] = dict(env)
    entrypoint = " ".join(shlex.quote(a) for a in [python, "-m", "study.run", str(staged), *run_args])
    job_id = _submit_when_an_agent_is_up(
        lambda: client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                                  metadata={"brainage_study": Path(space_path).name}), url=url)
    print(f"[submit] job {job_id} submitted to {url}: {entrypoint}", file=out, flush=True)
    print(f"[submit] dashboard Jobs view: {url}/#/jobs/{job_id}", file=out, flush=True)
    shown = 0
    status = None
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            out.write(logs[shown:])
            out.flush()
            shown = len(logs)
        if str(status) in _JOB_TERMINAL or status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(poll_s)
    info = client.get_job_info(job_id)
    name = getattr(status, "value", str(status))
    print(f"[submit] job {job_id} {name}" + (f": {info.message}" if info.message else ""), file=out, flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1
