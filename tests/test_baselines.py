"""Constant baselines and chance levels where a reader judges a model: leaderboard, smoke verdict,
figures and the study runner's progress table, on hand-made result tables."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.figures import epoch_figure, pareto_figure
from analysis.tables import baseline_levels, beats_constant, leaderboard, metrics_by_epoch, smoke_verdict
from study.run import progress_table
from study.space import load_search_space

ROOT = Path(__file__).resolve().parents[1]


def hand_made(epochs=(5, 10, 15), mae_int=((9.0, 6.0, 4.0), (10.0, 9.8, 9.6)), const_int=9.3, const_ext=8.3):
    """Two finished trials: 'good' goes below the constant baseline, 'flat' never does."""
    rows = []
    for t, (name, curve) in enumerate(zip(("good", "flat"), mae_int)):
        for e, v in zip(epochs, curve):
            rows.append({"study": "s", "trial_id": name, "method": ("expw", "l1")[t], "epoch": e,
                         "status": "completed", "leaked": False, "final": False, "config_key": name,
                         "val_mae_int": v, "val_mae_ext": v + 1.0, "val_bacc": 0.2, "val_lc": (v + 1) * 0.2**0.3,
                         "val_mae_int_const": const_int, "val_mae_ext_const": const_ext,
                         "val_bacc_chance": 1 / 12, "test_mae_int": v, "test_mae_int_const": 9.0})
    return pd.DataFrame(rows)


def test_leaderboard_puts_each_baseline_after_its_metric():
    board = leaderboard(hand_made(), "val_lc")
    cols = list(board.columns)
    assert cols.index("val_mae_int_const") == cols.index("val_mae_int") + 1
    assert cols.index("val_mae_ext_const") == cols.index("val_mae_ext") + 1
    assert cols.index("val_bacc_chance") == cols.index("val_bacc") + 1
    assert cols.index("test_mae_int_const") == cols.index("test_mae_int") + 1
    by_trial = board.set_index("trial_id")
    # good: best epoch 15, 4.0 < 9.3 and 5.0 < 8.3; flat: 9.6 > 9.3
    assert by_trial.loc["good", "epoch"] == 15 and bool(by_trial.loc["good", "beats_const"]) is True
    assert bool(by_trial.loc["flat", "beats_const"]) is False
    assert by_trial.loc["good", "val_bacc_chance"] == pytest.approx(1 / 12)


def test_beats_constant_needs_both_maes_below():
    rows = pd.DataFrame({"val_mae_int": [4.0, 4.0, np.nan], "val_mae_ext": [7.0, 9.0, 1.0],
                         "val_mae_int_const": [9.3] * 3, "val_mae_ext_const": [8.3] * 3})
    assert list(beats_constant(rows)) == [True, False, False]
    assert baseline_levels(rows) == {"val_mae_int": 9.3, "val_mae_ext": 8.3}


def test_smoke_verdict():
    ok = smoke_verdict(hand_made(), "val_lc")
    assert not ok.smoke and ok.n_beating == 1 and ok.message == ""
    # every trial above the constant: smoke, and the message names the baseline
    nothing = smoke_verdict(hand_made(mae_int=((10.0, 11.0, 12.0), (10.0, 9.8, 9.6))), "val_lc")
    assert nothing.smoke and nothing.n_beating == 0
    assert "No trial is below the constant baseline" in nothing.message and "9.30" in nothing.message
    # learned, but 3 epochs: still smoke-sized
    short = smoke_verdict(hand_made(epochs=(1, 2, 3)), "val_lc")
    assert short.smoke and "3 epoch(s)" in short.message
    # no baseline columns (an older study): judged on epochs, and says so
    old = hand_made().drop(columns=["val_mae_int_const", "val_mae_ext_const", "test_mae_int_const"])
    verdict = smoke_verdict(old, "val_lc")
    assert not verdict.smoke and verdict.n_beating is None and "no constant-baseline" in verdict.reasons[0]


def test_figures_draw_the_cohort_chance_and_the_constant():
    df = hand_made()
    from analysis.loader import best_rows

    best = best_rows(df, "val_lc")
    fig = pareto_figure(best, best.head(1))
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "chance (1/12 sites)" in labels and "constant: median age (8.30)" in labels
    assert not any("1/64" in label for label in labels)
    fig = epoch_figure(metrics_by_epoch(df), baseline_levels(df))
    titles = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert "constant (9.30)" in titles["val_mae_int"].get_legend_handles_labels()[1]
    assert "chance (1/12 sites)" in titles["val_bacc"].get_legend_handles_labels()[1]


def test_progress_table_shows_model_over_baseline():
    space = load_search_space(ROOT / "search_spaces" / "smoke.yaml")
    df = hand_made().rename(columns={"method": "param.loss.temperature"})
    text = progress_table(df, space)
    header = text.splitlines()[1]
    assert "mae_int/const" in header and "mae_ext/const" in header and "bacc/chance" in header
    good = next(line for line in text.splitlines() if line.startswith("good"))
    assert "4.00/9.30" in good and "5.00/8.30" in good and "0.200/0.083" in good
    # results without baselines: the plain table, no made-up columns
    plain = progress_table(df.drop(columns=["val_mae_int_const", "val_mae_ext_const", "val_bacc_chance"]), space)
    assert "/const" not in plain and math.isfinite(df["val_mae_int"].min())
