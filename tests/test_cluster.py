"""Studies on an existing Ray cluster: exposure rules, shared-storage probes, --address, --submit.

The cluster is made here: ``ray.cluster_utils.Cluster`` with two nodes of 1 CPU each (a head with the
dashboard on 127.0.0.1 and token authentication on, and a worker node), torn down at the end of the
module. The smoke study (in-trial training, 2 concurrent trials) runs through ``--address`` so that its
two trials must land on different nodes; a one-trial study goes through ``--submit`` as a Ray Job and the
dashboard's REST API (with the token) must list it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from brainage_core.errors import ConfigError
from study import cluster

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"

# starts Ray or runs study commands in subprocesses (make test-fast leaves it out)
pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------------------------
# Without Ray
# --------------------------------------------------------------------------------------------------


def test_dashboard_exposure_rules():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.1.1"):
        assert cluster.is_loopback(host)
        assert cluster.check_dashboard_exposure(host, allow_no_auth=False, auth_mode="disabled") == []
    for host in ("0.0.0.0", "10.0.0.5", "head.example.org"):
        assert not cluster.is_loopback(host)
        warnings = cluster.check_dashboard_exposure(host, allow_no_auth=False, auth_mode="")
        assert len(warnings) == 1 and host in warnings[0] and "run arbitrary code" in warnings[0]
        with pytest.raises(ConfigError, match="RAY_AUTH_MODE=disabled") as info:
            cluster.check_dashboard_exposure(host, allow_no_auth=False, auth_mode="disabled")
        assert "--i-understand-no-auth" in str(info.value)
        warnings = cluster.check_dashboard_exposure(host, allow_no_auth=True, auth_mode="disabled")
        assert len(warnings) == 2 and "authentication is OFF" in warnings[1]


def test_cli_refuses_exposed_dashboard_without_auth(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "BRAINAGE_CACHE": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "study.run", str(SMOKE), "--storage", str(tmp_path / "studies"),
           "--dashboard-host", "0.0.0.0"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --dashboard-host 0.0.0.0")
    assert not (tmp_path / "studies").exists()
    proc = subprocess.run([*cmd, "--submit", "--address", "http://10.1.2.3:8265"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error: --dashboard-host 10.1.2.3" in proc.stderr


def test_auth_token_and_addresses(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    (tmp_path / "tok").write_text("abc123\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert cluster.auth_headers() == {"Authorization": "Bearer abc123"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "fromenv")
    assert cluster.read_auth_token() == "fromenv"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "none"))
    assert cluster.auth_headers() == {}
    assert cluster.dashboard_url(None) == "http://127.0.0.1:8265"
    assert cluster.dashboard_url("10.0.0.1:8265") == "http://10.0.0.1:8265"
    with pytest.raises(ConfigError, match="expected its HTTP address"):
        cluster.dashboard_url("ray://10.0.0.1:10001")
    assert cluster.code_runtime_env("installed") == {}
    shipped = cluster.code_runtime_env("ship")["py_modules"]
    assert [Path(p).name for p in shipped] == ["brainage_core", "study"]


def test_sqlite_copy_is_a_consistent_snapshot(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'local.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    cluster.copy_sqlite(tmp_path / "local.db", tmp_path / "copy.db")
    copy = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'copy.db'}")
    assert len(copy.trials) == 3
    a = cluster.local_optuna_db("/shared/studies/x", tmp_path)
    assert a.parent == tmp_path / "optuna" and a.name.startswith("x-")
    assert a != cluster.local_optuna_db("/o/x", tmp_path)


# --------------------------------------------------------------------------------------------------
# A two-node cluster
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    import secrets

    from ray.cluster_utils import Cluster

    from study.compat import token_auth

    # Token authentication on, as a real cluster should run, for this process and the study processes it
    # starts. The token is this module's own file, so the module runs alone on a machine that has no
    # ~/.ray/auth_token yet.
    token_file = tmp_path_factory.mktemp("ray-auth") / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    dashboard_port = free_port()
    with token_auth(token_file):
        # The head's dashboard agent gets a free port too: at its default (52365) it loses the port to any
        # other Ray on this machine (the other test worker's), stays up without HTTP, and the jobs API, which
        # only uses the head node's agent, answers "No available agent" for ever.
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "redis_port": free_port(), "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port, "dashboard_agent_listen_port": free_port(),
            "object_store_memory": 100 * 2**20})
        try:
            c.add_node(num_cpus=1, object_store_memory=100 * 2**20)
            c.wait_for_nodes()
            yield c, f"http://127.0.0.1:{dashboard_port}"
        finally:
            c.shutdown()


def study_env(tmp_path, store_cache):
    from study_fixtures import shared_store_cache

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(BRAINAGE_CACHE=str(shared_store_cache(tmp_path / "cache", store_cache)), PYTHONPATH=str(ROOT))
    return env


def show(proc):
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"


SMALL = ["data.synthetic.subjects=40", "study.resources.num_workers=1", "study.max_concurrent_trials=2",
         "evaluation.final_protocol=fast"]


@pytest.mark.timeout(900)
def test_smoke_study_through_address_uses_both_nodes(two_nodes, tmp_path, store_cache):
    c, _ = two_nodes
    node_ids = {n.node_id for n in c.list_all_nodes()}
    cmd = [sys.executable, "-m", "study.run", str(SMOKE), *SMALL, "--address", c.address,
           "--storage", str(tmp_path / "studies")]
    proc = subprocess.run(cmd, cwd=ROOT, env=study_env(tmp_path, store_cache), capture_output=True, text=True,
                          timeout=840)
    assert proc.returncode == 0, show(proc)
    assert "2 node(s) see the study folder and the store" in proc.stdout
    study_dir = tmp_path / "studies" / "smoke"
    df = pd.read_parquet(study_dir / "results.parquet")
    assert df["trial_id"].nunique() == 2 and (df["status"] == "completed").all()
    per_trial = df.groupby("trial_id")["node_id"].unique()
    assert all(len(v) == 1 for v in per_trial)  # a trial stays on its node
    assert {v[0] for v in per_trial} == node_ids, per_trial  # one trial on each node
    # sqlite stays on the driver's disk; the study folder holds a consistent copy
    copy = optuna.load_study(study_name="smoke", storage=f"sqlite:///{study_dir / 'optuna.db'}")
    assert sorted(t.state.name for t in copy.trials) == ["COMPLETE", "COMPLETE"]
    assert "optuna-dashboard sqlite:///" in proc.stdout and str(tmp_path / "cache" / "optuna") in proc.stdout


@pytest.mark.timeout(600)
def test_probe_names_the_nodes_that_cannot_see_a_file(two_nodes):
    import ray

    c, _ = two_nodes
    ray.init(address=c.address, logging_level="WARNING")
    try:
        with pytest.raises(ConfigError) as info:
            cluster._probe_every_node("/nonexistent/brainage/marker", "tok", None, what="study folder /nonexistent",
                                      hint="expected shared storage")
        message = str(info.value)
        assert len(re.findall(r"node \S+ \([0-9a-f]{12}\)", message)) == 2, message  # each node named
        assert "cannot read /nonexistent/brainage/marker" in message
        assert len(cluster.check_visible_on_every_node(ROOT / "tests")) == 2
    finally:
        ray.shutdown()


@pytest.mark.timeout(900)
def test_submit_runs_the_study_as_a_ray_job(two_nodes, tmp_path, store_cache):
    _, dashboard = two_nodes
    cmd = [sys.executable, "-m", "study.run", str(SMOKE), "data.synthetic.subjects=40", "training.epochs=1",
           "study.num_samples=1", "study.resources.num_workers=1", "evaluation.final_protocol=fast",
           "--submit", "--address", dashboard,
           "--storage", str(tmp_path / "studies"), "--name", "submitted", "--job-python", sys.executable]
    proc = subprocess.run(cmd, cwd=ROOT, env=study_env(tmp_path, store_cache), capture_output=True, text=True,
                          timeout=840)
    assert proc.returncode == 0, show(proc)
    assert "[submit] job" in proc.stdout and "SUCCEEDED" in proc.stdout
    assert "[study] done" in proc.stdout  # the job's own logs were followed
    df = pd.read_parquet(tmp_path / "studies" / "submitted" / "results.parquet")
    assert df["trial_id"].nunique() == 1

    token = cluster.read_auth_token()
    assert token, "token authentication is on: the fixture's RAY_AUTH_TOKEN_PATH file must hold the token"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{dashboard}/api/jobs/", timeout=30)
    assert info.value.code in (401, 403)
    request = urllib.request.Request(f"{dashboard}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    jobs = json.loads(urllib.request.urlopen(request, timeout=30).read())
    ours = [j for j in jobs if "study.run" in (j.get("entrypoint") or "")
            and (j.get("metadata") or {}).get("brainage_study") == "smoke.yaml"]
    assert len(ours) == 1 and ours[0]["status"] == "SUCCEEDED", jobs
    assert "--name submitted" in ours[0]["entrypoint"]
    assert yaml.safe_load((tmp_path / "studies" / "submitted" / "config.yaml").read_text())["training"]["epochs"] == 1


def test_submission_waits_for_the_job_agent(monkeypatch):
    from study import jobs

    monkeypatch.setattr(jobs.time, "sleep", lambda s: None)
    no_agent = "Request failed with status code 500: No available agent to submit job, please try again later.."

    def answers(*replies):
        replies = list(replies)

        def submit():
            reply = replies.pop(0)
            if isinstance(reply, Exception):
                raise reply
            return reply
        return submit

    assert jobs._submit_when_an_agent_is_up(answers(RuntimeError(no_agent), RuntimeError(no_agent), "job-1")) \
        == "job-1"
    with pytest.raises(RuntimeError, match="status code 400"):  # any other error at once
        jobs._submit_when_an_agent_is_up(answers(RuntimeError("status code 400"), "job-1"))
    with pytest.raises(ConfigError, match="dashboard-agent-listen-port") as info:  # once the wait is over
        jobs._submit_when_an_agent_is_up(answers(RuntimeError(no_agent), "job-1"), wait_s=-1,
                                         url="http://head:8265")
    assert "http://head:8265" in str(info.value) and "No available agent" in str(info.value)


def test_the_cause_of_a_failure_known_only_as_text():
    from study.failures import cause_of

    assert cause_of("Traceback ...\nTrainable runner reuse requires reset_config() to be implemented") == \
        "Trainable runner reuse requires reset_config() to be implemented"
