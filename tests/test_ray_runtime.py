"""study.ray_runtime: what a local Ray's processes inherit (issue 12, cases 10-11), checked in a child process."""

from __future__ import annotations

import os
import subprocess
import sys

from study import ray_runtime


def test_processes_started_during_a_local_ray_init_are_told_the_machine_is_no_cluster(monkeypatch):
    # A child started inside the environment (as the dashboard and the raylet are during ray.init) resolves
    # 127.0.0.1 to itself, not to the host's public address where a loopback-only Ray does not listen.
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    probe = "import ray.util; print(ray.util.get_node_ip_address())"  # what Ray resolves 127.0.0.1 to
    with ray_runtime.environment(ray_runtime.NO_CLUSTER_ENV):
        inside = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert inside.strip() == "127.0.0.1"
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ  # restored afterwards


def test_the_environment_is_restored_after_an_error(monkeypatch):
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    try:
        with ray_runtime.environment(ray_runtime.NO_CLUSTER_ENV):
            assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
            raise RuntimeError("ray.init failed")
    except RuntimeError:
        pass
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"


def test_what_ray_init_sets_meanwhile_stays(monkeypatch):
    # ray.init sets RAY_AUTH_MODE=token for a new local cluster; the study processes this driver starts later
    # (study/run.py --address) connect only if they inherit it. Restoring the whole environment lost it.
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    with ray_runtime.environment(ray_runtime.NO_CLUSTER_ENV):
        os.environ["RAY_AUTH_MODE"] = "token"
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ


def test_a_joined_cluster_gets_the_trial_process_settings_as_job_env(monkeypatch):
    # The processes of a cluster started before the study do not inherit the driver's DEFAULT_ENV: the keys
    # read in the trial processes (Train's state tracking, Tune's reuse wait) travel as the job's env_vars.
    from types import SimpleNamespace

    from study.space.settings import Resources

    seen = {}
    monkeypatch.setattr(ray_runtime.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_runtime.ray, "init", lambda **kw: seen.update(kw) or SimpleNamespace(dashboard_url=""))
    monkeypatch.setattr(ray_runtime.ray, "cluster_resources", lambda: {"CPU": 8.0})
    ray_runtime.start_ray(Resources(), 1, {"BRAINAGE_CACHE": "/cache"}, address="10.0.0.1:6379")
    env_vars = seen["runtime_env"]["env_vars"]
    assert env_vars["BRAINAGE_CACHE"] == "/cache"
    for key in ray_runtime.TRIAL_PROCESS_ENV:
        assert env_vars[key] == ray_runtime.DEFAULT_ENV[key]
    assert env_vars["TUNE_FUNCTION_THREAD_TIMEOUT_S"] == "10"
