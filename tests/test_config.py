"""Tests of brainage_core.config: the schema, its defaults, and one clear error per kind of mistake."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from brainage_core.config import (
    BACKBONES,
    LOSS_METHODS,
    AugmentConfig,
    EvaluationConfig,
    ExperimentConfig,
    LossConfig,
    SyntheticConfig,
    apply_overrides,
    check_value,
    config_from_dict,
    field_info,
    field_type,
    load_config,
    validate,
)
from brainage_core.errors import ConfigError, LossError


def write_yaml(tmp_path, d, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(d))
    return path


def test_defaults_are_the_paper_recipe():
    cfg = config_from_dict({})
    assert cfg.model.backbone == "resnet18" and cfg.model.head == "contrastive"
    assert cfg.loss.method == "yaware" and cfg.loss.kernel == "rbf" and cfg.loss.sigma == 1.0
    assert cfg.loss.temperature == 0.1 and cfg.loss.base_temperature == 0.07
    assert cfg.optimizer.name == "adam" and cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 5e-5
    assert (cfg.schedule.name, cfg.schedule.step_every, cfg.schedule.rate) == ("step", 10, 0.9)
    assert (cfg.training.epochs, cfg.training.batch_size, cfg.training.views) == (300, 32, 2)
    assert cfg.training.train_on == "train_minus_val"
    assert cfg.training.augment == AugmentConfig()
    assert (cfg.evaluation.val_internal_frac, cfg.evaluation.val_external_frac) == (0.09, 0.10)
    assert cfg.data.synthetic is None and cfg.data.grid == "full"


def test_round_trip_through_yaml_and_json(tmp_path):
    d = {
        "data": {"synthetic": {"subjects": 40, "sites": 6}, "grid": "6mm"},
        "loss": {"method": "expw", "sigma": 2, "form": "paper"},
        "training": {"epochs": 2, "augment": {"cutout": True}},
    }
    cfg = load_config(write_yaml(tmp_path, d))
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.data.synthetic == SyntheticConfig(subjects=40, sites=6)
    assert cfg.loss.sigma == 2.0 and isinstance(cfg.loss.sigma, float)
    assert cfg.training.augment.cutout is True
    plain = cfg.to_dict()
    json.dumps(plain)  # plain, JSON-safe
    assert config_from_dict(plain) == cfg
    assert load_config(write_yaml(tmp_path, plain, "again.yaml")) == cfg


def test_yaml_scientific_notation_without_dot_is_accepted(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("optimizer:\n  lr: 1e-3\n")  # PyYAML reads this as a string
    assert load_config(path).optimizer.lr == pytest.approx(1e-3)


def test_method_dependent_defaults():
    cfg = config_from_dict({"loss": {"method": "l1"}})
    assert cfg.loss.kernel is None and cfg.model.head == "regression" and cfg.model.feature == "encoder"
    assert cfg.loss.build_kwargs() == {}
    cfg = config_from_dict({"loss": {"method": "rnc"}})
    assert cfg.loss.kernel is None and cfg.loss.build_kwargs() == {"temperature": 2.0}
    assert config_from_dict({"loss": {"method": "rnc", "temperature": 0.5}}).loss.temperature == 0.5
    kw = config_from_dict({"loss": {"method": "threshold", "form": "paper", "threshold_margin": 1.5}}).loss
    assert kw.build_kwargs()["threshold_margin"] == 1.5 and kw.build_kwargs()["kernel"] == "rbf"


@pytest.mark.parametrize(
    ("d", "needles"),
    [
        ({"loss": {"temprature": 0.1}}, ["loss.temprature", "did you mean 'loss.temperature'"]),
        ({"trainig": {}}, ["'trainig'", "did you mean 'training'"]),
        ({"training": {"augment": {"cutuot": True}}}, ["training.augment.cutuot", "'training.augment.cutout'"]),
        ({"data": {"synthetic": {"subject": 3}}}, ["data.synthetic.subject", "'data.synthetic.subjects'"]),
    ],
)
def test_unknown_key_names_full_path_and_suggestion(tmp_path, d, needles):
    path = write_yaml(tmp_path, d)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg
    for needle in needles:
        assert needle in msg


@pytest.mark.parametrize(
    ("d", "needles"),
    [
        ({"training": {"bf16": "yes"}}, ["training.bf16", "'yes'", "true or false"]),
        ({"training": {"epochs": 2.5}}, ["training.epochs", "2.5", "integer"]),
        ({"training": {"epochs": True}}, ["training.epochs", "True", "integer"]),
        ({"optimizer": {"lr": "fast"}}, ["optimizer.lr", "'fast'", "number"]),
        ({"loss": {"method": 3}}, ["loss.method", "3", "one of"]),
        ({"loss": "yaware"}, ["loss", "'yaware'", "mapping"]),
        ({"loss": {"method": "l1"}, "model": "resnet18"}, ["model = 'resnet18'", "mapping"]),
        ({"model": {"base_width": None}}, ["model.base_width", "None", "integer"]),
    ],
)
def test_wrong_type(tmp_path, d, needles):
    path = write_yaml(tmp_path, d)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    for needle in [str(path), *needles]:
        assert needle in str(err.value)


@pytest.mark.parametrize(
    ("d", "needles"),
    [
        ({"optimizer": {"lr": 0}}, ["optimizer.lr", "> 0"]),
        ({"loss": {"temperature": -0.1}}, ["loss.temperature", "-0.1", "> 0"]),
        ({"loss": {"sigma": 0.0}}, ["loss.sigma", "> 0"]),
        ({"training": {"views": 0}}, ["training.views", ">= 1"]),
        ({"evaluation": {"eval_every": 0}}, ["evaluation.eval_every", ">= 1"]),
        ({"evaluation": {"val_external_frac": 1.0}}, ["evaluation.val_external_frac", "< 1"]),
        ({"evaluation": {"val_internal_frac": -0.1}}, ["evaluation.val_internal_frac", ">= 0"]),
        ({"optimizer": {"lr": float("nan")}}, ["optimizer.lr", "not finite"]),
        ({"loss": {"method": "yawre"}}, ["loss.method", "'yawre'", "did you mean 'yaware'", *LOSS_METHODS]),
        ({"model": {"backbone": "resnet19"}}, ["model.backbone", *BACKBONES]),
        ({"data": {"grid": "2mm"}}, ["data.grid", "full, 3mm, 6mm"]),
        ({"data": {"synthetic": {"age_confound": 1.5}}}, ["data.synthetic.age_confound", "<= 1"]),
    ],
)
def test_out_of_range_or_not_a_choice(d, needles):
    with pytest.raises(ConfigError) as err:
        config_from_dict(d, "my.yaml")
    for needle in ["my.yaml", *needles]:
        assert needle in str(err.value)


@pytest.mark.parametrize(
    ("d", "needles"),
    [
        ({"loss": {"method": "yaware", "kernel": None}}, ["loss.kernel", "needs a kernel"]),
        ({"loss": {"method": "supcon", "kernel": "rbf"}}, ["loss.kernel", "takes no kernel"]),
        ({"loss": {"method": "yaware", "form": "paper"}}, ["loss.form", "expected null"]),
        ({"loss": {"method": "expw", "threshold_margin": 1.0}}, ["loss.threshold_margin", "'threshold'"]),
        ({"loss": {"method": "expw", "kernel": "gaussian", "sigma": 0.2}}, ["loss.sigma", "gaussian"]),
        ({"loss": {"method": "l1"}, "model": {"head": "contrastive"}}, ["model.head", "'regression'"]),
        ({"model": {"head": "regression"}}, ["model.head", "'contrastive'"]),
        ({"evaluation": {"val_internal_frac": 0.5, "val_external_frac": 0.5}}, ["val_external_frac", "< 1"]),
        ({"model": {"backbone": "densenet121", "base_width": 15}}, ["model.base_width", "even"]),
        ({"evaluation": {"val_internal_frac": 0, "val_external_frac": 0}}, ["training.train_on", "train"]),
        ({"data": {"source": "/x", "synthetic": {}}}, ["data.source", "data.synthetic"]),
    ],
)
def test_cross_field_rules(d, needles):
    with pytest.raises(ConfigError) as err:
        config_from_dict(d, "my.yaml")
    for needle in ["my.yaml", *needles]:
        assert needle in str(err.value)


def test_overrides_convert_to_the_field_type(tmp_path):
    path = write_yaml(tmp_path, {"loss": {"sigma": 1.0}})
    cfg = load_config(
        path,
        ["training.bf16=true", "loss.sigma=2", "data.synthetic.subjects=50", "data.store=2024", "loss.form=null"],
    )
    assert cfg.training.bf16 is True
    assert cfg.loss.sigma == 2.0 and isinstance(cfg.loss.sigma, float)
    assert cfg.data.synthetic == SyntheticConfig(subjects=50)
    assert cfg.data.store == "2024"
    d = apply_overrides({"loss": {"sigma": 1.0}}, ["loss.temperature=0.5"])
    assert d == {"loss": {"sigma": 1.0, "temperature": 0.5}}
    # the input is not modified
    src = {"loss": {"sigma": 1.0}}
    apply_overrides(src, ["loss.sigma=3"])
    assert src == {"loss": {"sigma": 1.0}}


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("loss.sigma", ["'loss.sigma'", "dotted.key=value"]),
        ("=3", ["dotted path"]),
        ("loss..sigma=3", ["dotted path"]),
        ("loss.sgma=2", ["unknown key 'loss.sgma'", "did you mean 'loss.sigma'"]),
        ("loss.sigma.x=2", ["loss.sigma.x", "not a section"]),
        ("loss.sigma=abc", ["loss.sigma", "'abc'", "number"]),
        ("training.views=0", ["training.views", ">= 1"]),
        ("training.bf16=maybe", ["training.bf16", "true or false"]),
        ("loss.sigma=[1", ["not valid YAML"]),
    ],
)
def test_bad_overrides(tmp_path, override, needles):
    path = write_yaml(tmp_path, {})
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    msg = str(err.value)
    assert str(path) in msg and "override" in msg
    for needle in needles:
        assert needle in msg


def test_env_expansion(tmp_path, monkeypatch):
    path = write_yaml(tmp_path, {"data": {"source": "${BRAINAGE_TEST_ROOT}/cohort", "layout": "openbhb"}})
    monkeypatch.delenv("BRAINAGE_TEST_ROOT", raising=False)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "BRAINAGE_TEST_ROOT" in msg and "data.source" in msg and str(path) in msg
    # validation without resolving
    assert load_config(path, expand_env=False).data.source == "${BRAINAGE_TEST_ROOT}/cohort"
    monkeypatch.setenv("BRAINAGE_TEST_ROOT", "/data/obhb")
    assert load_config(path).data.source == "/data/obhb/cohort"
    d = {"data": {"store": "${BRAINAGE_UNSET_VAR:-/tmp/store}"}}
    monkeypatch.delenv("BRAINAGE_UNSET_VAR", raising=False)
    assert config_from_dict(d).data.store == "/tmp/store"


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("loss: {method: yaware\n")
    with pytest.raises(ConfigError, match="broken.yaml.*not valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml.*mapping"):
        load_config(listy)


def test_unsafe_yaml_tags_are_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("data: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="evil.yaml"):
        load_config(path)


def test_ignore_sections_for_search_spaces():
    d = {"loss": {"method": "expw"}, "search": {"loss.sigma": [1, 2]}, "study": {"name": "x"}}
    with pytest.raises(ConfigError, match="unknown key 'search'"):
        config_from_dict(d)
    assert config_from_dict(d, ignore_sections=("search", "study")).loss.method == "expw"


def test_field_type_and_info_for_search_spaces():
    assert field_type("loss.temperature") is float
    assert field_type("training.bf16") is bool
    assert field_type("data.synthetic.subjects") is int
    assert field_type("loss") is LossConfig
    assert field_type("evaluation") is EvaluationConfig
    info = field_info("loss.kernel")
    assert info.optional and info.choices == ("gaussian", "rbf", "cauchy")
    assert field_info("optimizer.lr").gt == 0.0
    with pytest.raises(ConfigError, match="did you mean 'loss.temperature'"):
        field_type("loss.temprature")
    assert check_value("loss.sigma", 3) == 3.0
    with pytest.raises(ConfigError, match="loss.sigma"):
        check_value("loss.sigma", -1)


def test_every_schema_field_has_a_default():
    def walk(cls):
        for f in dataclasses.fields(cls):
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name

    for cls in (ExperimentConfig, LossConfig, SyntheticConfig):
        walk(cls)


def test_choice_lists_agree_with_models_and_losses():
    from brainage_core import losses, models
    from brainage_core.config import HEADS, KERNELS

    assert set(LOSS_METHODS) == set(losses.CONTRASTIVE_METHODS) | set(losses.SUPERVISED_METHODS)
    assert set(KERNELS) == set(losses.KERNELS)
    assert set(BACKBONES) == set(models.BACKBONES)
    assert set(HEADS) == set(models.HEADS)


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_build_kwargs_are_accepted_by_build_loss(method):
    from brainage_core.losses import build_loss

    cfg = config_from_dict({"loss": {"method": method}})
    build_loss(cfg.loss.method, **cfg.loss.build_kwargs())


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_the_loss_registry_decides_what_config_and_build_loss_accept(method):
    """Each parameter the registry says a method does not take is refused by build_loss, and every one it
    takes is passed on by the config: the registry is the one place those rules live."""
    from brainage_core.loss_registry import METHODS
    from brainage_core.losses import build_loss

    info = METHODS[method]
    given = config_from_dict({"loss": {"method": method}}).loss.build_kwargs()
    assert tuple(given) == info.parameters
    kernel = {"kernel": "rbf"} if info.kernel else {}
    foreign = {"kernel": "rbf", "form": "paper"}
    for name, value in foreign.items():
        if name not in info.parameters:
            with pytest.raises(LossError, match=name):
                build_loss(method, **{**kernel, name: value})
            with pytest.raises(ConfigError, match=f"loss.{name}"):
                config_from_dict({"loss": {"method": method, name: value}})
    if info.kernel:
        with pytest.raises(LossError, match="kernel"):
            build_loss(method, kernel=None)
    if "threshold_margin" not in info.parameters:
        with pytest.raises(LossError, match="threshold_margin"):
            build_loss(method, threshold_margin=1.0, **kernel)


def test_config_differences_names_every_changed_leaf():
    from brainage_core.config import config_differences

    a = {"loss": {"method": "yaware", "sigma": 1.0}, "training": {"epochs": 3}, "gone": 1}
    b = {"loss": {"method": "expw", "sigma": 1.0 + 1e-12}, "training": {"epochs": 3}, "new": {"x": 2}}
    assert config_differences(a, b) == [("gone", 1, None), ("loss.method", "yaware", "expw"),
                                        ("loss.sigma", 1.0, 1.0 + 1e-12), ("new", None, {"x": 2})]
    assert [k for k, _, _ in config_differences(a, b, close_floats=True)] == ["gone", "loss.method", "new"]
    assert config_differences(a, a) == []


@dataclasses.dataclass(frozen=True)
class Inner:
    rate: float = validate.setting(0.5, gt=0.0, le=1.0)


@dataclasses.dataclass(frozen=True)
class Outer:
    count: int = validate.setting(ge=1)  # required
    kind: str = validate.setting("a", choices=("alpha", "beta", "a"))
    inner: Inner | None = validate.setting(None)
    flag: bool = validate.setting(False)


def test_the_validation_engine_on_a_schema_of_its_own():
    """brainage_core.config.validate knows nothing of the experiment: any dataclass tree is a schema
    (the search spaces' study block is one)."""
    v = validate
    out = v.build(Outer, {"count": 2, "inner": {"rate": "1e-1"}}, "top.", "f.yaml")
    assert out == Outer(count=2, inner=Inner(rate=0.1))
    cases = [
        ({}, "f.yaml: top.count: missing: expected an integer >= 1"),
        ({"count": 0}, "f.yaml: top.count = 0 is out of range: expected an integer >= 1"),
        ({"count": 1, "kind": "alpah"},
         "f.yaml: top.kind = 'alpah': expected one of alpha, beta, a; did you mean 'alpha'?"),
        ({"count": 1, "inner": {"rat": 1}}, "f.yaml: unknown key 'top.inner.rat'; did you mean 'top.inner.rate'? "
                                            "(valid keys of top.inner: rate)"),
        ({"count": 1, "inner": {"rate": 2}},
         "f.yaml: top.inner.rate = 2 is out of range: expected a number > 0 and <= 1"),
        ({"count": 1, "flag": 1}, "f.yaml: top.flag = 1: expected true or false"),
    ]
    for d, message in cases:
        with pytest.raises(ConfigError) as err:
            v.build(Outer, d, "top.", "f.yaml")
        assert str(err.value) == message
    assert v.lookup(Outer, "inner.rate").le == 1.0 and v.lookup(Outer, "count").required
    assert v.scalar("3", float, "x", gt=0) == 3.0
    with pytest.raises(ConfigError, match=r"^x = inf is not finite: expected a number$"):
        v.scalar(float("inf"), float, "x")



def test_one_did_you_mean_helper_for_all_validation():
    """The closest-key suggestion is computed in one place (brainage_core/config/validate.py)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    users = sorted(str(p.relative_to(root)) for folder in ("brainage_core", "study", "analysis", "bench")
                   for p in (root / folder).rglob("*.py") if "get_close_matches" in p.read_text(encoding="utf-8"))
    assert users == ["brainage_core/config/validate.py"]
