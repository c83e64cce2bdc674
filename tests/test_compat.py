"""study.compat: every private Ray/Optuna symbol the project uses is listed there, present in the
installed versions, and named nowhere else."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest

from study import compat

ROOT = Path(__file__).resolve().parents[1]

#: what a private Ray/Optuna reference looks like in source (module paths and attributes in compat's list)
PRIVATE_PATTERN = re.compile(
    r"ray\.[\w.]*_internal|ray\._private|_TrainSession|_create_default_callbacks|_training_actor_item_queue"
    r"|\._time_attr\b|\._max_t\b|\._ot_trials\b|\._ot_study\b|\._completed_trials\b|\._trial_id\b|_enable_token_auth|ray\._raylet"
    r"|\.run_metadata\b|_TrainingRunMetadata"
)


@pytest.mark.parametrize("symbol", compat.PRIVATE_SYMBOLS, ids=lambda s: s.name)
def test_every_private_symbol_is_still_there(symbol):
    problem = compat._resolve(symbol)
    assert problem is None, (
        f"{symbol.name} ({symbol.kind}) moved in this Ray/Optuna: {problem}. It is used by {symbol.used_by} for "
        f"{symbol.why}; adapt study/compat.py (and the pins in setup.cfg) before upgrading"
    )


def test_missing_reports_a_moved_symbol(monkeypatch):
    moved = compat.PrivateSymbol("ray.tune.search.optuna.optuna_search", "OptunaSearch.__init__:_gone_attribute",
                                 "instance attribute", "study/searcher.py", "a test")
    gone_module = compat.PrivateSymbol("ray.train._no_such_module", "x", "import", "study/train_run.py", "a test")
    monkeypatch.setattr(compat, "PRIVATE_SYMBOLS", (*compat.PRIVATE_SYMBOLS, moved, gone_module))
    problems = compat.missing()
    assert set(problems) == {moved.name, gone_module.name}
    assert "no longer assigns self._gone_attribute" in problems[moved.name]
    assert "cannot be imported" in problems[gone_module.name]


def test_no_private_reference_outside_compat():
    offenders = []
    for folder in ("brainage_core", "study", "analysis", "bench", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name in ("compat.py", "test_compat.py"):
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if PRIVATE_PATTERN.search(line.split("#")[0]):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "private Ray/Optuna symbols outside study/compat.py:\n" + "\n".join(offenders)


def test_accessors_read_the_live_state_of_asha_and_optuna_search():
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    asha = ASHAScheduler(time_attr="epoch", metric="val_lc", mode="min", max_t=7, grace_period=1)
    assert (compat.asha_time_attr(asha), compat.asha_max_t(asha)) == ("epoch", 7)

    searcher = OptunaSearch(space={"x": optuna.distributions.FloatDistribution(0.0, 1.0)}, metric="val_lc",
                            mode="min", storage=optuna.storages.RDBStorage("sqlite:///:memory:"), study_name="s")
    searcher.suggest("t1")
    trials = compat.optuna_trials(searcher)
    assert list(trials) == ["t1"] and compat.optuna_completed(searcher) == set()
    trials["t1"].report(0.5, 2)
    assert compat.optuna_intermediate_values(trials["t1"]) == {2: 0.5}
    searcher.on_trial_complete("t1", {"val_lc": 0.4})
    assert "t1" in compat.optuna_completed(searcher)
    assert compat.optuna_study(searcher).trials[0].state == optuna.trial.TrialState.COMPLETE


def test_forget_metric_history_keeps_the_objectives_and_the_last_result():
    from ray.tune.analysis import ExperimentAnalysis
    from ray.tune.experiment import Trial

    trials = []
    for i in range(2):
        trial = Trial("trainable", stub=True, trial_id=f"t{i}")
        for epoch in (1, 2, 3):
            trial.update_last_result({"training_iteration": epoch, "epoch": epoch, "val_mae_ext": 10.0 - epoch - i,
                                      "val_bacc": 0.5, "train_loss": 1.0 / epoch, "wall_s": 2.0 * epoch})
        trials.append(trial)
    before = len(trials[0].run_metadata.get_json_state())
    assert {"val_bacc", "train_loss", "wall_s", "epoch"} <= set(trials[0].metric_analysis)
    for trial in trials:
        compat.forget_metric_history(trial, {"val_mae_ext"})
    for trial in trials:
        assert set(trial.metric_analysis) == {"val_mae_ext"} and set(trial.metric_n_steps) == {"val_mae_ext"}
        assert trial.metric_analysis["val_mae_ext"]["min"] == trial.last_result["val_mae_ext"]
        assert trial.last_result["train_loss"] == pytest.approx(1 / 3)  # the last result is kept whole
    # the experiment snapshot of the trial (cached JSON) is rebuilt without the forgotten keys
    assert len(trials[0].run_metadata.get_json_state()) < before / 2
    # what Tune still reads from them: the best trial by an objective, at every scope
    analysis = ExperimentAnalysis.__new__(ExperimentAnalysis)
    analysis.trials = trials
    for scope in ("last", "avg", "last-5-avg", "all"):
        assert analysis.get_best_trial("val_mae_ext", "min", scope=scope).trial_id == "t1", scope
