"""study/predict.py: brain age, brain-age gap and its bias correction, MAE per age bin and per site."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from study_fixtures import small_store, trained_study

from brainage_core.data.prepare import prepare
from brainage_core.data.synthetic import generate_cohort
from brainage_core.errors import DataError
from brainage_core.evaluation import extract_features
from brainage_core.training import load_model_from_checkpoint
from study.export import export_submission
from study.predict import predict_cohort

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    store = small_store(root)
    study = trained_study(root / "study", store, temperatures=(0.2,), epochs=1)
    submission = export_submission(study, root / "submission")
    generate_cohort(root / "nifti", subjects=10, sites=3, grid="6mm", seed=7, fmt="nifti", progress=False)
    return {"root": root, "submission": submission, "nifti": root / "nifti", "openbhb": root / "cohort6"}


def expected_brain_age(submission: Path, cohort: Path, layout: str, out: Path) -> pd.DataFrame:
    """Recompute brain ages from the checkpoint and the metadata's probe, independently of predict.py."""
    meta = pd.read_pickle(submission / "metadata.pkl")
    model, _ = load_model_from_checkpoint(meta["checkpoint"])
    store = prepare(cohort, layout=layout, out=out, grid=meta["model_spec"]["grid"], progress=False)
    parts = []
    for split in store.splits:
        table = store.table(split)
        feats = extract_features(model, store.array(split), table["row"].to_numpy())
        parts.append(table[["participant_id", "age", "site"]].assign(expected=meta["age_probe"].predict(feats)))
    return pd.concat(parts, ignore_index=True)


