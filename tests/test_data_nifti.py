"""NIfTI layout: tables in tsv/csv/parquet, files by name or path column, grids and --resample."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.image import resample_img

from brainage_core.data import open_store, prepare
from brainage_core.data.store import MANIFEST
from brainage_core.errors import DataError, StoreError
from brainage_core.grids import block_average, grid_affine, grid_shape


def write_nifti_cohort(root, *, fmt: str = "tsv", grid: str = "6mm", path_column: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows, volumes = [], {}
    for k in range(5):
        pid = f"sub-{k:02d}"
        vol = rng.random(grid_shape(grid)).astype(np.float32)
        volumes[pid] = vol
        name = f"{pid}_gm.nii.gz" if k % 2 else f"{pid}.nii"
        nib.save(nib.Nifti1Image(vol, grid_affine(grid)), root / "images" / name)
        row = {"participant_id": pid, "age": 30.0 + k, "sex": "F", "site": f"scanner{k % 2}", "handedness": "R"}
        if path_column:
            row["path"] = f"images/{name}"
        rows.append(row)
    table = pd.DataFrame(rows)
    if fmt == "tsv":
        table.to_csv(root / "participants.tsv", sep="\t", index=False)
    elif fmt == "csv":
        table.to_csv(root / "participants.csv", index=False)
    else:
        table.to_parquet(root / "participants.parquet", index=False)
    return table, volumes


@pytest.mark.parametrize("fmt,path_column", [("tsv", False), ("csv", True), ("parquet", False)])
def test_round_trip_everything_in_train(tmp_path, fmt, path_column):
    table, volumes = write_nifti_cohort(tmp_path / "src", fmt=fmt, path_column=path_column)
    store = prepare(tmp_path / "src", layout="nifti", out=tmp_path / "store", progress=False)
    assert store.splits == ["train"] and store.grid == "6mm"
    part = store.table("train")
    assert len(part) == 5
    for _, rec in part.iterrows():
        np.testing.assert_allclose(store.array("train")[rec["row"], 0], volumes[rec["participant_id"]], atol=1e-3)
        src = table.set_index("participant_id").loc[rec["participant_id"]]
        assert rec["age"] == src["age"] and rec["site"] == src["site"] == rec["site_raw"]
        assert rec["handedness"] == "R"
    assert store.site_labels == ["scanner0", "scanner1"]


def test_table_file_as_source_and_grid_averaging(tmp_path):
    table, volumes = write_nifti_cohort(tmp_path / "src", fmt="csv", grid="3mm")
    store = prepare(
        tmp_path / "src" / "participants.csv", layout="nifti", out=tmp_path / "store", grid="6mm", progress=False
    )
    rec = store.table("train").iloc[0]
    np.testing.assert_allclose(
        store.array("train")[rec["row"], 0], block_average(volumes[rec["participant_id"]], 2), atol=1e-3
    )


def _other_grid_image(path, rng):
    affine = np.diag([-9.0, 9.0, 9.0, 1.0])
    affine[:3, 3] = [90.0, -126.0, -72.0]
    nib.save(nib.Nifti1Image(rng.random((20, 24, 20)).astype(np.float32), affine), path)
    return nib.load(path)


def test_other_grid_refused_then_resampled(tmp_path):
    write_nifti_cohort(tmp_path / "src")
    img = _other_grid_image(tmp_path / "src" / "images" / "sub-03_gm.nii.gz", np.random.default_rng(1))
    with pytest.raises(
        DataError,
        match=r"participant 'sub-03' \(file .*sub-03_gm.nii.gz\): image grid 20×24×20 at 9×9×9 mm"
        r".*expected one of them, or pass --resample",
    ):
        prepare(tmp_path / "src", layout="nifti", out=tmp_path / "store", progress=False)
    assert not (tmp_path / "store" / MANIFEST).exists()
    store = prepare(tmp_path / "src", layout="nifti", out=tmp_path / "store", resample=True, grid="6mm", progress=False)
    expected = resample_img(
        img, target_affine=grid_affine("6mm"), target_shape=grid_shape("6mm"), force_resample=True, copy_header=True
    ).get_fdata()
    rec = store.table("train").set_index("participant_id").loc["sub-03"]
    np.testing.assert_allclose(store.array("train")[rec["row"], 0], expected, atol=2e-3)
    # a right-shaped image with a shifted origin is not on the grid either
    shifted = grid_affine("6mm").copy()
    shifted[:3, 3] += 12.0
    nib.save(
        nib.Nifti1Image(np.ones(grid_shape("6mm"), np.float32), shifted),
        tmp_path / "src" / "images" / "sub-01_gm.nii.gz",
    )
    with pytest.raises(DataError, match=r"participant 'sub-01' .*image grid 31×37×31 at 6×6×6 mm \(affine origin"):
        prepare(tmp_path / "src", layout="nifti", out=tmp_path / "store2", progress=False)


def test_nifti_bad_inputs(tmp_path):
    write_nifti_cohort(tmp_path / "src")
    root = tmp_path / "src"
    out = tmp_path / "store"
    gz = root / "images" / "sub-01_gm.nii.gz"
    data = gz.read_bytes()
    gz.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"participant 'sub-01' \(file .*sub-01_gm.nii.gz\): unreadable or truncated"):
        prepare(root, layout="nifti", out=out, progress=False)
    gz.unlink()
    with pytest.raises(DataError, match=r"participant 'sub-01' \(file .*sub-01.nii.gz\): no image for this row"):
        prepare(root, layout="nifti", out=out, progress=False)
    nib.save(
        nib.Nifti1Image(np.zeros(grid_shape("6mm"), np.float32), grid_affine("6mm")), root / "images" / "sub-01.nii"
    )
    nib.save(
        nib.Nifti1Image(np.zeros(grid_shape("6mm"), np.float32), grid_affine("6mm")), root / "images" / "sub-77.nii"
    )
    with pytest.raises(
        DataError, match=r"participant 'sub-77' \(file .*sub-77.nii\): image has no participants.tsv row"
    ):
        prepare(root, layout="nifti", out=out, progress=False)
    (root / "images" / "sub-77.nii").unlink()
    nan = np.zeros(grid_shape("6mm"), np.float32)
    nan[3, 4, 5] = np.inf
    nib.save(nib.Nifti1Image(nan, grid_affine("6mm")), root / "images" / "sub-01.nii")
    with pytest.raises(DataError, match=r"participant 'sub-01' .*1 non-finite voxel\(s\) \(first at \(3, 4, 5\)\)"):
        prepare(root, layout="nifti", out=out, progress=False)
    with pytest.raises(StoreError):
        open_store(out)
    store = prepare(root, layout="nifti", out=out, on_error="skip", progress=False)
    assert "sub-01" not in set(store.participants["participant_id"]) and store.manifest["skipped"] == 1
