"""analysis/: loader, tables and the headless HTML report.

A realistic study folder (results.parquet with the columns of docs/interfaces.md, config.yaml,
optuna.db) is built by :func:`write_study`; the report and the export on a real smoke study are in
tests/test_smoke_study.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from analysis.loader import best_rows, check_metric, load_studies
from analysis.reference import REFERENCE_SOURCE, reference_table
from analysis.report import build_report
from analysis.tables import NEEDS_FINAL, leaderboard, pareto_front, seed_summary
from brainage_core.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parent.parent
METHODS = ("yaware", "expw", "threshold")


def write_study(
    folder: Path,
    *,
    trials: int = 4,
    seeds_per_config: int = 1,
    epochs: tuple[int, ...] = (2, 4, 6),
    leaked_trials: tuple[int, ...] = (),
    statuses: dict[int, str] | None = None,
    optuna_db: bool = True,
    seed: int = 0,
) -> Path:
    """Write a study folder as study/run.py does: config.yaml, results.parquet, optuna.db."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "data": {"grid": "6mm", "modality": "vbm", "layout": "openbhb", "synthetic": {"subjects": 60}},
        "model": {"backbone": "resnet18", "head": "contrastive", "base_width": 4},
        "loss": {"method": "yaware", "kernel": "rbf", "sigma": 1.0, "temperature": 0.1},
        "training": {"epochs": max(epochs), "seed": 0},
        "search": {"loss.temperature": {"loguniform": [0.03, 1.0]}, "loss.method": {"choice": list(METHODS)}},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    rows = []
    statuses = statuses or {}
    configs = []
    for t in range(trials):
        base = t // seeds_per_config
        configs.append(
            {"temperature": float(np.exp(rng.uniform(np.log(0.03), 0.0))), "method": METHODS[base % len(METHODS)]}
            if t % seeds_per_config == 0
            else configs[-1]
        )
    for t, cfg in enumerate(configs):
        quality = rng.uniform(0.0, 1.0)
        for e in epochs:
            mae_int = 6.0 + 2 * quality - 0.2 * e + rng.normal(0, 0.1)
            mae_ext = mae_int + 1.0 + rng.normal(0, 0.1)
            bacc = 0.05 + 0.1 * rng.uniform()
            rows.append(
                {
                    "trial_id": f"trial_{t:03d}",
                    "param.loss.temperature": cfg["temperature"],
                    "param.loss.method": cfg["method"],
                    "epoch": e,
                    "train_loss": 5.0 / e,
                    "val_mae_int": mae_int,
                    "val_mae_ext": mae_ext,
                    "val_rmse_int": mae_int * 1.2,
                    "val_rmse_ext": mae_ext * 1.2,
                    "val_bacc": bacc,
                    "val_bacc_chance": 1 / 40,
                    "val_lc": mae_ext * bacc**0.3,
                    "test_mae_int": mae_int + 0.1,
                    "test_mae_ext": mae_ext + 0.2,
                    "test_rmse_int": mae_int,
                    "test_rmse_ext": mae_ext,
                    "test_bacc": bacc,
                    "test_bacc_chance": 1 / 64,
                    "test_lc": (mae_ext + 0.2) * bacc**0.3,
                    "leaked": t in leaked_trials,
                    "status": statuses.get(t, "TERMINATED"),
                    "checkpoint_path": str(folder / "tune" / f"trial_{t:03d}" / f"checkpoint_{e:06d}"),
                    "wall_s": 10.0 * e,
                    "compute_s": 9.0 * e,
                    "seed": t % seeds_per_config,
                    "store_fingerprint": "abc123",
                    "git_commit": "0" * 40,
                    "versions": "torch=2.13.0",
                }
            )
    pd.DataFrame(rows).to_parquet(folder / "results.parquet")
    if optuna_db:
        storage = f"sqlite:///{folder / 'optuna.db'}"
        study = optuna.create_study(study_name=folder.name, storage=storage, direction="minimize")
        dists = {
            "loss.temperature": optuna.distributions.FloatDistribution(0.03, 1.0, log=True),
            "loss.method": optuna.distributions.CategoricalDistribution(list(METHODS)),
        }
        table = pd.DataFrame(rows)
        for t, cfg in enumerate(configs):
            value = float(table[table["trial_id"] == f"trial_{t:03d}"]["val_lc"].min())
            study.add_trial(
                optuna.trial.create_trial(
                    params={"loss.temperature": cfg["temperature"], "loss.method": cfg["method"]},
                    distributions=dists,
                    value=value,
                )
            )
    return folder


def test_loader_tidy_columns(tmp_path):
    df = load_studies([write_study(tmp_path / "s1", trials=3), write_study(tmp_path / "s2", trials=2, seed=1)])
    assert set(df["study"]) == {"s1", "s2"}
    assert len(df) == 5 * 3
    assert df["method"].isin(METHODS).all()  # taken from param.loss.method, not the config default
    assert (df["backbone"] == "resnet18").all() and (df["grid"] == "6mm").all()
    assert (df["cohort"] == "synthetic cohort").all()
    # configurations that differ only by seed share a key
    df2 = load_studies([write_study(tmp_path / "s3", trials=4, seeds_per_config=2)])
    assert df2["config_key"].nunique() == 2


