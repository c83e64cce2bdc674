"""The cluster simulation of ``bench/cluster_sim.py``: its stand-in trainable, the runner's test hook that
selects it, and one small simulated study (4 fake GPUs, 3 two-GPU DDP trials) through the runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cluster_sim import EPOCH_S_ENV, EVENTS_ENV, STANDIN, standin_train  # noqa: E402
from brainage_core.errors import ConfigError  # noqa: E402
from study.trial import TRAIN_FN_ENV, training_function  # noqa: E402

#: a floor for the GPU-slot utilisation of the small simulated study: it catches a runner that leaves slots
#: idle (one trial at a time gives ~0.5 here); the issue's goal (>= 0.95) is a figure of the benchmark
#: (docs/cluster-sim.md), not of this test, whose 2 slots and 3 trials on a loaded CI machine measure ~0.9
UTILISATION_FLOOR = 0.75


def _config(epochs: int = 4, every: int = 1, temperature: float = 0.1) -> dict:
    return {"training": {"epochs": epochs}, "evaluation": {"eval_every": every}, "loss": {"temperature": temperature},
            "optimizer": {"lr": 1e-3}, "model": {"backbone": "resnet18"}}


def test_hook_selects_the_training_function(monkeypatch):
    from brainage_core.training import train

    monkeypatch.delenv(TRAIN_FN_ENV, raising=False)
    assert training_function() is train
    monkeypatch.setenv(TRAIN_FN_ENV, STANDIN)
    fn = training_function()
    assert fn is standin_train and fn.torch_backend == "gloo"
    monkeypatch.setenv(TRAIN_FN_ENV, "bench.cluster_sim:no_such_function")
    with pytest.raises(ConfigError, match=f"{TRAIN_FN_ENV}='bench.cluster_sim:no_such_function'"):
        training_function()
    monkeypatch.setenv(TRAIN_FN_ENV, "no_such_module_xyz:train")
    with pytest.raises(ConfigError, match="expected module:function"):
        training_function()


def test_runner_never_names_the_stand_in():
    for path in (ROOT / "study").glob("*.py"):
        text = path.read_text()
        assert "standin" not in text and "cluster_sim" not in text.replace("bench/cluster_sim.py", ""), path


def test_standin_keeps_the_training_contract(tmp_path, monkeypatch):
    monkeypatch.setenv(EPOCH_S_ENV, "0.01")
    monkeypatch.setenv(EVENTS_ENV, str(tmp_path / "events"))
    (tmp_path / "events").mkdir()
    seen: list[tuple[dict, Path | None]] = []
    last = standin_train(_config(epochs=5, every=2), tmp_path / "t1", callback=lambda m, c: seen.append((m, c)))
    assert [m["epoch"] for m, _ in seen] == [2, 4, 5]  # every 2 epochs and at the last one
    assert all(c is not None and (c / "state.json").exists() for _, c in seen)
    assert last["epoch"] == 5 and last["val_mae_ext"] < seen[0][0]["val_mae_ext"]  # the curve goes down
    assert 0.04 < last["wall_s"] < 2.0
    kinds = [json.loads(line)["e"] for line in (tmp_path / "events" / "t1.jsonl").read_text().splitlines()]
    assert kinds == ["start", "rank", "report", "report", "report", "end"]
    # rank 1: same metrics, no checkpoint folder
    other: list = []
    standin_train(_config(epochs=5, every=2), tmp_path / "t1r1", callback=lambda m, c: other.append((m, c)), rank=1,
                  world_size=2)
    assert [c for _, c in other] == [None, None, None]
    assert [m["val_mae_ext"] for m, _ in other] == [m["val_mae_ext"] for m, _ in seen]
    # resumed from the epoch-4 checkpoint: only epoch 5 is trained again; a finished run re-reports
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "state.json").write_text(json.dumps({"epoch": 4, "wall_s": 1.0, "metrics": seen[1][0]}))
    again: list = []
    standin_train(_config(epochs=5, every=2), tmp_path / "t2", callback=lambda m, c: again.append(m), resume_from=ckpt)
    assert [m["epoch"] for m in again] == [5] and again[0]["wall_s"] > 1.0
    (ckpt / "state.json").write_text(json.dumps({"epoch": 5, "wall_s": 1.0, "metrics": seen[2][0]}))
    again.clear()
    standin_train(_config(epochs=5, every=2), tmp_path / "t3", callback=lambda m, c: again.append(m), resume_from=ckpt)
    assert again == [seen[2][0]]


def test_curves_rank_configurations(monkeypatch):
    monkeypatch.setenv(EPOCH_S_ENV, "0")
    monkeypatch.delenv(EVENTS_ENV, raising=False)
    good = standin_train(_config(temperature=0.1), Path("/nonexistent-unused"), rank=1)
    bad = standin_train(_config(temperature=0.5), Path("/nonexistent-unused"), rank=1)
    assert good["val_mae_ext"] < bad["val_mae_ext"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_small_simulated_cluster(tmp_path):
    """4 fake GPUs, 3 trials of 2-GPU DDP through study.run (2 at a time, then the third in the first slot
    freed): every trial's rows reach results.parquet and a freed GPU slot gets the next trial. Each DDP trial
    starts ~5 processes (its Train controller, 2 workers, a synchronisation actor, a placement-group cleaner),
    the controller and workers each importing torch through ray.train.torch (~5 CPU-seconds): ~15 process
    starts, most of the test's time on 2 cores (4 trials took 75 s alone and 128 s in the suite; 20 trials
    on 8 GPUs 170 s alone and 245 s in the suite). Epochs of 0.5 s: the
    sleeps are not what is checked, and a trial's slot is held from RUNNING, start-up included."""
    out = tmp_path / "sim.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cluster_sim.py"), "--gpus", "4", "--gpus-per-trial", "2",
         "--trials", "3", "--epochs", "4", "--epoch-s", "0.5", "--grace", "1", "--workdir", str(tmp_path / "w"),
         "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    df = pd.read_parquet(tmp_path / "w" / "studies" / "sim" / "results.parquet")
    events = {p.stem: [json.loads(x) for x in p.read_text().splitlines()]
              for p in (tmp_path / "w" / "events").glob("*.jsonl")}
    assert len(events) == 3 and df["trial_id"].nunique() == 3
    for trial, ev in events.items():  # every evaluation before ASHA's stop is a row (a stopped trial's run
        reported = sorted(e["epoch"] for e in ev if e["e"] == "report")  # may report once more, unheard)
        rows = sorted(df.loc[df["trial_id"] == trial, "epoch"])
        assert rows and rows == reported[:len(rows)], (trial, rows, reported)
    assert set(df.groupby("trial_id")["status"].last()) <= {"completed", "pruned"}
    assert report["check"]["ok"], report["check"]
    slots = report["utilisation"]["slots_while_trials_remain"]
    assert slots >= UTILISATION_FLOOR, f"GPU-slot utilisation {slots:.3f} while trials remain < {UTILISATION_FLOOR}"


