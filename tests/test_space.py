"""Search-space YAML parsing and validation (study.space): no Ray, no training."""

from __future__ import annotations

import copy
from pathlib import Path

import optuna
import pytest
import yaml

from brainage_core.errors import ConfigError
from study.space import load_search_space, parse_search_space

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "search_spaces"

BASE = {
    "data": {"synthetic": {"subjects": 60, "sites": 6}, "grid": "6mm"},
    "training": {"epochs": 4},
    "evaluation": {"eval_every": 2},
    "search": {
        "loss.temperature": {"loguniform": [0.03, 1.0]},
        "loss.kernel": {"choice": ["rbf", "cauchy"]},
        "loss.sigma": {"depends_on": "loss.kernel",
                       "cases": {"rbf": {"uniform": [0.5, 5.0]}, "cauchy": {"loguniform": [0.01, 1.0]}}},
    },
    "study": {"num_samples": 3, "asha": {"grace_period": 2}},
}


def space_with(**changes):
    d = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = d
        parts = dotted.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if value is KeyError:
            node.pop(parts[-1])
        else:
            node[parts[-1]] = value
    return d


@pytest.mark.parametrize("name", ["yaware", "threshold", "expw", "rnc", "l1", "quickstart", "smoke"])
def test_shipped_spaces_are_valid(name):
    space = load_search_space(SPACES / f"{name}.yaml", expand_env=False)
    assert space.study.num_samples >= 1
    assert space.params


def test_paper_recipe_spaces():
    spaces = {n: load_search_space(SPACES / f"{n}.yaml", expand_env=False)
              for n in ("yaware", "threshold", "expw", "rnc", "l1")}
    for n, s in spaces.items():
        c = s.config
        assert (c.model.backbone, c.data.grid, c.data.modality, c.training.batch_size, c.training.views,
                c.training.epochs) == ("resnet18", "full", "vbm", 32, 2, 300), n
        assert (c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay) == ("adam", 1e-4, 5e-5), n
        assert (c.schedule.name, c.schedule.step_every, c.schedule.rate) == ("step", 10, 0.9), n
        assert s.study.resources.use_gpu, n
    assert len({s.study.num_samples for s in spaces.values()}) == 1  # the same budget for l1
    temp = spaces["yaware"].param("loss.temperature").dist
    assert (temp.kind, temp.low, temp.high) == ("loguniform", 0.03, 1.0)
    sigma = spaces["yaware"].param("loss.sigma")
    assert sigma.depends_on == "loss.kernel" and sigma.cases["rbf"].low == 0.5 and sigma.cases["rbf"].high == 5.0
    assert sigma.cases["cauchy"].kind == "loguniform"
    margin = spaces["threshold"].param("loss.threshold_margin")
    assert margin.cases["paper"].low == 0.0 and margin.cases["paper"].high == 10.0


def test_openbhb_root_unset_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENBHB_ROOT", raising=False)
    with pytest.raises(ConfigError, match="OPENBHB_ROOT is not set"):
        load_search_space(SPACES / "yaware.yaml")
    monkeypatch.setenv("OPENBHB_ROOT", "/data/openbhb")
    assert load_search_space(SPACES / "yaware.yaml").config.data.source == "/data/openbhb"


def test_conditional_parameters_map_to_config_values():
    space = parse_search_space(BASE, source="s.yaml")
    seen = set()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        space.suggest(trial)
        values = space.overrides(trial.params)
        d = space.trial_dict(trial.params)
        assert d["loss"]["sigma"] == values["loss.sigma"]
        assert d["loss"]["kernel"] == values["loss.kernel"]
        if values["loss.kernel"] == "rbf":
            assert 0.5 <= values["loss.sigma"] <= 5.0 and "loss.sigma[rbf]" in trial.params
        else:
            assert 0.01 <= values["loss.sigma"] <= 1.0 and "loss.sigma[cauchy]" in trial.params
        seen.add(values["loss.kernel"])
        study.tell(trial, 1.0)
    assert seen == {"rbf", "cauchy"}


