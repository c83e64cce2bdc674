"""RAMP flat-array layout: round trip through a small fake GM mask, test split, bad inputs."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.masking import unmask

from brainage_core.data import open_store, prepare
from brainage_core.data.store import MANIFEST
from brainage_core.errors import ConfigError, DataError, StoreError
from brainage_core.grids import grid_affine, grid_shape

EXTRA_COLUMNS = 40  # stands for the quasi-raw voxels and FreeSurfer/ROI features after the VBM part


def write_ramp(root, *, seed: int = 0):
    """train/test flat arrays on the 6mm grid with a fake GM mask; returns (mask path, tables, volumes)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    prob = rng.random(grid_shape("6mm")).astype(np.float32)
    prob[prob < 0.3] = 0.02  # below the 0.05 threshold: outside the mask
    mask_path = root.parent / "mask.nii.gz"
    nib.save(nib.Nifti1Image(prob, grid_affine("6mm")), mask_path)
    mask = prob > 0.05
    n_vbm = int(mask.sum())
    tables, volumes = {}, {}
    k = 0
    for part, splits in (("train", ["train"] * 4), ("test", ["internal_test"] * 2 + ["external_test"] * 3)):
        rows, flat = [], []
        for split in splits:
            pid = f"{2000 + k}"
            vbm = rng.random(n_vbm).astype(np.float32)
            flat.append(np.concatenate([vbm, rng.random(EXTRA_COLUMNS).astype(np.float32)]))
            vol = np.zeros(mask.shape, np.float32)
            vol[mask] = vbm
            volumes[pid] = vol
            row = {"participant_id": pid, "sex": "M", "age": 10.0 + 3 * k, "site": f"S{k % 2}", "siteXacq": 40 + k % 4}
            if part == "test":
                row["split"] = split
            rows.append(row)
            k += 1
        np.save(root / f"{part}.npy", np.stack(flat))
        tables[part] = pd.DataFrame(rows)
        tables[part].to_csv(root / f"{part}.tsv", sep="\t", index=False)
    return mask_path, tables, volumes, n_vbm


def test_round_trip_with_internal_external_split(tmp_path):
    mask_path, tables, volumes, n_vbm = write_ramp(tmp_path / "ramp")
    store = prepare(tmp_path / "ramp", layout="ramp", mask=mask_path, out=tmp_path / "store", progress=False)
    assert store.grid == "6mm"
    assert store.splits == ["train", "internal_test", "external_test"]
    assert [store.manifest["shapes"][s][0] for s in store.splits] == [4, 2, 3]
    everything = pd.concat(tables.values()).set_index("participant_id")
    flat_test = np.load(tmp_path / "ramp" / "test.npy")
    for split in store.splits:
        arr = store.array(split)
        for _, rec in store.table(split).iterrows():
            pid = rec["participant_id"]
            np.testing.assert_allclose(arr[rec["row"], 0], volumes[pid], rtol=1e-3, atol=1e-3)
            assert rec["age"] == everything.at[pid, "age"]
            assert rec["site"] == str(everything.at[pid, "siteXacq"]) and rec["site_raw"] == everything.at[pid, "site"]
            if split != "train":
                assert rec["split"] == everything.at[pid, "split"]
    # the placement is nilearn's unmask order (C order of the mask array)
    mask_img = nib.Nifti1Image((nib.load(mask_path).get_fdata() > 0.05).astype(np.int8), grid_affine("6mm"))
    row = 3  # test row 3 = second external subject
    expected = unmask(flat_test[row, :n_vbm], mask_img).get_fdata()
    ext = store.table("external_test")
    pid = pd.read_csv(tmp_path / "ramp" / "test.tsv", sep="\t", dtype=str)["participant_id"][row]
    np.testing.assert_allclose(
        store.array("external_test")[ext.index[ext["participant_id"] == pid][0], 0], expected, rtol=1e-3, atol=1e-3
    )
    # unchanged: no-op; a different mask file: redone
    again = prepare(tmp_path / "ramp", layout="ramp", mask=mask_path, out=tmp_path / "store", progress=False)
    assert again.manifest["created"] == store.manifest["created"]


