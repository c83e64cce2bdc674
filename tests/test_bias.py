"""brainage_core/evaluation/bias.py, validation_split_of's defaults and export.model_from_spec."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from brainage_core.config import EvaluationConfig
from brainage_core.errors import DataError
from brainage_core.evaluation import (
    apply_bias_correction,
    brain_age_gap,
    fit_bias_correction,
    make_validation_split,
    validation_split_of,
)
from brainage_core.export import model_from_spec, model_spec


def test_fit_and_apply_bias_correction_hand_computed():
    # brain_age = 0.5 · age + 20 exactly (the probe shrinks towards the mean age 40)
    age = np.array([20.0, 40.0, 60.0])
    brain_age = np.array([30.0, 40.0, 50.0])
    bias = fit_bias_correction(age, brain_age)
    assert bias["slope"] == pytest.approx(0.5) and bias["intercept"] == pytest.approx(20.0) and bias["n"] == 3
    assert brain_age_gap(brain_age, age).tolist() == [10.0, 0.0, -10.0]
    gap, corrected = apply_bias_correction(np.array([35.0, 40.0]), np.array([20.0, np.nan]), bias)
    assert gap[0] == pytest.approx(35.0 - 30.0) and corrected[0] == pytest.approx(25.0)
    assert np.isnan(gap[1]) and np.isnan(corrected[1])  # unknown age
    none_gap, none_corrected = apply_bias_correction(brain_age, age, None)
    assert np.isnan(none_gap).all() and np.isnan(none_corrected).all()


def test_fit_bias_correction_bad_input_is_one_error():
    with pytest.raises(DataError, match="at least 2"):
        fit_bias_correction(np.array([30.0]), np.array([31.0]))
    with pytest.raises(DataError, match="same subjects"):
        fit_bias_correction(np.array([30.0, 40.0]), np.array([31.0]))


def test_validation_split_defaults_are_the_configs():
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"row": np.arange(60), "site": rng.choice(["a", "b", "c", "d"], 60)})
    default = make_validation_split(table)
    cfg = EvaluationConfig()
    for got in (validation_split_of(table, None), validation_split_of(table, {}), validation_split_of(table, cfg)):
        assert np.array_equal(got.val_internal_rows, default.val_internal_rows)
        assert np.array_equal(got.val_external_rows, default.val_external_rows)
    other = validation_split_of(table, {"val_internal_frac": 0.2, "val_external_frac": 0.0})
    assert other.val_external_rows.size == 0 and other.val_internal_rows.size == 12
    assert np.array_equal(validation_split_of(table, dataclasses.replace(cfg, val_seed=3)).val_internal_rows,
                          make_validation_split(table, seed=3).val_internal_rows)


def test_model_from_spec_rebuilds_the_exported_architecture():
    from brainage_core.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", "contrastive", base_width=4, proj_dim=8, normalize=False, feature="encoder")
    config = {"model": {"backbone": "resnet18", "head": "contrastive", "base_width": 4}}
    spec = model_spec(model, config, grid="6mm")
    for given in (spec, dataclasses.asdict(spec)):
        rebuilt = model_from_spec(given)
        rebuilt.load_state_dict(model.state_dict())  # same architecture: every tensor fits
        assert rebuilt.out_dim == 8 and rebuilt.normalize is False and rebuilt.feature == "encoder"
