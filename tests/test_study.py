"""The study runner end to end on CPU: Ray Tune + Optuna over Ray Train DDP trials (smoke.yaml).

One Ray for the whole module (started here, num_cpus=4 logical, dashboard on); each study is a real
``python -m study.run`` process that joins it through RAY_ADDRESS, so that the driver can be killed.
Faults are deterministic test hooks (tests/fault_site/fault_hooks.py): BRAINAGE_FAULT_KILL_DRIVER_AFTER_RESULTS
(installed in the driver, started with study_fixtures.fault_env) and BRAINAGE_FAULT_KILL_AT_EPOCH / _RANK /
_ONCE_FILE (installed in the test Ray's workers by study_fixtures.start_test_ray). The DDP trials' reuse of one
trial process and ASHA's aborts are checked on an object store (tests/test_study_object_store.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
from study_fixtures import fault_env, shared_store_cache, start_test_ray

from study import compat
from study.results import read_results

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"
EXPECTED_COLUMNS = {"trial_id", "param.loss.temperature", "epoch", "train_loss", "val_mae_int", "val_mae_ext",
                    "val_bacc", "test_mae_int", "test_mae_ext", "leaked", "status", "checkpoint_path", "wall_s",
                    "compute_s", "seed", "store_fingerprint", "git_commit", "versions", "protocol"}

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    import ray

    address = start_test_ray()
    try:
        yield address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def cache(tmp_path_factory, store_cache):
    return shared_store_cache(tmp_path_factory.mktemp("cache"), store_cache)


def run_study(ray_address, cache, storage, *args, env=None, timeout=600):
    full_env = fault_env({**os.environ, "RAY_ADDRESS": ray_address, "BRAINAGE_CACHE": str(cache), **(env or {})})
    cmd = [sys.executable, "-m", "study.run", str(SMOKE), "--storage", str(storage), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc


def show(proc):
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"


def optuna_trials(study_dir: Path, name: str):
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{study_dir / 'optuna.db'}")
    return study.get_trials(deepcopy=False)


def test_smoke_study_with_ddp_trials_a_killed_worker_and_a_killed_driver(ray_address, cache, tmp_path):
    """The smoke study (2 DDP trials of 2 epochs) through two faults, then resumed:

    - a killed worker: rank 1 of the first trial kills itself at the start of epoch 2 (test hook, once); Train
      restarts the worker group from the epoch-1 checkpoint;
    - a killed driver: it sends itself SIGKILL once it has written 3 results (test hook), during the second
      trial; ``--resume`` finishes the study without re-running or losing a row, the second trial's DDP run
      restored from its epoch-1 checkpoint."""
    once = tmp_path / "fault-fired"
    killed = run_study(ray_address, cache, tmp_path, "--name", "smoke",
                       # TUNE_GLOBAL_CHECKPOINT_S=0: Tune saves its experiment state at every step, so where the
                       # killed driver stopped is exact (the other studies keep Tune's period: fewer writes)
                       env={"TUNE_GLOBAL_CHECKPOINT_S": "0", "BRAINAGE_FAULT_KILL_AT_EPOCH": "2",
                            "BRAINAGE_FAULT_RANK": "1", "BRAINAGE_FAULT_ONCE_FILE": str(once),
                            "BRAINAGE_FAULT_KILL_DRIVER_AFTER_RESULTS": "3"})
    assert killed.returncode == -signal.SIGKILL, show(killed)
    assert once.exists()  # the worker of rank 1 did kill itself at the start of epoch 2
    study_dir = tmp_path / "smoke"
    before = read_results(study_dir / "results.parquet")  # the table and its journal, as the driver left them
    assert sorted(before.groupby("trial_id")["epoch"].apply(list).tolist()) == [[1], [1, 2]]
    finished = before.groupby("trial_id")["epoch"].max().idxmax()
    assert "optuna-dashboard sqlite:///" in killed.stdout and "Ray dashboard" in killed.stdout

    proc = run_study(ray_address, cache, tmp_path, "--name", "smoke", "--resume")
    assert proc.returncode == 0, show(proc)
    # Each epoch was reported once per trial: the restarted worker group resumed at epoch 2 from its checkpoint,
    # and the resumed driver went on with the second trial's epoch 2 only.
    out = killed.stdout + proc.stdout
    assert out.count("epoch 1/2") == 2 and out.count("epoch 2/2") == 2, show(killed) + show(proc)
    for name in ("space.yaml", "config.yaml", "optuna.db", "results.parquet", "tune"):
        assert (study_dir / name).exists(), name

    df = pd.read_parquet(study_dir / "results.parquet")
    assert EXPECTED_COLUMNS <= set(df.columns), EXPECTED_COLUMNS - set(df.columns)
    assert df["trial_id"].nunique() == 2
    assert sorted(df.groupby("trial_id")["epoch"].apply(list).tolist()) == [[1, 2], [1, 2]]
    # Rows written before the crash are kept as they were (a re-run would change train_loss / wall_s).
    merged = before.merge(df, on=["trial_id", "epoch"], suffixes=("_before", "_after"))
    assert len(merged) == 3
    for col in ("train_loss", "wall_s", "val_mae_ext"):
        assert merged[f"{col}_before"].tolist() == pytest.approx(merged[f"{col}_after"].tolist())
    # The trial finished before the crash trained its 2 epochs once.
    log = [json.loads(line) for line in (study_dir / "trials" / finished / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    # the fast probes during the trial, the exact protocol for its last evaluation
    assert df.sort_values("epoch").groupby("trial_id")["protocol"].apply(list).tolist() == [["fast", "exact"]] * 2
    assert (df["status"] == "completed").all()
    assert df["checkpoint_path"].notna().all()
    assert (df["compute_s"] - 2 * df["wall_s"]).abs().max() < 1e-6  # 2 DDP workers
    assert df["param.loss.temperature"].between(0.05, 0.5).all()
    assert df["store_fingerprint"].nunique() == 1 and df["versions"].map(lambda v: "ray" in json.loads(v)).all()

    trials = optuna_trials(study_dir, "smoke")
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 2
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL) for t in trials)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    last = df[df["epoch"] == 2].sort_values("param.loss.temperature")
    by_param = sorted(complete, key=lambda t: t.params["loss.temperature"])
    assert [t.value for t in by_param] == pytest.approx(last["val_mae_ext"].tolist())
    assert [t.params["loss.temperature"] for t in by_param] == pytest.approx(last["param.loss.temperature"].tolist())

    again = run_study(ray_address, cache, tmp_path, "--name", "smoke")
    assert again.returncode == 2 and "add --resume" in again.stderr

    # Issue 12, case 11: with RAY_TRAIN_ENABLE_STATE_TRACKING=1 (the test Ray's, as a study's own Ray) the dashboard
    # lists the trials' Train runs, their attempts and workers on this loopback-only Ray (the endpoint used to hang
    # there: the dashboard's own connection rewrote 127.0.0.1 to the host's public address, until the Ray's
    # processes were told it is no cluster). The first trial's run has two attempts: rank 1 killed itself.
    runs = [r for r in train_runs_from_the_dashboard() if str(r.get("name")).startswith("trial_")]
    assert len(runs) >= 2, runs
    assert all(len(a.get("workers", [])) == 2 for r in runs for a in r["attempts"]), runs
    assert max(len(r["attempts"]) for r in runs) == 2, [len(r["attempts"]) for r in runs]


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def test_doomed_study_fails_fast_on_a_loopback_ray(ray_address, cache, tmp_path):
    """Issue 12, cases 6, 10 and 11 with one study: optimizer.lr=1e6 makes the DDP trial diverge. It used to
    be retried 12 times (Tune x Train), print `done: .../results.parquet` (never written) and exit 0. One
    trial: the stopper's rule for several (the same error twice) is tests/test_study_failures.py's."""
    proc = run_study(ray_address, cache, tmp_path, "--name", "doomed", "optimizer.lr=1e6", "study.num_samples=1")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, show(proc)
    assert lines[-1].startswith("error: study doomed: no trial produced a result"), show(proc)
    assert "NonFiniteLossError: non-finite or degenerate model output" in lines[-1]
    assert "done:" not in proc.stdout and not (tmp_path / "doomed" / "results.parquet").exists()
    failures = [f.read_text().count("Failure #") for f in (tmp_path / "doomed" / "tune").glob("*/error.txt")]
    assert failures and all(n == 1 for n in failures), failures  # not retried by Tune
    assert "[FailurePolicy] RETRY" not in proc.stdout + proc.stderr  # nor by Train

    # case 10: every listener of this module's Ray (started as a study starts its own) is on loopback
    ours = _descendants(os.getpid())
    listeners = [line.split() for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True,
                                                         check=True).stdout.splitlines()]
    mine = [f[3] for f in listeners if any(f"pid={p}," in f[-1] for p in ours)]
    assert mine, "no listener of this Ray found"
    assert all(a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")) for a in mine), mine


def train_runs_from_the_dashboard() -> list[dict]:
    """The Train runs that the dashboard of this module's Ray lists (Train V2's state API)."""
    import urllib.request

    url = compat.joined_dashboard_url()
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    token = os.environ.get("RAY_AUTH_TOKEN") or (token_file.read_text().strip() if token_file.exists() else "")
    request = urllib.request.Request(f"http://{url}/api/train/v2/runs/v1",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    return json.loads(urllib.request.urlopen(request, timeout=90).read())["train_runs"]
