"""The tests that read one real smoke study, run once for the module (``smoke_study``): the HTML report and the
RAMP export on it (analysis/report.py, study/export.py).

The study (search_spaces/smoke.yaml in-trial: 2 trials of 2 epochs on a 40-subject 6 mm cohort) is a real
process with its own local Ray, as a user runs it. study/final.py is tested on the object store's smoke study
(tests/test_study_object_store.py::test_final_on_the_bucket_writes_final_rows_with_intervals).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from study_fixtures import shared_store_cache

from study.export import rank_checkpoints

ROOT = REPO = Path(__file__).resolve().parents[1]

# starts Ray and runs study commands in subprocesses (make test-fast leaves it out)
pytestmark = pytest.mark.slow

#: the search space and overrides of :func:`smoke_study`: smoke.yaml in-trial (one worker per trial) on 40 subjects,
#: without Tune's per-trial loggers (the report and the export read results.parquet and the checkpoints only)
SMOKE_STUDY_ARGS = ("study.resources.num_workers=1", "data.synthetic.subjects=40", "study.tune_loggers=false")


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory, store_cache) -> dict:
    """One real smoke study shared by the tests of this module, which only read its outputs (report,
    export).

    ``python study/run.py search_spaces/smoke.yaml`` run from a folder outside the repository (2 trials of
    2 epochs, in-trial training, the 6 mm cohort of 40 subjects) as a user runs it: its own local Ray (no
    RAY_ADDRESS), its own cache (``BRAINAGE_CACHE``; the cohort and store from :func:`store_cache`).
    Returns ``{"dir": study folder, "env": the environment it ran with, "proc": the finished process}``.
    A test that writes into the study works on a copy (``shutil.copytree``)."""
    root = tmp_path_factory.mktemp("smoke_study")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(BRAINAGE_CACHE=str(shared_store_cache(root / "cache", store_cache)), PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "study" / "run.py"), str(ROOT / "search_spaces" / "smoke.yaml"),
                           *SMOKE_STUDY_ARGS, "--storage", str(root / "studies")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return {"dir": root / "studies" / "smoke", "env": env, "proc": proc}


def test_tune_loggers_off_writes_no_tune_log_files(smoke_study):
    tune_dir = smoke_study["dir"] / "tune"
    trial_dirs = [p for p in tune_dir.iterdir() if p.is_dir()]
    assert trial_dirs  # Tune's trial folders still hold the checkpoints
    logs = [p.name for d in trial_dirs for p in d.iterdir() if p.name in ("result.json", "progress.csv")
            or p.name.startswith("events.out.tfevents")]
    assert logs == []
    assert "TensorBoard" not in smoke_study["proc"].stdout
    assert (smoke_study["dir"] / "results.parquet").exists()
    # nor the ResultGrid's warning, once per trial, that those files are missing
    out = smoke_study["proc"].stdout + smoke_study["proc"].stderr
    assert "Could not fetch metrics" not in out and "Failed to fetch metrics" not in out



def test_finished_trials_keep_tune_statistics_of_the_objective_only(smoke_study):
    """The driver's callback drops, at each trial's end, Tune's statistics of every result key but the
    objective (driver memory per trial, docs/cluster-sim.md); Tune's last experiment snapshot shows it."""
    state = sorted((smoke_study["dir"] / "tune").glob("experiment_state-*.json"))[-1]
    trials = json.loads(state.read_text())["trial_data"]
    assert len(trials) == 2
    for _, run_metadata in trials:
        meta = json.loads(run_metadata)
        assert set(meta["metric_analysis"]) == {"val_mae_ext"} == set(meta["metric_n_steps"]), meta["metric_analysis"]
        assert {"val_bacc", "train_loss", "epoch"} <= set(meta["last_result"])  # the last result is whole

def _images(html: str) -> int:
    return len(re.findall(r'<img[^>]+src="data:image/png;base64,', html))


@pytest.mark.timeout(1200)  # the module's smoke study is built in this test's set-up
def test_report_and_export_on_real_smoke_study(smoke_study, tmp_path):
    """The runner's smoke study (Ray Tune, 2 trials, in-trial training: ``smoke_study``), then
    the report and the export on it."""
    env, study = smoke_study["env"], smoke_study["dir"]
    out = tmp_path / "report.html"
    proc = subprocess.run([sys.executable, str(REPO / "analysis" / "report.py"), str(study), "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    html = out.read_text()
    results = pd.read_parquet(study / "results.parquet")
    for trial in results["trial_id"].unique():
        assert str(trial) in html  # every trial on the leaderboard
    for heading in ("Leaderboard", "Pareto front", "Hyper-parameter importances", "Metrics against epoch",
                    "confidence intervals", "Published reference figures"):
        assert heading in html, heading
    assert _images(html) == 4  # pareto, importances (2 COMPLETE Optuna trials), epochs, reference
    assert "study/final.py" in html  # one seed per configuration
    sub = tmp_path / "ramp-submission" / "smoke"
    proc = subprocess.run([sys.executable, str(REPO / "study" / "export.py"), str(study), "--out", str(sub)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from rampwf.utils.sanitize import _sanitize_input

    _sanitize_input((sub / "estimator.py").read_text())
    meta = pd.read_pickle(sub / "metadata.pkl")
    top = rank_checkpoints(study, "val_lc").iloc[0]
    assert (meta["trial_id"], meta["epoch"]) == (top["trial_id"], top["epoch"])
    stored = results[[Path(str(p), "checkpoint.pt").is_file() for p in results["checkpoint_path"]]]
    assert meta["metric_value"] == pytest.approx(stored["val_lc"].min())