def test_fixed_cases_and_grid():
    d = space_with(search={"loss.method": {"choice": ["yaware", "rnc", "l1"]},
                           "loss.temperature": {"depends_on": "loss.method",
                                                "cases": {"yaware": {"fixed": 0.2}, "rnc": {"fixed": 2.0}}}},
                   study={"searcher": "grid"})
    space = parse_search_space(d, source="g.yaml")
    assert space.study.num_samples == 3
    assert space.grid() == {"loss.method": ["yaware", "rnc", "l1"]}
    assert space.overrides({"loss.method": "rnc"}) == {"loss.method": "rnc", "loss.temperature": 2.0}
    assert space.trial_dict({"loss.method": "l1"})["loss"].get("temperature") is None


def test_study_overrides_on_the_command_line():
    space = parse_search_space(BASE, source="s.yaml", overrides=["study.num_samples=7", "training.epochs=6"])
    assert space.study.num_samples == 7 and space.config.training.epochs == 6


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"search": {"loss.temprature": {"uniform": [0.1, 1.0]}}}, "unknown key 'loss.temprature'.*loss.temperature"),
        ({"search": {"loss.temperature": {"uniform": [1.0, 1.0]}}}, r"search.loss.temperature.uniform.*empty range"),
        ({"search": {"loss.temperature": {"uniform": [2.0, 1.0]}}}, "empty range"),
        ({"search": {"loss.temperature": {"normal": [0.0, 1.0]}}}, "unknown distribution 'normal'"),
        ({"search": {"loss.temperature": {"loguniform": [0.0, 1.0]}}}, "log range needs low > 0"),
        ({"search": {"loss.temperature": {"uniform": [-1.0, 1.0]}}}, r"loss.temperature = -1.0 is out of range"),
        ({"search": {"loss.temperature": {"uniform": ["a", 1.0]}}}, "expected a number"),
        ({"search": {"loss.temperature": {"int": [1, 3]}}}, "not an integer range"),
        ({"search": {"training.batch_size": {"uniform": [8, 32]}}}, "use int instead"),
        ({"search": {"loss.kernel": {"choice": ["rbf", "laplace"]}}}, "loss.kernel = 'laplace'"),
        ({"search": {"loss.kernel": {"choice": []}}}, "non-empty list"),
        ({"search": {"loss.temperature": [0.1, 1.0]}}, "expected a mapping with one key"),
        ({"search": {"loss": {"uniform": [0.1, 1.0]}}}, "is a section"),
        ({"search": {}}, "search: missing or empty"),
        ({"search": {"loss.sigma": {"depends_on": "loss.kernel", "cases": {"rbf": {"uniform": [1, 2]}}}}},
         "expected a searched choice parameter"),
        ({"search": {"loss.kernel": {"choice": ["rbf"]},
                     "loss.sigma": {"depends_on": "loss.kernel", "cases": {"cauchy": {"uniform": [1, 2]}}}}},
         "'cauchy' is not a value of loss.kernel"),
        ({"search": {"loss.method": {"choice": ["yaware", "l1"]}, "loss.kernel": {"choice": ["rbf", "cauchy"]}}},
         "loss.method 'l1' takes no kernel"),
        ({"study__num_samples": KeyError}, "study.num_samples: missing"),
        ({"study__num_samples": 0}, "study.num_samples = 0 is out of range: expected an integer >= 1"),
        ({"study__num_sample": 3}, "unknown key 'study.num_sample'; did you mean 'study.num_samples'"),
        ({"study__searcher": "bayes"}, "study.searcher = 'bayes'"),
        ({"study__objective": "test_mae_ext"}, "test metrics are never optimised"),
        ({"study__objective": "val_mea_ext"}, "did you mean 'val_mae_ext'"),
        ({"study__mode": "max"}, "lower is better"),
        ({"study__asha": {"grace_period": 3}}, "grace_period = 3: expected a multiple of evaluation.eval_every"),
        ({"study__asha": {"grace_period": 6}}, r"<= training.epochs \(4\)"),
        ({"study__asha": {"grace": 2}}, "unknown key 'study.asha.grace'"),
        ({"study__resources": {"num_workers": "two"}}, "num_workers = 'two': expected an integer"),
        ({"study__resources": {"use_gpu": "yes"}}, "use_gpu = 'yes': expected true or false"),
        ({"study__resources": {"cpus_per_worker": 0}}, "cpus_per_worker = 0 is out of range: expected a number > 0"),
        ({"study__asha": {"grace_period": 2, "brackets": 0}}, "study.asha.brackets = 0 is out of range"),
        ({"study__asha": {"grace_period": 2, "reduction_factor": 1}},
         "reduction_factor = 1 is out of range: expected a number > 1"),
        ({"study__asha": 3}, "study.asha = 3: expected a mapping with keys grace_period"),
        ({"study__asha": {"reduction_factor": 2}}, "study.asha.grace_period: missing"),
        ({"study__seed": -1}, "study.seed = -1 is out of range: expected an integer >= 0"),
        ({"study__max_failures": "x"}, "study.max_failures = 'x': expected an integer >= 0"),
        ({"study__modes": ["min"]}, "study.modes: only for a multi-objective study"),
        ({"study__resources": {"gpus": 1}}, "unknown key 'study.resources.gpus'"),
        ({"training__epochs": 5}, "training.epochs = 5: expected a multiple of evaluation.eval_every"),
        ({"training__train_on": "all"}, "expected train_minus_val"),
        ({"study__searcher": "grid"}, "grid searcher takes choice, int"),
        ({"modle": {"backbone": "resnet18"}}, "unknown key 'modle'"),
    ],
)
def test_malformed_spaces_give_one_clear_error(tmp_path, changes, message):
    d = space_with(**{k: v for k, v in changes.items() if "__" in k})
    d.update({k: v for k, v in changes.items() if "__" not in k})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=message) as info:
        load_search_space(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_study_block_defaults_and_overrides_go_through_the_engine():
    d = space_with(study={"num_samples": 2, "asha": None, "resources": None})
    st = parse_search_space(d, source="s.yaml").study
    assert st.asha is None and (st.resources.num_workers, st.resources.use_gpu, st.resources.cpus_per_worker) == (
        1, False, 1.0)
    st = parse_search_space(BASE, source="s.yaml", overrides=["study.asha.reduction_factor=2",
                                                             "study.resources.cpus_per_worker=2"]).study
    assert st.asha.reduction_factor == 2.0 and isinstance(st.asha.reduction_factor, float)
    assert st.resources.cpus_per_worker == 2.0 and isinstance(st.resources.cpus_per_worker, float)
    with pytest.raises(ConfigError, match=r"s.yaml: study.asha.brackets = 0 is out of range"):
        parse_search_space(BASE, source="s.yaml", overrides=["study.asha.brackets=0"])
    with pytest.raises(ConfigError, match="not a dotted path"):
        parse_search_space(BASE, source="s.yaml", overrides=["study..seed=1"])


def test_search_block_cannot_be_overridden():
    with pytest.raises(ConfigError, match="search block cannot be overridden"):
        parse_search_space(BASE, source="s.yaml", overrides=["search.loss.temperature=1"])


def test_study_and_final_read_the_vocabulary():
    from brainage_core import metrics
    from study import final, space

    assert space.VALIDATION_METRICS is metrics.VALIDATION_METRICS
    assert final.TEST_METRICS is metrics.TEST_METRICS


def test_validating_a_space_loads_neither_torch_nor_ray():
    """brainage_core/config/ and study/space/ validate a YAML with no heavy import (loss_registry.py's contract)."""
    import subprocess
    import sys

    code = ("import sys; from study.space import load_search_space; "
            f"load_search_space({str(SPACES / 'all.yaml')!r}, expand_env=False); "
            "print(sorted(m for m in ('torch', 'ray', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
