"""Tests of brainage_core.evaluation: challenge scores, probes, validation split, features, Evaluator."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import brainage_core.evaluation.evaluator as evaluator_module
from brainage_core.config import EvaluationConfig
from brainage_core.errors import BrainageError, DataError
from brainage_core.evaluation import (
    AGE_ALPHAS,
    SITE_CS,
    Evaluator,
    balanced_accuracy,
    challenge_scores,
    chance_balanced_accuracy,
    extract_features,
    fit_age_probe,
    fit_site_probe,
    mae,
    make_validation_split,
    rmse,
)

torch.set_num_threads(1)

# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------


def test_challenge_score_of_the_paper():
    # L^exp in the paper: MAE_int 2.55, MAE_ext 3.761, BAcc 5.1 % -> Lc 1.540
    s = challenge_scores(2.55, 3.761, 0.051)
    assert round(s["lc"], 3) == 1.540
    assert s["lc_2022_09"] == pytest.approx(3.761 * 0.051**0.3 + (1 / 64) ** 0.3 * 2.55)
    assert s["lc_2022_06"] == pytest.approx(3.761 * 0.051 + 2.55 / 64)
    # other rows of the leaderboard table
    assert round(challenge_scores(2.67, 4.18, 0.067)["lc"], 2) == 1.86
    assert challenge_scores(1.0, 2.0, 0.5, n_sites=10)["lc_2022_06"] == pytest.approx(2.0 * 0.5 + 1.0 / 10)
    assert challenge_scores(1.0, 2.0, 0.5, n_sites=10)["lc_2022_09"] == pytest.approx(2 * 0.5**0.3 + 0.1**0.3)


def test_challenge_scores_refuse_percentages_and_propagate_nan():
    with pytest.raises(BrainageError, match="bacc"):
        challenge_scores(2.5, 3.7, 5.1)
    with pytest.raises(BrainageError, match="n_sites"):
        challenge_scores(2.5, 3.7, 0.05, n_sites=0)
    assert math.isnan(challenge_scores(2.5, math.nan, 0.05)["lc"])


def test_point_metrics():
    assert mae([1, 2, 3], [2, 2, 5]) == pytest.approx(1.0)
    assert rmse([0, 0], [3, 4]) == pytest.approx(math.sqrt(12.5))
    assert math.isnan(mae([], []))
    assert balanced_accuracy([0, 0, 0, 1], [0, 0, 1, 1]) == pytest.approx((2 / 3 + 1) / 2)
    assert chance_balanced_accuracy(["a", "b", "b", "c"]) == pytest.approx(1 / 3)
    with pytest.raises(BrainageError, match="3 true values but 2"):
        mae([1, 2, 3], [1, 2])


# --------------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------------


def site_age_features(n, n_sites, rng, *, informative=True):
    sites = rng.integers(0, n_sites, n)
    ages = rng.uniform(6, 88, n)
    if informative:
        X = np.concatenate([np.eye(n_sites)[sites], ages[:, None] / 10.0], axis=1)
    else:
        X = rng.normal(size=(n, n_sites + 1))
    return X.astype(np.float32), ages, sites


def test_probes_follow_the_challenge_recipe():
    rng = np.random.default_rng(0)
    X, ages, sites = site_age_features(200, 8, rng)
    age_probe = fit_age_probe(X, ages)
    site_probe = fit_site_probe(X, sites)
    assert type(age_probe.estimator).__name__ == "Ridge" and age_probe.param["alpha"] in AGE_ALPHAS
    clf = site_probe.estimator
    assert type(clf).__name__ == "LogisticRegression" and clf.solver == "saga" and clf.max_iter == 150
    assert site_probe.param["C"] in SITE_CS
    assert age_probe.cv_score > 0.99  # r² of an exactly linear age code


def test_site_probe_on_perfect_and_random_features():
    rng = np.random.default_rng(1)
    n_sites = 10
    X, ages, sites = site_age_features(600, n_sites, rng)
    probe = fit_site_probe(X[:400], sites[:400])
    assert balanced_accuracy(sites[400:], probe.predict(X[400:])) > 0.97
    assert mae(ages[400:], fit_age_probe(X[:400], ages[:400]).predict(X[400:])) < 0.5

    Xr, _, sites_r = site_age_features(600, n_sites, rng, informative=False)
    probe = fit_site_probe(Xr[:400], sites_r[:400])
    bacc = balanced_accuracy(sites_r[400:], probe.predict(Xr[400:]))
    assert abs(bacc - 1 / n_sites) < 0.08


def test_site_probe_with_small_sites_falls_back_with_a_note():
    rng = np.random.default_rng(2)
    X, _, sites = site_age_features(60, 4, rng)
    sites[:3] = 7  # a site with 3 members: stratified 5-fold is impossible
    probe = fit_site_probe(X, sites)
    assert probe.note is not None and "fewer than 5" in probe.note
    assert set(probe.predict(X)) <= set(sites)


def test_site_probe_with_one_site_and_bad_input():
    X = np.random.default_rng(3).normal(size=(20, 3))
    probe = fit_site_probe(X, np.zeros(20, dtype=int))
    assert (probe.predict(X) == 0).all() and "one site" in probe.note
    with pytest.raises(BrainageError, match="non-finite features"):
        fit_age_probe(np.full((10, 2), np.nan), np.arange(10.0))
    with pytest.raises(BrainageError, match="10 feature rows but 9 labels"):
        fit_age_probe(np.zeros((10, 2)), np.arange(9.0))


# --------------------------------------------------------------------------------------------------
# Validation split
# --------------------------------------------------------------------------------------------------


def cohort_table(n_sites=30, seed=0, prefix="sub"):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 60, n_sites)
    sites = np.repeat([f"site{i:02d}" for i in range(n_sites)], sizes)
    n = sites.size
    table = pd.DataFrame(
        {
            "participant_id": [f"{prefix}{i:05d}" for i in range(n)],
            "age": rng.uniform(6, 88, n),
            "site": sites,
            "row": rng.permutation(n),  # rows not in site order
        }
    )
    return table


def test_validation_split_holds_out_whole_sites():
    table = cohort_table()
    split = make_validation_split(table, internal_frac=0.09, external_frac=0.10, seed=0)
    site_of = table.set_index("row")["site"]
    train_sites = set(site_of.loc[split.train_rows])
    ext_sites = set(site_of.loc[split.val_external_rows])
    int_sites = set(site_of.loc[split.val_internal_rows])
    assert ext_sites == set(split.external_sites) and ext_sites
    assert not ext_sites & train_sites
    assert int_sites <= train_sites  # internal = sites seen in training
    parts = [split.train_rows, split.val_internal_rows, split.val_external_rows]
    joined = np.concatenate(parts)
    assert joined.size == len(table) and set(joined) == set(table["row"])
    n = len(table)
    assert abs(split.val_internal_rows.size - round(0.09 * n)) <= 1
    assert abs(split.val_external_rows.size / n - 0.10) < 0.03


def test_validation_split_is_deterministic_per_seed():
    table = cohort_table(seed=4)
    a = make_validation_split(table, seed=3)
    b = make_validation_split(table.sample(frac=1.0, random_state=0), seed=3)  # row order of the table irrelevant
    for x, y in zip(
        [a.train_rows, a.val_internal_rows, a.val_external_rows],
        [b.train_rows, b.val_internal_rows, b.val_external_rows],
    ):
        np.testing.assert_array_equal(x, y)
    c = make_validation_split(table, seed=4)
    assert a.external_sites != c.external_sites or not np.array_equal(a.val_internal_rows, c.val_internal_rows)


def test_validation_split_edge_cases():
    table = cohort_table(n_sites=5, seed=1)
    none = make_validation_split(table, internal_frac=0.0, external_frac=0.0)
    assert none.train_rows.size == len(table) and none.val_internal_rows.size == 0 and none.external_sites == ()
    with pytest.raises(DataError, match="at least 2"):
        make_validation_split(table.assign(site="one"), external_frac=0.1)
    with pytest.raises(DataError, match="lacks column"):
        make_validation_split(table.drop(columns="site"))
    with pytest.raises(DataError, match="expected < 1"):
        make_validation_split(table, internal_frac=0.6, external_frac=0.5)


# --------------------------------------------------------------------------------------------------
# Feature extraction and the Evaluator on a tiny in-memory store
# --------------------------------------------------------------------------------------------------

N_SITES = 6
N_VOX = 8  # volumes (1, 1, 2, 4): voxels 0-5 site one-hot, voxel 6 age / 10, voxel 7 = 1 for test subjects


class FlattenModel(torch.nn.Module):
    """features(x) = the voxels (or noise of the same size, seeded by the voxels, when random=True)."""

    def __init__(self, random=False):
        super().__init__()
        self.random = random
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def features(self, x):
        assert not torch.is_grad_enabled() and not self.training
        self.calls.append(x.shape[0])
        assert x.dtype == torch.float32
        flat = x.flatten(1) * self.scale
        if self.random:
            g = torch.Generator().manual_seed(int(flat.sum().item() * 1000) % (2**31))
            return torch.randn(flat.shape, generator=g)
        return flat


class MemoryStore:
    """Duck-typed stand-in for brainage_core.data.store.Store (same attributes and methods)."""

    def __init__(self, tables: dict[str, pd.DataFrame], arrays: dict[str, np.ndarray]):
        self.path = Path("/memory/store")
        self.participants = pd.concat([t.assign(split=s) for s, t in tables.items()], ignore_index=True)
        self.splits = list(tables)
        self.site_labels = sorted(self.participants["site"].astype(str).unique().tolist())
        self._arrays = arrays

    def array(self, split):
        return self._arrays[split]

    def table(self, split):
        part = self.participants[self.participants["split"] == split]
        return part.sort_values("row").reset_index(drop=True)


def encode(table, site_labels, test_flag):
    vols = np.zeros((len(table), 1, 1, 2, 4), dtype=np.float16)
    flat = vols.reshape(len(table), N_VOX)
    codes = table["site"].map({s: i for i, s in enumerate(site_labels)}).to_numpy()
    flat[np.arange(len(table)), codes] = 1.0
    flat[:, 6] = table["age"].to_numpy() / 10.0
    flat[:, 7] = test_flag
    out = np.empty_like(vols)
    out[table["row"].to_numpy()] = vols
    return out


def make_store(seed=0, *, overlap_id=False):
    rng = np.random.default_rng(seed)
    labels = [f"s{i}" for i in range(N_SITES)]

    def table(n, sites, prefix):
        return pd.DataFrame(
            {
                "participant_id": [f"{prefix}{i}" for i in range(n)],
                "age": rng.uniform(6, 88, n).round(1),
                "site": rng.choice(sites, n),
                "row": rng.permutation(n),
            }
        )

    tables = {
        "train": table(240, labels[:4], "tr"),
        "internal_test": table(40, labels[:4], "it"),
        "external_test": table(30, labels[4:], "et"),
    }
    if overlap_id:
        tables["internal_test"].loc[0, "participant_id"] = tables["train"].loc[5, "participant_id"]
    arrays = {s: encode(t, labels, 0.0 if s == "train" else 1.0) for s, t in tables.items()}
    return MemoryStore(tables, arrays)


def test_extract_features_order_dtype_and_mode():
    store = make_store()
    model = FlattenModel()
    model.train()
    rows = np.array([17, 3, 200, 3, 0])
    feats = extract_features(model, store.array("train"), rows, batch_size=2, device="cpu")
    assert feats.dtype == np.float32 and feats.shape == (5, N_VOX)
    np.testing.assert_array_equal(feats, store.array("train")[rows].reshape(5, N_VOX).astype(np.float32))
    assert model.calls == [2, 2, 1] and model.training  # batched; training mode restored
    assert extract_features(model, store.array("train"), None, batch_size=64).shape == (240, N_VOX)
    with pytest.raises(BrainageError, match="row 240 out of range"):
        extract_features(model, store.array("train"), [240], batch_size=4)


def test_evaluator_on_features_that_encode_site_and_age(monkeypatch):
    store = make_store()
    fitted_on = []
    real_age, real_site = evaluator_module.fit_age_probe, evaluator_module.fit_site_probe

    def spy_age(X, y, **kw):
        fitted_on.append(X)
        return real_age(X, y, **kw)

    def spy_site(X, s, **kw):
        fitted_on.append(X)
        return real_site(X, s, **kw)

    monkeypatch.setattr(evaluator_module, "fit_age_probe", spy_age)
    monkeypatch.setattr(evaluator_module, "fit_site_probe", spy_site)
    cfg = EvaluationConfig(val_internal_frac=0.15, val_external_frac=0.25, batch_size=16)
    ev = Evaluator(store, cfg, train_on="train_minus_val")
    assert ev.training_rows["train"].size == ev.split.train_rows.size
    m = ev.evaluate(FlattenModel(), "cpu")
    assert m["leaked"] is False
    assert m["val_bacc"] > 0.95 and m["test_bacc"] > 0.95
    assert m["val_bacc_chance"] == pytest.approx(
        1 / len(set(store.table("train").set_index("row").loc[ev.split.val_internal_rows, "site"]))
    )
    assert m["test_bacc_chance"] == pytest.approx(1 / 4)
    for key in ("val_mae_int", "val_mae_ext", "test_mae_int", "test_mae_ext", "val_rmse_int", "test_rmse_ext"):
        assert m[key] < 1.0, key  # age is linearly encoded
    assert m["val_lc"] == pytest.approx(challenge_scores(m["val_mae_int"], m["val_mae_ext"], m["val_bacc"])["lc"])
    n_train_sites = store.table("train")["site"].nunique()
    assert m["val_lc_2022_06"] == pytest.approx(m["val_mae_ext"] * m["val_bacc"] + m["val_mae_int"] / n_train_sites)
    assert m["test_lc_2022_06"] == pytest.approx(m["test_mae_ext"] * m["test_bacc"] + m["test_mae_int"] / N_SITES)
    # 4 probe fits (val age/site, test age/site); none saw a test subject (voxel 7 marks them)
    assert len(fitted_on) == 4
    for X in fitted_on:
        assert (X[:, 7] == 0).all()
    assert fitted_on[0].shape[0] == ev.split.train_rows.size and fitted_on[2].shape[0] == 240


def test_evaluator_random_features_are_about_chance():
    store = make_store(seed=5)
    cfg = EvaluationConfig(val_internal_frac=0.3, val_external_frac=0.2, test=False)
    m = Evaluator(store, cfg).evaluate(FlattenModel(random=True), "cpu")
    assert abs(m["val_bacc"] - m["val_bacc_chance"]) < 0.2
    assert m["val_mae_int"] > 10  # no age information
    assert math.isnan(m["test_lc"])  # test disabled


def test_leakage_flag():
    store = make_store()
    cfg = EvaluationConfig()
    ev_all = Evaluator(store, cfg, train_on="all")
    assert ev_all.leaked and set(ev_all.training_rows) == {"train", "internal_test", "external_test"}
    m = ev_all.evaluate(FlattenModel(), "cpu")
    assert m["leaked"] is True
    assert math.isnan(m["val_lc"])  # validation subjects were trained on: no val_* metrics
    assert not math.isnan(m["test_lc"])
    ev_train = Evaluator(store, cfg, train_on="train")
    assert not ev_train.leaked and ev_train.training_rows["train"].size == 240
    # a participant id present both in train and a test split is leakage too
    assert Evaluator(make_store(overlap_id=True), cfg, train_on="train").leaked


def test_evaluator_without_test_splits():
    store = make_store()
    own = MemoryStore({"train": store.table("train").drop(columns="split")}, {"train": store.array("train")})
    m = Evaluator(own, EvaluationConfig(val_internal_frac=0.2, val_external_frac=0.2)).evaluate(FlattenModel())
    assert not m["leaked"] and math.isnan(m["test_mae_int"]) and m["val_bacc"] > 0.9


def test_evaluator_on_a_real_prepared_store(tmp_path):
    from brainage_core.data.store import StoreWriter, open_store

    mem = make_store(seed=2)
    tables = []
    with StoreWriter(tmp_path / "store") as writer:
        for split in mem.splits:
            table = mem.table(split)
            array = mem.array(split)
            for row in range(len(table)):
                assert writer.append(split, array[row]) == row
            tables.append(table)
        writer.finish(pd.concat(tables, ignore_index=True), {"grid": "tiny", "fingerprint": "test", "source": "mem"})
    store = open_store(tmp_path / "store")
    m = Evaluator(store, EvaluationConfig(val_internal_frac=0.15, val_external_frac=0.25)).evaluate(FlattenModel())
    m_mem = Evaluator(mem, EvaluationConfig(val_internal_frac=0.15, val_external_frac=0.25)).evaluate(FlattenModel())
    for key in ("val_lc", "val_bacc", "test_mae_ext", "test_bacc"):
        assert m[key] == pytest.approx(m_mem[key]), key
    assert m["leaked"] is False and m["val_bacc"] > 0.95


def test_extract_features_of_a_real_model():
    from brainage_core.grids import grid_shape
    from brainage_core.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", "contrastive", base_width=4)
    array = np.random.default_rng(0).random((5, 1, *grid_shape("6mm"))).astype(np.float16)
    feats = extract_features(model, array, [4, 0, 2], batch_size=2, device="cpu")
    assert feats.dtype == np.float32 and feats.shape[0] == 3 and np.isfinite(feats).all()
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-4)  # L2-normalised projection
    again = extract_features(model, array, [0, 2, 4], batch_size=3, device="cpu")
    np.testing.assert_allclose(feats[[1, 2, 0]], again, atol=1e-5)


class _ConstantProbe:
    """A probe that predicts one value for every row (a hand-made stand-in for the fitted probes)."""

    def __init__(self, value):
        self.value = value

    def predict(self, X):
        return np.full(X.shape[0], self.value)


def test_constant_baselines_and_chance_on_a_hand_made_table():
    # fit rows' ages 20, 30, 40, 90 -> median 35
    fit_ages = np.array([20.0, 30.0, 40.0, 90.0])
    internal = (np.zeros((4, 2)), np.array([30.0, 50.0, 35.0, 15.0]), np.array([0, 1, 1, 2]))
    external = (np.zeros((2, 2)), np.array([35.0, 75.0]))
    m = Evaluator._score("val", _ConstantProbe(40.0), _ConstantProbe(1), internal, external, 3, fit_ages=fit_ages)
    assert m["val_mae_int_const"] == pytest.approx((5 + 15 + 0 + 20) / 4)
    assert m["val_mae_ext_const"] == pytest.approx((0 + 40) / 2)
    assert m["val_mae_int"] == pytest.approx((10 + 10 + 5 + 25) / 4)  # the probe's 40, not the median
    assert m["val_bacc_chance"] == pytest.approx(1 / 3)  # 3 sites in the scored part, not 1/64
    # no fit rows (or no part): NaN, never a made-up baseline
    empty = Evaluator._score("test", None, None, None, None, 64)
    assert math.isnan(empty["test_mae_int_const"]) and math.isnan(empty["test_bacc_chance"])


def test_evaluator_reports_constant_baselines_of_its_own_split():
    store = make_store(seed=3)
    cfg = EvaluationConfig(val_internal_frac=0.2, val_external_frac=0.25, batch_size=16)
    ev = Evaluator(store, cfg)
    m = ev.evaluate(FlattenModel(), "cpu")
    table = store.table("train").set_index("row")
    median = np.median(table.loc[ev.split.train_rows, "age"])
    ages_int = table.loc[ev.split.val_internal_rows, "age"].to_numpy()
    ages_ext = table.loc[ev.split.val_external_rows, "age"].to_numpy()
    assert m["val_mae_int_const"] == pytest.approx(np.abs(ages_int - median).mean())
    assert m["val_mae_ext_const"] == pytest.approx(np.abs(ages_ext - median).mean())
    test_median = np.median(table["age"])
    ages_test = store.table("internal_test")["age"].to_numpy()
    assert m["test_mae_int_const"] == pytest.approx(np.abs(ages_test - test_median).mean())
    # age is linearly encoded in these features: the probe beats the constant by far
    assert m["val_mae_int"] < 0.2 * m["val_mae_int_const"]