def test_best_rows_and_leaderboard(tmp_path):
    df = load_studies([write_study(tmp_path / "s", trials=4, leaked_trials=(1,))])
    best = best_rows(df, "val_lc")
    assert list(best["rank"]) == [1, 2, 3, 4]
    for _, row in best.iterrows():  # each trial's minimum over its evaluations
        trial = df[df["trial_id"] == row["trial_id"]]
        assert row["val_lc"] == pytest.approx(trial["val_lc"].min())
    assert best["val_lc"].is_monotonic_increasing
    board = leaderboard(df, "val_mae_ext")
    assert {"loss.temperature", "method", "val_mae_int", "test_mae_ext", "leaked"} <= set(board.columns)
    assert board.loc[board["trial_id"] == "trial_001", "leaked"].item()
    assert board["val_mae_ext"].is_monotonic_increasing


def test_pareto_front_is_the_non_dominated_set():
    pts = pd.DataFrame({"x": [1.0, 2.0, 3.0, 1.5, 2.5, 4.0], "y": [0.5, 0.3, 0.1, 0.6, 0.3, 0.05]})
    front = pareto_front(pts, "x", "y")
    assert sorted(front.index) == [0, 1, 2, 5]
    rng = np.random.default_rng(3)
    pts = pd.DataFrame({"x": rng.uniform(size=50), "y": rng.uniform(size=50)})
    front = pareto_front(pts, "x", "y")
    for i, p in pts.iterrows():
        dominated = ((pts["x"] <= p["x"]) & (pts["y"] <= p["y"]) & ((pts["x"] < p["x"]) | (pts["y"] < p["y"]))).any()
        assert (i in front.index) == (not dominated)


def test_seed_summary_intervals(tmp_path):
    one = seed_summary(load_studies([write_study(tmp_path / "one", trials=3)]))
    assert not one.has_intervals and one.message == NEEDS_FINAL
    assert one.table["ci_low"].isna().all()
    df = load_studies([write_study(tmp_path / "many", trials=6, seeds_per_config=3)])
    many = seed_summary(df)
    assert many.has_intervals and not many.message
    row = many.table[(many.table["metric"] == "val_lc")].iloc[0]
    values = best_rows(df)[lambda d: d["config_key"] == row["config_key"]]["val_lc"].to_numpy()
    from scipy import stats

    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    assert row["n"] == 3 and row["mean"] == pytest.approx(values.mean())
    assert row["ci_high"] - row["mean"] == pytest.approx(half)


def test_reference_table_labelled():
    ref = reference_table()
    assert (ref["source"] == REFERENCE_SOURCE).all() and "private test" in REFERENCE_SOURCE
    paper = ref.iloc[0]
    assert paper["lc"] == pytest.approx(paper["mae_ext"] * paper["bacc"] ** 0.3, abs=2e-3)


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_studies([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="results.parquet"):
        load_studies([tmp_path / "empty"])
    df = load_studies([write_study(tmp_path / "s", trials=2)])
    with pytest.raises(ConfigError, match="unknown metric 'val_nope'"):
        check_metric(df, "val_nope")
    running = write_study(tmp_path / "running", trials=2, statuses={0: "RUNNING", 1: "ERROR"})
    with pytest.raises(DataError, match="no finished trial"):
        build_report([running], tmp_path / "r.html")
    with pytest.raises(ConfigError, match="unknown metric"):
        build_report([write_study(tmp_path / "s2", trials=2)], tmp_path / "r.html", metric="val_nope")


def _images(html: str) -> int:
    return len(re.findall(r'<img[^>]+src="data:image/png;base64,', html))


@pytest.mark.slow
def test_report_html(tmp_path):
    """Two studies, one with a leaked trial, one seed per configuration: every section and figure."""
    a = write_study(tmp_path / "yaware_study", trials=4, leaked_trials=(2,))
    b = write_study(tmp_path / "expw_study", trials=3, seed=5, optuna_db=False)
    out = tmp_path / "report.html"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(REPO / "analysis" / "report.py"), str(a), str(b), "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out.resolve()) in proc.stdout
    html = out.read_text()
    for heading in ("Leaderboard", "Pareto front", "Hyper-parameter importances", "Metrics against epoch",
                    "confidence intervals", "Published reference figures"):
        assert heading in html, heading
    # pareto, importances (study a), epochs, reference
    assert _images(html) == 4
    assert "trial_002" in html and "line-through" in html  # leaked row marked
    assert "study/final.py" in html  # one seed per configuration
    assert "optuna.db" in html and "not found" in html  # why study b has no importances
    assert REFERENCE_SOURCE in html and "2.55" in html
    assert not re.search(r'<script[^>]*src="https?://', html)  # self-contained
