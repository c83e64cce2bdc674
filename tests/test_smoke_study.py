"""The tests that read one real smoke study, run once for the module (``smoke_study``): the HTML report and the
RAMP export on it (analysis/report.py, study/export.py), and study/final.py on a copy of it.

The study (search_spaces/smoke.yaml in-trial: 2 trials of 2 epochs on a 40-subject 6 mm cohort) and the
final run are real processes, each with its own local Ray, as a user runs them. These checks were in
tests/test_analysis.py and tests/test_final.py, each running its own smoke study.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from scipy import stats
from study_fixtures import shared_store_cache

from study.export import rank_checkpoints
from study.final import select_top

ROOT = REPO = Path(__file__).resolve().parents[1]

# starts Ray and runs study commands in subprocesses (make test-fast leaves it out)
pytestmark = pytest.mark.slow

#: the search space and overrides of :func:`smoke_study`: smoke.yaml in-trial (one worker per trial) on 40 subjects,
#: without Tune's per-trial loggers (report, export and final read results.parquet and the checkpoints only)
SMOKE_STUDY_ARGS = ("study.resources.num_workers=1", "data.synthetic.subjects=40", "study.tune_loggers=false")


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory, store_cache) -> dict:
    """One real smoke study shared by the tests of this module, which only read its outputs (report, export,
    final on a copy).

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


def run(args, env):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)


def show(proc):
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"


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


@pytest.mark.timeout(1200)
def test_final_on_the_smoke_study_writes_final_rows_with_intervals(smoke_study, tmp_path):
    """final.py on a copy of the module's smoke study (``smoke_study``: in-trial, 40 subjects)."""
    study_dir = tmp_path / "smoke"
    shutil.copytree(smoke_study["dir"], study_dir)
    env = smoke_study["env"]
    d = yaml.safe_load((study_dir / "config.yaml").read_text())
    search = pd.read_parquet(study_dir / "results.parquet")
    best = select_top(search, "val_mae_ext", "min", 1)["trial_id"].iloc[0]

    proc = run([str(ROOT / "study" / "final.py"), str(study_dir), "--top-k", "1", "--seeds", "2"], env)
    assert proc.returncode == 0, show(proc)
    results = pd.read_parquet(study_dir / "results.parquet")
    final = results[results["status"] == "final"]
    assert len(final) == 2 and final["final"].astype(bool).all() and (final["kind"] == "final").all()
    assert len(results) == len(search) + 2  # the search rows are kept
    assert sorted(final["seed"]) == [0, 1] and (final["source_trial_id"] == best).all()
    assert (final["epoch"] == d["training"]["epochs"]).all()  # the same budget as the search
    source_t = search.loc[search["trial_id"] == best, "param.loss.temperature"].iloc[0]
    assert (final["param.loss.temperature"] == source_t).all()
    for m in ("test_mae_int", "test_mae_ext", "test_bacc"):
        assert final[m].notna().all()
    assert final["val_mae_ext"].isna().all()  # trained on the whole training split: no validation data
    assert final["trial_id"].nunique() == 2 and not set(final["trial_id"]) & set(search["trial_id"])

    table = pd.read_parquet(study_dir / "final.parquet")
    summary = table[table["kind"] == "summary"]
    assert len(summary) == 1 and summary["n_seeds"].iloc[0] == 2
    values = final["test_mae_ext"].to_numpy()
    low, high = stats.t.interval(0.95, 1, loc=values.mean(), scale=stats.sem(values))
    row = summary.iloc[0]
    assert row["test_mae_ext_mean"] == pytest.approx(values.mean())
    assert (row["test_mae_ext_ci95_low"], row["test_mae_ext_ci95_high"]) == pytest.approx((low, high))
    assert (study_dir / "final_summary.csv").exists() and "[final] #1" in proc.stdout

    from analysis.loader import load_studies

    loaded = load_studies([study_dir])
    assert int(loaded["final"].sum()) == 2
