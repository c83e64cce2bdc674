"""The synthetic cohort: per-site structure, layout, grids, determinism, readability by ``prepare``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainage_core.data.__main__ import main as data_main
from brainage_core.data.cohort_plan import EXTERNAL_SITES, load_site_stats, plan_cohort
from brainage_core.data.synthetic import TABLE_COLUMNS, generate_cohort, make_subject, subject_relpath
from brainage_core.errors import ConfigError
from brainage_core.grids import grid_affine, grid_shape

SHARED_STATS = Path(__file__).resolve().parents[2] / "shared" / "data" / "openbhb_site_stats.json"
SPLIT_KEYS = {"train": "n_train", "internal_test": "n_internal", "external_test": "n_external"}


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _real_stats() -> list[dict]:
    """The real per-site figures: the shared JSON when this checkout has it, else the packaged copy."""
    if SHARED_STATS.is_file():
        return json.loads(SHARED_STATS.read_text())
    return load_site_stats().to_dict("records")


def test_packaged_stats_are_the_shared_ones():
    if not SHARED_STATS.is_file():
        pytest.skip("no ../shared checkout beside the repository")
    assert json.loads(SHARED_STATS.read_text()) == json.loads(
        (Path(__file__).resolve().parents[1] / "brainage_core" / "data" / "site_stats.json").read_text()
    )


def test_full_plan_reproduces_real_counts_through_the_cli(tmp_path, capsys):
    out = tmp_path / "full"
    assert data_main(["synth", "--out", str(out), "--full", "--grid", "6mm", "--plan-only", "--quiet"]) == 0
    assert "3984 subjects (train 3227 / internal_test 362 / external_test 395) over 64 sites" in capsys.readouterr().out
    table = pd.read_csv(out / "participants.tsv", sep="\t")
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert not list(out.glob("train")), "plan-only must not write volumes"
    counts = table.groupby(["siteXacq", "split"]).size()
    for site in _real_stats():
        for split, key in SPLIT_KEYS.items():
            assert counts.get((site["siteXacq"], split), 0) == site[key], (site["siteXacq"], split)
        rows = table[table["siteXacq"] == site["siteXacq"]]
        # sex, field strength and raw site follow the per-site figures
        assert abs((rows["sex"] == "female").mean() - site["frac_female"]) <= 0.5 / len(rows) + 1e-9
        assert (rows["magnetic_field_strength"] == site["field_T"]).all()
        assert (rows["site"] == site["site"]).all() and (rows["study"] == site["study"]).all()
        # ages inside the real range, median close to the real one (stratified quantile draws)
        assert rows["age"].min() >= site["age_min"] - 0.01 and rows["age"].max() <= site["age_max"] + 0.01
        spread = site["age_q75"] - site["age_q25"]
        assert abs(rows["age"].median() - site["age_median"]) <= max(0.25 * spread, 0.6), site["siteXacq"]
    assert sorted(table.loc[table["split"] == "external_test", "siteXacq"].unique()) == list(EXTERNAL_SITES)
    assert table["participant_id"].is_unique


def test_scaled_plan_keeps_every_site_and_split():
    plan = plan_cohort(subjects=400, seed=3)
    real = {(s["siteXacq"], split): s[key] for s in _real_stats() for split, key in SPLIT_KEYS.items()}
    counts = plan.groupby(["siteXacq", "split"]).size()
    for cell, n_real in real.items():
        assert (counts.get(cell, 0) >= 1) == (n_real > 0), cell
    assert set(plan.loc[plan["split"] == "external_test", "siteXacq"]) == set(EXTERNAL_SITES)
    assert 400 <= len(plan) < 520  # proportional, plus the one-per-cell floor
    big = counts.get((3, "train"))  # the largest real site stays the largest
    assert big == counts.max() and abs(big - round(866 * 400 / 3984)) <= 1


def test_sites_keeps_largest_internal_and_one_external():
    plan = plan_cohort(subjects=30, sites=4, seed=0)
    stats = load_site_stats()
    internal = stats[stats["n_external"] == 0].nlargest(3, "n_total")["siteXacq"].tolist()
    assert sorted(plan["siteXacq"].unique()) == sorted(internal + [15])
    assert set(plan["split"]) == {"train", "internal_test", "external_test"}
    assert len(plan) < 45


def test_age_confound_zero_gives_every_site_the_same_distribution():
    plan = plan_cohort(full=True, age_confound=0.0, seed=0)
    medians = plan.groupby("siteXacq")["age"].median()
    big = plan["siteXacq"].value_counts()
    big_sites = big[big >= 50].index
    assert medians[big_sites].max() - medians[big_sites].min() < 8.0
    real = plan_cohort(full=True, age_confound=1.0, seed=0).groupby("siteXacq")["age"].median()
    assert real[big_sites].max() - real[big_sites].min() > 25.0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(subjects=10, full=True),
        dict(),
        dict(subjects=0),
        dict(subjects=10, sites=1),
        dict(subjects=10, age_confound=2),
    ],
)
def test_bad_plan_arguments(kwargs):
    with pytest.raises(ConfigError):
        plan_cohort(**kwargs)


def test_bad_generator_arguments(tmp_path):
    for kwargs in (dict(grid="2mm"), dict(fmt="mgz"), dict(strength=-1.0), dict(workers=0)):
        with pytest.raises(ConfigError, match=next(iter(kwargs)).replace("fmt", "format")):
            generate_cohort(tmp_path, subjects=5, sites=2, **kwargs)


def test_openbhb_layout_is_deterministic_and_regenerable(tmp_path):
    kwargs = dict(subjects=10, sites=3, grid="6mm", seed=5, progress=False)
    table = generate_cohort(tmp_path / "a", **kwargs)
    generate_cohort(tmp_path / "b", workers=2, **kwargs)  # processes must not change a byte
    digest_a, digest_b = _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b")
    assert digest_a == digest_b and len(digest_a) == len(table) + 1
    generate_cohort(tmp_path / "c", **(kwargs | {"seed": 6}))
    assert _tree_digest(tmp_path / "c") != digest_a

    plan = plan_cohort(subjects=10, sites=3, seed=5)
    row = plan.iloc[len(plan) // 2]
    path = tmp_path / "a" / subject_relpath(row["participant_id"], row["split"], "openbhb")
    folder = "train" if row["split"] == "train" else "val"
    assert path.relative_to(tmp_path / "a").parts[:3] == (folder, "derivatives", f"sub-{row['participant_id']}")
    stored = np.load(path)
    assert stored.dtype == np.float32 and stored.shape == (1, 1, *grid_shape("6mm"))
    np.testing.assert_array_equal(stored[0, 0], make_subject(row, "6mm", 1.5, 5))  # subject i alone
    assert 0.0 <= stored.min() and 0.5 < stored.max() < 1.6


def test_strength_zero_removes_every_site_effect():
    row = plan_cohort(subjects=10, sites=3, seed=0).iloc[0].copy()
    other = row.copy()
    other["siteXacq"] = 15
    np.testing.assert_array_equal(make_subject(row, "6mm", 0.0, 0), make_subject(other, "6mm", 0.0, 0))
    assert not np.array_equal(make_subject(row, "6mm", 1.5, 0), make_subject(other, "6mm", 1.5, 0))


def test_site_segmentation_differs_by_region(monkeypatch):
    """The regional segmentation fields change the map up in some regions and down in others (not a
    global rescaling), and only the site's signature: at strength 0 they do nothing."""
    import brainage_core.data.synthetic as synthetic

    row = plan_cohort(subjects=10, sites=3, seed=0).iloc[0]
    regional = make_subject(row, "6mm", 1.5, 0)
    monkeypatch.setattr(synthetic, "SEG_BIAS_FIELD_SD", 0.0)
    monkeypatch.setattr(synthetic, "SEG_SLOPE_FIELD_SD", 0.0)
    uniform = make_subject(row, "6mm", 1.5, 0)
    control = make_subject(row, "6mm", 0.0, 0)
    monkeypatch.undo()
    np.testing.assert_array_equal(control, make_subject(row, "6mm", 0.0, 0))
    gm = uniform > 0.3
    change = regional[gm] / uniform[gm] - 1.0
    assert np.mean(change > 0.05) > 0.05 and np.mean(change < -0.05) > 0.05


