"""Optuna/ASHA wiring and the results table, without a Ray cluster (fake trials driven by hand)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest

from study.results import ResultsTable
from study.searcher import EARLY_STOPPED, build_scheduler, build_searcher
from study.space import parse_search_space

SPACE = {
    "data": {"synthetic": {"subjects": 60, "sites": 6}, "grid": "6mm"},
    "training": {"epochs": 4},
    "evaluation": {"eval_every": 1},
    "search": {"loss.temperature": {"loguniform": [0.03, 1.0]}},
    "study": {"num_samples": 3, "asha": {"grace_period": 1, "reduction_factor": 2}, "seed": 3},
}


def test_asha_stopped_trials_are_pruned_in_optuna_and_finished_ones_complete(tmp_path):
    space = parse_search_space(SPACE, source="s.yaml")
    searcher = build_searcher(space, tmp_path, "s")
    scheduler = build_scheduler(space)
    trials = {tid: SimpleNamespace(trial_id=tid, config={}) for tid in ("good", "bad")}
    for tid, trial in trials.items():
        trial.config = searcher.suggest(tid)
        assert 0.03 <= trial.config["loss.temperature"] <= 1.0
        scheduler.on_trial_add(None, trial)

    def report(tid, epoch, value):
        result = {"epoch": epoch, "val_mae_ext": value, "training_iteration": 1}
        decision = scheduler.on_trial_result(None, trials[tid], result)
        if decision == "CONTINUE":
            searcher.on_trial_result(tid, result)
        return decision, result

    assert report("good", 1, 3.0)[0] == "CONTINUE"
    decision, result = report("bad", 1, 9.0)
    assert decision == "STOP" and "bad" in EARLY_STOPPED
    searcher.on_trial_complete("bad", result)
    for epoch in (2, 3):
        assert report("good", epoch, 3.0 - epoch / 10)[0] == "CONTINUE"
    decision, result = report("good", 4, 2.5)
    assert decision == "STOP" and "good" not in EARLY_STOPPED  # max_t reached: a finished trial
    searcher.on_trial_complete("good", result)

    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    by_state = {t.state: t for t in study.get_trials()}
    pruned, complete = by_state[optuna.trial.TrialState.PRUNED], by_state[optuna.trial.TrialState.COMPLETE]
    assert pruned.intermediate_values == {1: 9.0}
    assert complete.value == 2.5 and complete.intermediate_values == {1: 3.0, 2: 2.8, 3: 2.7}


def test_orphan_optuna_trials_of_a_killed_driver_are_failed_on_restore(tmp_path):
    space = parse_search_space(SPACE, source="s.yaml")
    searcher = build_searcher(space, tmp_path, "s")
    searcher.suggest("kept")
    searcher.save(str(tmp_path / "searcher.pkl"))
    searcher.suggest("orphan")  # asked for after Tune's last save, then the driver died
    restored = build_searcher(space, tmp_path, "s")
    restored.restore(str(tmp_path / "searcher.pkl"))
    states = [t.state for t in optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
              .get_trials()]
    assert states == [optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL]


def test_results_table_rewrites_atomically_and_replaces_re_reports(tmp_path):
    path = tmp_path / "results.parquet"
    table = ResultsTable(path, param_keys=["loss.temperature"], static={"git_commit": "abc"}, resume=False,
                         compact_every_s=0)  # a rewrite at every change (tests/test_results_journal.py: batched)
    table.add("t1", {"loss.temperature": 0.1}, {"epoch": 1, "val_mae_ext": 5.0, "wall_s": 2.0}, seed=0)
    table.add("t1", {"loss.temperature": 0.1}, {"epoch": 2, "val_mae_ext": 4.0, "wall_s": 4.0}, seed=0)
    assert len(pd.read_parquet(path)) == 2
    table.add("t1", {"loss.temperature": 0.1}, {"epoch": 2, "val_mae_ext": 4.0, "wall_s": 4.0}, seed=0)
    table.set_checkpoint("t1", "/ckpt/2")
    table.set_status("t1", "completed")
    df = pd.read_parquet(path)
    assert df["epoch"].tolist() == [1, 2] and (df["status"] == "completed").all()
    assert df["checkpoint_path"].isna().tolist() == [True, False] and df["checkpoint_path"].iloc[1] == "/ckpt/2"
    assert list(df.columns[:3]) == ["trial_id", "param.loss.temperature", "epoch"]
    assert not list(tmp_path.glob(".*tmp*"))
    again = ResultsTable(path, param_keys=["loss.temperature"], static={"git_commit": "abc"}, resume=True)
    assert len(again) == 2
    with pytest.raises(ValueError, match="status 'done'"):
        again.set_status("t1", "done")


def test_a_journal_storage_records_the_study_and_reopens(tmp_path):
    """``--optuna-storage journal:PATH``: the same records as the sqlite storage, in an Optuna journal file
    that a second driver (a resume) and optuna-dashboard open; a bad value is one ConfigError naming it."""
    from brainage_core.errors import ConfigError
    from study.searcher import dashboard_target, journal_path, open_optuna_storage

    space = parse_search_space(SPACE, source="s.yaml")
    url = f"journal:{tmp_path / 'optuna.journal'}"
    searcher = build_searcher(space, tmp_path, "s", storage_url=url)
    config = searcher.suggest("t1")
    searcher.on_trial_result("t1", {"epoch": 1, "val_mae_ext": 5.0, "training_iteration": 1})
    searcher.on_trial_complete("t1", {"epoch": 2, "val_mae_ext": 4.0, "training_iteration": 2})
    assert not (tmp_path / "optuna.db").exists() and (tmp_path / "optuna.journal").stat().st_size > 0
    reopened = optuna.load_study(study_name="s", storage=open_optuna_storage(url)).get_trials()
    assert len(reopened) == 1 and reopened[0].state == optuna.trial.TrialState.COMPLETE
    assert reopened[0].value == 4.0 and reopened[0].params == config and reopened[0].intermediate_values == {1: 5.0}
    again = build_searcher(space, tmp_path, "s", storage_url=url)  # a resumed driver appends to the same study
    again.suggest("t2")
    assert len(optuna.load_study(study_name="s", storage=open_optuna_storage(url)).trials) == 2
    assert dashboard_target(url) == str(tmp_path / "optuna.journal")
    assert journal_path("sqlite:///x.db") is None and dashboard_target("sqlite:///x.db") == "sqlite:///x.db"
    for bad in ("journal:", f"journal:{tmp_path}", f"journal:{tmp_path / 'missing' / 'o.journal'}"):
        with pytest.raises(ConfigError, match=re.escape(f"--optuna-storage {bad}: expected journal:PATH")):
            open_optuna_storage(bad)