@pytest.mark.slow
def test_predict_nifti_cohort_cli(world, tmp_path):
    out = tmp_path / "pred" / "predictions.csv"
    proc = subprocess.run(
        [sys.executable, str(REPO / "study" / "predict.py"), str(world["submission"]), str(world["nifti"]),
         "--layout", "nifti", "--out", str(out), "--age-bins", "0,20,40,60,120"],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "MAE by age" in proc.stdout and "MAE by site" in proc.stdout and str(out.resolve()) in proc.stdout
    pred = pd.read_csv(out, dtype={"participant_id": str, "site": str})
    cohort = pd.read_csv(world["nifti"] / "participants.tsv", sep="\t", dtype={"participant_id": str})
    assert sorted(pred["participant_id"]) == sorted(cohort["participant_id"])
    ref = expected_brain_age(world["submission"], world["nifti"], "nifti", tmp_path / "ref_store")
    merged = pred.merge(ref, on="participant_id", suffixes=("", "_ref"))
    assert len(merged) == len(pred)
    np.testing.assert_allclose(merged["brain_age"], merged["expected"], atol=1e-4)
    np.testing.assert_allclose(merged["age"], merged["age_ref"])
    np.testing.assert_allclose(pred["brain_age_gap"], pred["brain_age"] - pred["age"], atol=1e-9)
    bias = pd.read_pickle(world["submission"] / "metadata.pkl")["bias_correction"]
    corrected = pred["brain_age"] - (bias["slope"] * pred["age"] + bias["intercept"])
    np.testing.assert_allclose(pred["brain_age_gap_corrected"], corrected, atol=1e-9)
    np.testing.assert_allclose(pred["brain_age_corrected"], pred["age"] + corrected, atol=1e-9)
    by_site = pd.read_csv(out.with_name("predictions_by_site.csv"), dtype={"site": str})
    for _, row in by_site.iterrows():
        g = pred[pred["site"] == row["site"]]
        assert row["n"] == len(g)
        assert row["mae"] == pytest.approx(np.mean(np.abs(g["brain_age"] - g["age"])))
        assert row["mean_gap_corrected"] == pytest.approx(g["brain_age_gap_corrected"].mean())
    by_age = pd.read_csv(out.with_name("predictions_by_age.csv"))
    assert by_age["n"].sum() == len(pred)
    bins = pd.cut(pred["age"], bins=[0.0, 20.0, 40.0, 60.0, 120.0], right=False).astype(str)
    assert sorted(by_age["age_bin"]) == sorted(bins.unique())
    for _, row in by_age.iterrows():
        g = pred[bins == row["age_bin"]]
        assert row["mae"] == pytest.approx(np.mean(np.abs(g["brain_age"] - g["age"])))


def test_predict_openbhb_layout_in_process(world, tmp_path):
    paths = predict_cohort(world["submission"], world["openbhb"], layout="openbhb", out=tmp_path / "p.csv",
                           store=tmp_path / "kept_store")
    pred = pd.read_csv(paths["predictions"], dtype={"participant_id": str})
    assert (tmp_path / "kept_store" / "manifest.json").is_file()  # --store keeps the prepared cohort
    assert set(pred["split"]) == {"train", "internal_test", "external_test"}
    assert np.isfinite(pred["brain_age"]).all()


def test_bad_inputs(world, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(world["submission"], broken)
    (broken / "metadata.pkl").unlink()
    with pytest.raises(DataError, match="metadata.pkl not found"):
        predict_cohort(broken, world["nifti"], layout="nifti", out=tmp_path / "x.csv")
    with pytest.raises(DataError, match="--layout 'ramp'"):
        predict_cohort(world["submission"], world["nifti"], layout="ramp", out=tmp_path / "x.csv")
    proc = subprocess.run(
        [sys.executable, str(REPO / "study" / "predict.py"), str(world["submission"]), str(tmp_path / "no_cohort"),
         "--layout", "nifti", "--out", str(tmp_path / "y.csv")],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("predict: error:") and "no_cohort" in proc.stderr


def test_predict_feeds_the_trained_input_transform(world, tmp_path):
    """A zscore + crop model: brain ages come from the features of the transformed input, as in training."""
    from brainage_core.data.augment import DeviceAugment
    from brainage_core.training.loop import EvaluationView

    study = trained_study(tmp_path / "study_zc", world["root"] / "store6", temperatures=(0.2,), epochs=1,
                          augment={"zscore": True, "crop": True})
    submission = export_submission(study, tmp_path / "submission_zc")
    meta = pd.read_pickle(submission / "metadata.pkl")
    assert meta["model_spec"]["zscore"] and meta["model_spec"]["crop"]
    paths = predict_cohort(submission, world["nifti"], layout="nifti", out=tmp_path / "p.csv",
                           store=tmp_path / "cohort_store")
    pred = pd.read_csv(paths["predictions"], dtype={"participant_id": str})
    model, _ = load_model_from_checkpoint(meta["checkpoint"])
    view = EvaluationView(model, DeviceAugment("6mm", crop=True, zscore=True), bf16=False,
                          memory_format=torch.contiguous_format)
    store = prepare(world["nifti"], layout="nifti", out=tmp_path / "ref_store", grid="6mm", progress=False)
    parts = []
    for split in store.splits:
        table, array = store.table(split), store.array(split)
        rows = table["row"].to_numpy()
        parts.append(table[["participant_id"]].assign(
            expected=meta["age_probe"].predict(extract_features(view, array, rows)),
            raw=meta["age_probe"].predict(extract_features(model, array, rows)),
        ))
    merged = pred.merge(pd.concat(parts, ignore_index=True), on="participant_id")
    assert len(merged) == len(pred)
    assert np.abs(merged["expected"] - merged["raw"]).max() > 1e-2  # raw inputs would give other ages
    np.testing.assert_allclose(merged["brain_age"], merged["expected"], atol=1e-4)


def _cohort_copy(world, tmp_path, edit) -> Path:
    """The nifti cohort with its participants table changed by ``edit(table) -> table``."""
    cohort = tmp_path / "cohort"
    shutil.copytree(world["nifti"], cohort)
    table = pd.read_csv(cohort / "participants.tsv", sep="\t", dtype={"participant_id": str})
    edit(table).to_csv(cohort / "participants.tsv", sep="\t", index=False)
    return cohort


def test_cohort_with_some_ages_missing(world, tmp_path):
    table = pd.read_csv(world["nifti"] / "participants.tsv", sep="\t", dtype={"participant_id": str})
    unknown = set(table["participant_id"].iloc[[1, 4, 7]])
    cohort = _cohort_copy(world, tmp_path, lambda t: t.assign(age=t["age"].where(~t["participant_id"].isin(unknown))))
    paths = predict_cohort(world["submission"], cohort, layout="nifti", out=tmp_path / "p.csv",
                           age_bins=(0.0, 40.0, 120.0))
    pred = pd.read_csv(paths["predictions"], dtype={"participant_id": str, "site": str})
    assert sorted(pred["participant_id"]) == sorted(table["participant_id"])
    assert np.isfinite(pred["brain_age"]).all()
    ref = expected_brain_age(world["submission"], world["nifti"], "nifti", tmp_path / "ref_store")
    merged = pred.merge(ref, on="participant_id", suffixes=("", "_ref"))
    np.testing.assert_allclose(merged["brain_age"], merged["expected"], atol=1e-4)
    missing = pred["participant_id"].isin(unknown)
    for column in ("age", "brain_age_gap", "brain_age_gap_corrected", "brain_age_corrected"):
        assert pred.loc[missing, column].isna().all() and pred.loc[~missing, column].notna().all(), column
    known = pred[~missing]
    by_site = pd.read_csv(paths["by_site"], dtype={"site": str})
    assert by_site["n"].sum() == len(known) == len(table) - len(unknown)
    for _, row in by_site.iterrows():
        g = known[known["site"] == row["site"]]
        assert row["n"] == len(g) and row["mae"] == pytest.approx(np.mean(np.abs(g["brain_age"] - g["age"])))
    by_age = pd.read_csv(paths["by_age"])
    assert by_age["n"].sum() == len(known)
    for _, row in by_age.iterrows():
        g = known[pd.cut(known["age"], bins=[0.0, 40.0, 120.0], right=False).astype(str) == row["age_bin"]]
        assert row["n"] == len(g) and row["mean_gap"] == pytest.approx(g["brain_age_gap"].mean())


@pytest.mark.slow
def test_cohort_without_an_age_column_cli(world, tmp_path):
    cohort = _cohort_copy(world, tmp_path, lambda t: t.drop(columns="age"))
    out = tmp_path / "pred.csv"
    for stale in ("pred_by_age.csv", "pred_by_site.csv"):  # left by an earlier run: must not survive
        (tmp_path / stale).write_text("n,mae\n1,1\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "study" / "predict.py"), str(world["submission"]), str(cohort),
         "--layout", "nifti", "--out", str(out)],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no subject has a known age" in proc.stdout and "MAE by age" not in proc.stdout
    pred = pd.read_csv(out, dtype={"participant_id": str})
    cohort_ids = pd.read_csv(cohort / "participants.tsv", sep="\t", dtype={"participant_id": str})["participant_id"]
    assert sorted(pred["participant_id"]) == sorted(cohort_ids)
    assert np.isfinite(pred["brain_age"]).all()
    assert pred[["age", "brain_age_gap", "brain_age_gap_corrected"]].isna().all().all()
    ref = expected_brain_age(world["submission"], world["nifti"], "nifti", tmp_path / "ref_store")
    merged = pred.merge(ref, on="participant_id")
    np.testing.assert_allclose(merged["brain_age"], merged["expected"], atol=1e-4)
    assert not (tmp_path / "pred_by_age.csv").exists() and not (tmp_path / "pred_by_site.csv").exists()


def test_corrupt_weights_are_one_line(world, tmp_path):
    """Issue 12, case 7: a corrupt weights.pth ended in a torch traceback."""
    broken = tmp_path / "corrupt"
    shutil.copytree(world["submission"], broken)
    weights = broken / "weights.pth"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DataError, match=r"weights.pth: unreadable .*expected the weights written by study/export.py"):
        predict_cohort(broken, world["nifti"], layout="nifti", out=tmp_path / "x.csv")
    proc = subprocess.run(
        [sys.executable, str(REPO / "study" / "predict.py"), str(broken), str(world["nifti"]),
         "--layout", "nifti", "--out", str(tmp_path / "y.csv")],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "weights.pth: unreadable" in proc.stderr