def test_ddp_trials_that_fit():
    from study.cluster import ddp_trials_that_fit

    assert ddp_trials_that_fit(2, True, 1.0, {"CPU": 64, "GPU": 8}) == 4  # GPUs bound
    assert ddp_trials_that_fit(4, True, 1.0, {"CPU": 64, "GPU": 64}) == 12  # CPUs bound: 5 per trial
    assert ddp_trials_that_fit(2, False, 1.0, {"CPU": 4}) == 1
    with pytest.raises(ConfigError, match="needs 5 CPUs and 4 GPUs; the Ray cluster has 64 CPUs and 2 GPUs"):
        ddp_trials_that_fit(4, True, 1.0, {"CPU": 64, "GPU": 2})


def test_progress_table_keeps_to_the_best_rows():
    from study.run import progress_table
    from study.space import load_search_space

    space = load_search_space(ROOT / "search_spaces" / "smoke.yaml")
    df = pd.DataFrame([{"trial_id": f"t{i:02d}", "param.loss.temperature": 0.1, "epoch": 1, "status": "completed",
                        "val_mae_ext": 10.0 - i * 0.1} for i in range(30)])
    text = progress_table(df, space, max_rows=5)
    lines = text.splitlines()
    assert len(lines) == 1 + 1 + 5 + 1 and "30/2 trials done" in lines[0]
    assert lines[2].startswith("t29") and lines[2].endswith("*") and "25 more trial(s)" in lines[-1]
    assert len(progress_table(df, space).splitlines()) == 32