def test_coarse_grid_matches_block_averaged_full_grid_anatomy():
    from brainage_core.grids import to_grid

    row = plan_cohort(subjects=10, sites=2, seed=0).iloc[0]
    fine = to_grid(make_subject(row, "3mm", 0.0, 0), "3mm", "6mm")
    coarse = make_subject(row, "6mm", 0.0, 0)
    assert coarse.shape == grid_shape("6mm")
    assert np.corrcoef(fine.ravel(), coarse.ravel())[0, 1] > 0.95


def test_nifti_output_and_prepare_reads_both_layouts(tmp_path):
    from brainage_core.data.prepare import prepare

    table = generate_cohort(tmp_path / "nii", subjects=6, sites=2, grid="6mm", fmt="nifti", progress=False)
    img = nib.load(str(tmp_path / "nii" / table["path"].iloc[0]))
    assert img.shape == grid_shape("6mm") and np.allclose(img.affine, grid_affine("6mm"))
    assert img.get_data_dtype() == np.float32

    plan = plan_cohort(subjects=6, sites=2, seed=0)
    np.testing.assert_array_equal(np.asarray(img.dataobj), make_subject(plan.iloc[0], "6mm", 1.5, 0))

    generate_cohort(tmp_path / "npy", subjects=6, sites=2, grid="6mm", progress=False)
    store = prepare(tmp_path / "npy", layout="openbhb", out=tmp_path / "store", progress=False)
    assert store.grid == "6mm"
    assert set(store.splits) == {"train", "internal_test", "external_test"}
    assert sum(store.array(s).shape[0] for s in store.splits) == len(table)
    first = store.table("train").iloc[0]
    np.testing.assert_allclose(
        store.array("train")[0, 0].astype(np.float32), np.load(first["source_path"])[0, 0], atol=2e-3
    )


def test_qc_mosaic(tmp_path, capsys):
    png = tmp_path / "qc.png"
    args = ["synth", "--out", str(tmp_path / "c"), "--subjects", "8", "--sites", "3", "--grid", "6mm", "--quiet"]
    assert data_main(args + ["--qc", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "QC mosaic" in capsys.readouterr().out
