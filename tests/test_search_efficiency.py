"""bench/search_table.py and bench/search_efficiency.py on a small fabricated table (no training, no Ray)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


search_table = _load("search_table")
search_efficiency = _load("search_efficiency")

EPOCHS, EVERY = 12, 2


def _raw_space() -> dict:
    raw = yaml.safe_load((ROOT / "bench" / "search_table_expw.yaml").read_text())
    raw["training"]["epochs"] = EPOCHS
    raw["evaluation"]["eval_every"] = EVERY
    raw["search"] = {"loss.temperature": {"choice": [0.05, 0.1, 0.2]}, "loss.kernel": {"choice": ["rbf", "cauchy"]},
                     "loss.sigma": {"choice": [0.5, 1.0]}, "loss.form": {"choice": ["reference", "paper"]}}
    return raw


def _results(space) -> pd.DataFrame:
    """What a grid study's results.parquet holds: a trial per grid point (in the grid searcher's shuffled
    order), a row per evaluation, metrics that depend on the configuration and fall with the epochs."""
    rng = np.random.default_rng(0)
    points = search_table.listed_points(space)
    rows = []
    for n, i in enumerate(rng.permutation(len(points))):
        p = points[i]
        quality = (10 + 3 * abs(math.log(p["loss.temperature"] / 0.1)) + (p["loss.kernel"] == "cauchy")
                   + rng.normal(0, 0.7))
        for epoch in range(EVERY, EPOCHS + 1, EVERY):
            noise = rng.normal(0, 0.3)
            val = quality + 8 / epoch + noise
            rows.append({"trial_id": f"trial{n:03d}", **{f"param.{k}": v for k, v in p.items()}, "epoch": epoch,
                         "train_loss": 4.0 - epoch / 10, "val_lc": val, "val_mae_ext": val * 0.9,
                         "val_bacc": 0.5 + rng.uniform(0, 0.3), "test_lc": val + rng.normal(0, 0.5),
                         "eval_s": 0.5, "wall_s": 3.0 * epoch, "compute_s": 3.0 * epoch, "status": "completed"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def table():
    from study.space import parse_search_space

    raw = _raw_space()
    space = parse_search_space(raw, source="test-space")
    results = _results(space)
    frame, cover = search_table.build_table(results, space)
    assert cover["complete_configs"] == cover["configs"] == 24 and not cover["missing_config_ids"]
    return search_efficiency.Table(frame, {"configs": 24}, raw, source="test-table"), results


def test_stand_in_reproduces_the_table_rows_exactly(table):
    tab, results = table
    space = tab.space({"searcher": "random", "asha": None, "seed": 0})
    for cid in (0, 7, 23):
        row0 = tab.rows(cid)[0]
        values = {k: row0[f"param.{k}"] for k in tab.keys}
        sampled = space.sampled_from_values(values)
        reported = list(search_efficiency.table_trial(sampled, table=tab, space=space))
        trial = results[(results[[f"param.{k}" for k in tab.keys]] == pd.Series(
            {f"param.{k}": v for k, v in values.items()})).all(axis=1)]
        assert trial["trial_id"].nunique() == 1
        expected = trial.sort_values("epoch").reset_index(drop=True)
        assert [r["epoch"] for r in reported] == list(range(EVERY, EPOCHS + 1, EVERY))
        for got, (_, want) in zip(reported, expected.iterrows()):
            assert got["config_id"] == cid and got["study_trial_id"] == want["trial_id"]
            for col in ("val_lc", "val_mae_ext", "val_bacc", "test_lc", "train_loss", "wall_s", "compute_s", "epoch"):
                assert got[col] == want[col], col  # exactly: the stand-in reports what the trial reported
            for k in tab.keys:
                assert got[f"param.{k}"] == want[f"param.{k}"]


def test_asha_replay_stops_trials_at_the_configured_milestones(table):
    tab, _ = table
    rep = search_efficiency.replay(tab, "tpe_asha", 1, budget=24 * EPOCHS)
    space = tab.space({"searcher": "tpe", "asha": "default", "seed": 1})
    assert space.study.asha.grace_period == EVERY and space.study.asha.reduction_factor == 3
    milestones = {2, 6}  # grace 2 x 3^k below max_t = 12 (Ray's rungs for min_t 2, max_t 12, rf 3)
    pruned = [t for t in rep.trials if t["status"] == "pruned"]
    completed = [t for t in rep.trials if t["status"] == "completed"]
    assert len(pruned) >= 5 and completed
    assert {t["epochs"] for t in pruned} <= milestones
    assert {t["epochs"] for t in pruned} == milestones  # both rungs stop trials on this table
    assert all(t["epochs"] == EPOCHS for t in completed)
    # the budget counts every epoch run, pruned ones included, and no more than the budget
    spent = sum(t["epochs"] for t in rep.trials if t["epochs"] is not None)
    assert rep.consumed <= 24 * EPOCHS and spent <= 24 * EPOCHS
    assert len(rep.trials) > 24  # ASHA started more trials than full training would allow


def test_the_same_seed_gives_the_same_trajectory(table):
    tab, _ = table
    for name in ("tpe_asha", "random", "grid", "nsga2"):
        a = search_efficiency.replay(tab, name, 5, budget=12 * EPOCHS)
        b = search_efficiency.replay(tab, name, 5, budget=12 * EPOCHS)
        assert a.trials == b.trials and a.completions == b.completions, name
    other = search_efficiency.replay(tab, "tpe_asha", 6, budget=12 * EPOCHS)
    assert other.trials != a.trials or name != "tpe_asha"
    assert [t["config_id"] for t in other.trials] != [t["config_id"] for t in search_efficiency.replay(
        tab, "tpe_asha", 5, budget=12 * EPOCHS).trials]


def test_listed_grid_walks_the_grid_in_file_order_and_the_budget_is_equal(table):
    tab, _ = table
    rep = search_efficiency.replay(tab, "grid_listed", 0, budget=24 * EPOCHS)
    assert [t["config_id"] for t in rep.trials] == list(range(24))
    assert rep.consumed == 24 * EPOCHS and len(rep.completions) == 24
    curve = rep.best_curve([0, EPOCHS, 24 * EPOCHS])
    assert math.isnan(curve[0]) and curve[1] == tab.final(0)["val_lc"] and curve[2] == tab.best()[1]
    small = search_efficiency.replay(tab, "random", 0, budget=5 * EPOCHS)
    assert sum(t["epochs"] or 0 for t in small.trials) <= 5 * EPOCHS and len(small.completions) == 5


def test_concurrent_workers_share_the_budget(table):
    tab, _ = table
    rep = search_efficiency.replay(tab, "random_asha", 2, budget=10 * EPOCHS, concurrency=3)
    assert rep.consumed <= 10 * EPOCHS
    assert len({t["start"] for t in rep.trials[:3]}) == 1  # three workers start at once


def test_summary_reports_every_searcher(table):
    tab, _ = table
    reps = {n: [search_efficiency.replay(tab, n, s, budget=24 * EPOCHS) for s in range(3)]
            for n in ("random", "tpe", "grid_listed")}
    summary = search_efficiency.summarise(tab, reps, 24 * EPOCHS)
    assert summary["table"]["best_val_lc"] == tab.best()[1]
    gl = summary["searchers"]["grid_listed"]
    assert gl["reached_within_2pct"] == 1.0 and gl["selected_is_table_best"] == 1.0
    assert gl["selected_test_lc"]["median"] == tab.final(tab.best()[0])["test_lc"]
    assert summary["searchers"]["random"]["compute_vs_random_to_random_final_best"] == 1.0


def test_a_bad_table_gets_one_clear_error(tmp_path):
    from brainage_core.errors import DataError

    with pytest.raises(DataError, match="bench/search_table.py"):
        search_efficiency.Table.load(tmp_path / "missing.parquet")
    with pytest.raises(DataError, match="no column 'val_lc'"):
        search_efficiency.Table(pd.DataFrame({"config_id": [0], "epoch": [2]}), {}, _raw_space(), source="t.parquet")


def test_a_partial_table_is_replayed_on_a_complete_sub_grid(table):
    tab, _ = table
    frame = tab.frame
    # configurations 0 and 1 (temperature 0.05, rbf, sigma 0.5, both forms) were not trained: the largest
    # complete sub-grid leaves one value out (temperature 0.05: 16 configurations, rather than 12)
    part = search_efficiency.Table(frame[~frame["config_id"].isin([0, 1])], {}, _raw_space(), source="partial")
    assert sum(len(v) for v in part.dropped.values()) == 1
    assert len(part.config_ids) == 16 and not {0, 1} & set(part.config_ids)  # temperature 0.05 left out
    for name in ("grid_listed", "tpe_asha", "random"):
        rep = search_efficiency.replay(part, name, 0, budget=12 * EPOCHS)
        assert {t["config_id"] for t in rep.trials} <= set(part.config_ids)
