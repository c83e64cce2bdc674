"""study/final.py: the top configurations of a real smoke study retrained with several seeds.

The smoke study (in-trial training, 2 trials of 2 epochs on a 40-subject 6 mm cohort: the session's
``smoke_study`` fixture, tests/conftest.py) and the final run are real processes, each with its own local Ray.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from scipy import stats

from brainage_core.errors import DataError
from study.final import select_top

ROOT = Path(__file__).resolve().parents[1]

# starts Ray or runs study commands in subprocesses (make test-fast leaves it out)
pytestmark = pytest.mark.slow


def test_select_top_uses_completed_trials_last_evaluation():
    df = pd.DataFrame([
        {"trial_id": "a", "epoch": 1, "val_mae_ext": 1.0, "status": "completed"},  # best early, worse at the end
        {"trial_id": "a", "epoch": 2, "val_mae_ext": 9.0, "status": "completed"},
        {"trial_id": "b", "epoch": 2, "val_mae_ext": 5.0, "status": "completed"},
        {"trial_id": "c", "epoch": 1, "val_mae_ext": 0.5, "status": "pruned"},
    ])
    top = select_top(df, "val_mae_ext", "min", 5)
    assert top["trial_id"].tolist() == ["b", "a"]
    with pytest.raises(DataError, match="no completed trial"):
        select_top(df[df["status"] == "pruned"], "val_mae_ext", "min", 1)


def run(args, env):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)


def show(proc):
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"


@pytest.mark.timeout(1200)
def test_final_on_the_smoke_study_writes_final_rows_with_intervals(smoke_study, tmp_path):
    """final.py on a copy of the session's smoke study (``smoke_study``: in-trial, 40 subjects)."""
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
