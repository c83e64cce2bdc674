"""Multi-objective studies: settings, the Optuna wiring, the Pareto set, and a real smoke study.

The smoke study (search_spaces/smoke.yaml made multi-objective: objectives [val_mae_ext, val_bacc],
NSGA-II, ASHA on val_lc, in-trial training) runs as a real ``python -m study.run`` process with its
own local Ray.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from brainage_core.errors import ConfigError
from study.results import pareto_front
from study.space import parse_search_space

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"


def smoke_dict(**study):
    d = yaml.safe_load(SMOKE.read_text())
    for key in ("objective", "mode"):
        d["study"].pop(key, None)
    d["study"].update(study)
    return d


def test_settings_and_errors():
    space = parse_search_space(smoke_dict(objectives=["val_mae_ext", "val_bacc"], searcher="nsga2"))
    st = space.study
    assert st.multi_objective and st.objectives == ("val_mae_ext", "val_bacc") and st.modes == ("min", "min")
    assert (st.objective, st.mode) == ("val_lc", "min")  # ASHA's scalar by default
    assert st.to_dict()["objectives"] == ["val_mae_ext", "val_bacc"]
    space = parse_search_space(smoke_dict(objectives=["val_mae_ext", "val_bacc"], modes=["min", "max"],
                                          prune_on="val_bacc"))
    assert (space.study.objective, space.study.mode) == ("val_bacc", "max")
    bad = [
        (dict(objectives=["val_mae_ext", "val_bacc"], objective="val_mae_ext"), "not both"),
        (dict(objectives=["val_mae_ext", "test_bacc"]), "test metrics are never optimised"),
        (dict(objectives=["val_mae_ext", "val_mae_ext"]), "expected distinct metrics"),
        (dict(objectives=["val_mae_ext", "val_bacc"], modes=["min"]), "one per objective"),
        (dict(objectives=["val_mae_ext", "val_bacc"], modes=["max", "min"]), "lower is better"),
        (dict(prune_on="val_lc"), "only for a multi-objective study"),
    ]
    for study, message in bad:
        with pytest.raises(ConfigError, match=message):
            parse_search_space(smoke_dict(**study), source="mo.yaml")


def test_searcher_is_multi_objective_and_records_pruned(tmp_path):
    from study.searcher import EARLY_STOPPED, build_searcher

    space = parse_search_space(smoke_dict(objectives=["val_mae_ext", "val_bacc"], searcher="nsga2",
                                          num_samples=3))
    searcher = build_searcher(space, tmp_path, "mo")
    assert searcher.metric == ["val_mae_ext", "val_bacc"] and searcher.mode == ["min", "min"]
    assert isinstance(searcher._sampler, optuna.samplers.NSGAIISampler)
    for tid in ("a", "b", "c"):
        searcher.suggest(tid)
    result = {"epoch": 1, "val_mae_ext": 5.0, "val_bacc": 0.5, "val_lc": 3.0}
    searcher.on_trial_result("a", result)  # no intermediate values in multi-objective Optuna: no error
    searcher.on_trial_complete("a", {**result, "epoch": 2})
    EARLY_STOPPED.add("b")
    searcher.on_trial_complete("b", result)
    searcher.on_trial_complete("c", error=True)
    trials = optuna.load_study(study_name="mo", storage=f"sqlite:///{tmp_path / 'optuna.db'}").get_trials()
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE", "PRUNED", "FAIL"]
    assert trials[0].values == [5.0, 0.5]


def test_pareto_front_keeps_non_dominated_completed_trials():
    rows = []
    for tid, mae, bacc, status in [("a", 5.0, 0.5, "completed"), ("b", 4.0, 0.6, "completed"),
                                   ("c", 6.0, 0.6, "completed"),  # dominated by a
                                   ("d", 3.0, 0.1, "pruned"),     # not the full budget
                                   ("e", 5.0, 0.5, "completed"),  # equal to a: neither dominates
                                   ("f", 7.0, 0.2, "completed")]:
        rows.append({"trial_id": tid, "epoch": 1, "val_mae_ext": mae + 1, "val_bacc": bacc, "status": status})
        rows.append({"trial_id": tid, "epoch": 2, "val_mae_ext": mae, "val_bacc": bacc, "status": status})
    df = pd.DataFrame(rows)
    front = pareto_front(df, ["val_mae_ext", "val_bacc"], ["min", "min"])
    assert sorted(front["trial_id"]) == ["a", "b", "e", "f"]
    assert (front["epoch"] == 2).all()
    assert front["val_mae_ext"].is_monotonic_increasing
    front = pareto_front(df, ["val_mae_ext", "val_bacc"], ["min", "max"])
    assert sorted(front["trial_id"]) == ["b"]  # lowest MAE and highest bacc at once


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_multi_objective_smoke_study_writes_its_pareto_set(tmp_path, store_cache):
    from study_fixtures import shared_store_cache

    d = smoke_dict(objectives=["val_mae_ext", "val_bacc"], searcher="nsga2", num_samples=3,
                   asha={"grace_period": 1, "reduction_factor": 2}, max_concurrent_trials=1)
    d["study"]["resources"] = {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1}
    d["data"]["synthetic"]["subjects"] = 40
    d["evaluation"]["final_protocol"] = "fast"  # the exact probes are not what this checks (test_study.py does)
    space = tmp_path / "mo.yaml"
    space.write_text(yaml.safe_dump(d))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(BRAINAGE_CACHE=str(shared_store_cache(tmp_path / "cache", store_cache)), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "study.run", str(space), "--storage", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    study_dir = tmp_path / "mo"
    results = pd.read_parquet(study_dir / "results.parquet")
    assert results["trial_id"].nunique() == 3
    assert set(results["status"]) <= {"completed", "pruned"} and "completed" in set(results["status"])
    for name in ("pareto.csv", "pareto.parquet"):
        if name.endswith("parquet"):
            front = pd.read_parquet(study_dir / name)
        else:  # trial ids are hex strings: an all-digit one must not be read back as a number
            front = pd.read_csv(study_dir / name, dtype={"trial_id": str})
        expected = pareto_front(results, ["val_mae_ext", "val_bacc"], ["min", "min"])
        assert len(front) >= 1 and sorted(front["trial_id"]) == sorted(expected["trial_id"])
        assert {"val_mae_ext", "val_bacc", "param.loss.temperature"} <= set(front.columns)
    assert "Pareto set (val_mae_ext, val_bacc)" in proc.stdout
    trials = optuna.load_study(study_name="mo", storage=f"sqlite:///{study_dir / 'optuna.db'}").get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert complete and all(len(t.values) == 2 for t in complete)
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)


def test_population_size_reaches_nsga2_and_is_refused_elsewhere(tmp_path):
    from study.searcher import build_searcher

    space = parse_search_space(smoke_dict(objectives=["val_mae_ext", "val_bacc"], searcher="nsga2",
                                          num_samples=24, population_size=6))
    assert space.study.population_size == 6
    sampler = build_searcher(space, tmp_path, "pop")._sampler
    assert isinstance(sampler, optuna.samplers.NSGAIISampler) and sampler._population_size == 6
    with pytest.raises(ConfigError, match=r"study.population_size = 6: only for study.searcher: nsga2"):
        parse_search_space(smoke_dict(searcher="tpe", population_size=6), source="pop.yaml")
    with pytest.raises(ConfigError, match=r"study.population_size = 1 is out of range"):
        parse_search_space(smoke_dict(objectives=["val_mae_ext", "val_bacc"], searcher="nsga2",
                                      population_size=1), source="pop.yaml")