def test_mask_is_required_and_checked(tmp_path):
    mask_path, *_ = write_ramp(tmp_path / "ramp")
    with pytest.raises(ConfigError, match="--mask"):
        prepare(tmp_path / "ramp", layout="ramp", out=tmp_path / "store")
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.float32), np.eye(4)), tmp_path / "bad_mask.nii")
    with pytest.raises(DataError, match=r"bad_mask.nii: mask shape \(10, 10, 10\); expected one of the grids"):
        prepare(tmp_path / "ramp", layout="ramp", mask=tmp_path / "bad_mask.nii", out=tmp_path / "store")
    with pytest.raises(ConfigError, match="quasiraw"):
        prepare(tmp_path / "ramp", layout="ramp", mask=mask_path, modality="quasiraw", out=tmp_path / "store")


def _edit_array(root, part, fn):
    arr = np.load(root / f"{part}.npy")
    np.save(root / f"{part}.npy", fn(arr))


def _edit_table(root, part, fn):
    table = pd.read_csv(root / f"{part}.tsv", sep="\t", dtype=str)
    fn(table).to_csv(root / f"{part}.tsv", sep="\t", index=False)


def _nan_row(arr):
    arr[1, 5] = np.nan
    return arr


CASES = {
    "non_finite": (lambda r: _edit_array(r, "test", _nan_row), r"participant '2005' \(file .*test.npy#1\).*non-finite"),
    "row_without_file": (
        lambda r: _edit_array(r, "train", lambda a: a[:3]),
        r"participant '2003' \(file .*train.npy#3\): no row 3 in train.npy",
    ),
    "file_without_row": (
        lambda r: _edit_table(r, "test", lambda t: t.iloc[:4]),
        r"participant '<row 4>' \(file .*test.npy#4\): array row has no test.tsv row",
    ),
    "unknown_split": (
        lambda r: _edit_table(r, "test", lambda t: t.assign(split=t["split"].mask(t.index == 2, "ext2"))),
        r"participant '2006' .*unknown split 'ext2'",
    ),
    "bad_age": (
        lambda r: _edit_table(r, "train", lambda t: t.assign(age=t["age"].replace("13.0", "-1"))),
        r"participant '2001' \(file .*train.npy#1\): age -1 is out of range",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_rows_name_participant_and_row(tmp_path, case):
    mask_path, *_ = write_ramp(tmp_path / "ramp")
    mutate, pattern = CASES[case]
    mutate(tmp_path / "ramp")
    out = tmp_path / "store"
    with pytest.raises(DataError, match=pattern):
        prepare(tmp_path / "ramp", layout="ramp", mask=mask_path, out=out, progress=False)
    assert not (out / MANIFEST).exists()
    store = prepare(tmp_path / "ramp", layout="ramp", mask=mask_path, out=out, on_error="skip", progress=False)
    skipped = pd.read_csv(out / "skipped.tsv", sep="\t")
    assert len(skipped) == 1 and store.manifest["skipped"] == 1


def test_whole_file_problems(tmp_path):
    mask_path, *_ = write_ramp(tmp_path / "ramp")
    root, out = tmp_path / "ramp", tmp_path / "store"
    _edit_array(root, "train", lambda a: a[:, :10])
    with pytest.raises(DataError, match=r"train.npy: rows have 10 values; expected at least \d+ \(the voxels of mask"):
        prepare(root, layout="ramp", mask=mask_path, out=out, progress=False)
    mask_path, *_ = write_ramp(tmp_path / "ramp2")
    root = tmp_path / "ramp2"
    data = (root / "test.npy").read_bytes()
    (root / "test.npy").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match=r"test.npy: unreadable or truncated"):
        prepare(root, layout="ramp", mask=mask_path, out=out, progress=False)
    mask_path, *_ = write_ramp(tmp_path / "ramp3")
    _edit_table(tmp_path / "ramp3", "test", lambda t: t.drop(columns=["split"]))
    with pytest.raises(DataError, match=r"test.tsv: no 'split' column; expected internal_test or external_test"):
        prepare(tmp_path / "ramp3", layout="ramp", mask=mask_path, out=out, progress=False)
    with pytest.raises(StoreError):
        open_store(out)
