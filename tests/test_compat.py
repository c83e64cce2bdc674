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
