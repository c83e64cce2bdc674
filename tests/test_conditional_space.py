"""search_spaces/all.yaml and nested conditional parameters: Optuna samples only valid combinations.

Every sampled trial is validated the way a trial is built: ``SearchSpace.trial_dict`` ->
``brainage_core.config.config_from_dict`` -> ``build_loss(method, **cfg.loss.build_kwargs())``.
"""

from __future__ import annotations

import collections
from pathlib import Path

import optuna
import pytest
import yaml

from brainage_core.config import config_from_dict
from brainage_core.errors import ConfigError
from brainage_core.losses import build_loss
from study.space import load_search_space, parse_search_space

ROOT = Path(__file__).resolve().parents[1]
ALL = ROOT / "search_spaces" / "all.yaml"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sample(space, sampler, n):
    study = optuna.create_study(sampler=sampler)
    out = []
    for i in range(n):
        trial = study.ask()
        space.suggest(trial)
        out.append(dict(trial.params))
        study.tell(trial, float(i % 7))  # a value, so that TPE leaves its start-up phase
    return out


@pytest.mark.parametrize("sampler", [optuna.samplers.RandomSampler(seed=0), optuna.samplers.TPESampler(seed=1),
                                     optuna.samplers.NSGAIISampler(seed=2)], ids=["random", "tpe", "nsga2"])
def test_all_yaml_samples_only_valid_combinations(sampler):
    space = load_search_space(ALL, expand_env=False)
    seen = collections.Counter()
    for params in sample(space, sampler, 250):
        values = space.active_values(params)
        cfg = config_from_dict(space.trial_dict(params), str(ALL), expand_env=False)
        loss = cfg.loss
        build_loss(loss.method, **loss.build_kwargs())  # raises LossError on a bad combination
        assert loss.method == values["loss.method"]
        # each method gets exactly its own parameters
        assert ("loss.kernel" in values) == (loss.method in ("yaware", "threshold", "expw"))
        assert ("loss.sigma" in values) == ("loss.kernel" in values)
        assert ("loss.form" in values) == (loss.method in ("threshold", "expw"))
        assert ("loss.temperature" in values) == (loss.method not in ("l1", "mse"))
        margin = "loss.threshold_margin" in values
        assert margin == (loss.method == "threshold" and loss.form == "paper")
        if not margin:
            assert loss.threshold_margin == 0.0
        if loss.kernel == "cauchy":  # gamma's own range
            assert 0.01 <= loss.sigma <= 1.0
        elif loss.kernel == "rbf":
            assert 0.5 <= loss.sigma <= 5.0
        if loss.method == "rnc":
            assert 0.1 <= loss.temperature <= 10.0
        expected_head = "regression" if loss.method in ("l1", "mse") else "contrastive"
        assert cfg.model.head == expected_head
        if expected_head == "regression":
            assert cfg.model.feature == "encoder" and loss.kernel is None
        # Optuna names: conditional parameters carry their case
        for name in params:
            key = name.split("[")[0]
            assert key in space.keys
        seen[loss.method] += 1
    if isinstance(sampler, optuna.samplers.RandomSampler):
        assert set(seen) == {"yaware", "supcon", "threshold", "expw", "rnc", "l1", "mse"}


def test_overrides_round_trip_through_param_columns():
    space = load_search_space(ALL, expand_env=False)
    for params in sample(space, optuna.samplers.RandomSampler(seed=3), 60):
        values = space.overrides(params)  # what results.parquet stores as param.* (None = not applicable)
        assert space.sampled_from_values(values) == params


BASE = {
    "data": {"store": "/nowhere", "grid": "6mm"},
    "model": {"backbone": "resnet18", "base_width": 4},
    "loss": {"method": "yaware"},
    "training": {"epochs": 2, "batch_size": 8, "device": "cpu"},
    "evaluation": {"eval_every": 1},
    "study": {"num_samples": 2},
}


def space_with(search):
    return parse_search_space({**yaml.safe_load(yaml.safe_dump(BASE)), "search": search}, source="s.yaml")


def test_when_and_nested_parents_are_checked():
    with pytest.raises(ConfigError, match=r"search.loss.sigma.when.loss.method: 'laplace' is not a value"):
        space_with({"loss.method": {"choice": ["yaware", "threshold"]},
                    "loss.kernel": {"depends_on": "loss.method", "cases": {"yaware": {"choice": ["rbf"]}}},
                    "loss.sigma": {"depends_on": "loss.kernel", "when": {"loss.method": "laplace"},
                                   "cases": {"rbf": {"uniform": [1, 2]}}}})
    with pytest.raises(ConfigError, match=r"depends_on = 'loss.temperature': expected a searched choice"):
        space_with({"loss.temperature": {"uniform": [0.1, 1.0]},
                    "loss.sigma": {"depends_on": "loss.temperature", "cases": {"0.1": {"uniform": [1, 2]}}}})
    # a combination the config refuses is found even when it sits deep in the tree
    with pytest.raises(ConfigError, match="threshold_margin") as info:
        space_with({"loss.method": {"choice": ["threshold", "expw"]},
                    "loss.form": {"depends_on": "loss.method",
                                  "cases": {"threshold": {"choice": ["reference", "paper"]},
                                            "expw": {"choice": ["paper"]}}},
                    "loss.threshold_margin": {"depends_on": "loss.form", "cases": {"paper": {"uniform": [0.5, 2.0]}}}})
    assert "loss.method='expw'" in str(info.value)


def test_nested_conditionals_map_to_config_values():
    space = space_with({"loss.method": {"choice": ["yaware", "rnc"]},
                        "loss.kernel": {"depends_on": "loss.method",
                                        "cases": {"yaware": {"choice": ["rbf", "cauchy"]}}},
                        "loss.sigma": {"depends_on": "loss.kernel", "cases": {"rbf": {"uniform": [1, 2]},
                                                                              "cauchy": {"fixed": 0.1}}}})
    d = space.trial_dict({"loss.method": "yaware", "loss.kernel[yaware]": "cauchy"})
    assert d["loss"] == {"method": "yaware", "kernel": "cauchy", "sigma": 0.1}
    d = space.trial_dict({"loss.method": "rnc", "loss.kernel[yaware]": "rbf", "loss.sigma[rbf]": 1.5})
    assert d["loss"] == {"method": "rnc"}  # stale names of inactive branches are ignored
    assert space.overrides({"loss.method": "rnc"}) == {"loss.method": "rnc", "loss.kernel": None, "loss.sigma": None}
