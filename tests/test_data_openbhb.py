"""Per-subject OpenBHB layout: round trip, grids, idempotence, every bad input, interrupted runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from brainage_core.data import open_store, prepare
from brainage_core.data.__main__ import main as data_main
from brainage_core.data.store import MANIFEST, StoreWriter
from brainage_core.errors import ConfigError, DataError, StoreError
from brainage_core.grids import block_average, grid_shape

SUFFIX = "_preproc-cat12vbm_desc-gm_T1w.npy"
SPLIT_SIZES = {"train": 4, "internal_test": 2, "external_test": 2}


def subject_file(root: Path, pid: str, split: str) -> Path:
    folder = "train" if split == "train" else "val"
    return root / folder / "derivatives" / f"sub-{pid}" / "ses-1" / f"sub-{pid}{SUFFIX}"


def write_cohort(root: Path, *, grid: str = "6mm", dtype=np.float64, lead=(1, 1), seed: int = 0) -> tuple:
    """A tiny per-subject cohort; returns (table, {pid: (D, H, W) float64 volume})."""
    rng = np.random.default_rng(seed)
    rows, volumes = [], {}
    k = 0
    for split, n in SPLIT_SIZES.items():
        for _ in range(n):
            pid = str(1000 + k)
            vol = rng.random(grid_shape(grid)) * 1.2
            path = subject_file(root, pid, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, vol.reshape(*lead, *vol.shape).astype(dtype))
            volumes[pid] = vol.astype(dtype).astype(np.float64)
            rows.append(
                {
                    "participant_id": pid,
                    "study": "ABIDE" if k % 2 else "IXI",
                    "sex": "female" if k % 3 else "male",
                    "age": 8.5 + 7 * k,
                    "site": k % 2,
                    "siteXacq": 10 + k % 3,
                    "tiv": 1500.0 + k,
                    "split": split,
                }
            )
            k += 1
    table = pd.DataFrame(rows)
    table.to_csv(root / "participants.tsv", sep="\t", index=False)
    return table, volumes


def assert_store_matches(store, table: pd.DataFrame, volumes: dict, target: str, factor: int = 1) -> None:
    assert store.grid == target
    assert store.splits == [s for s in SPLIT_SIZES if (table["split"] == s).any()]
    for split in store.splits:
        arr = store.array(split)
        part = store.table(split)
        assert arr.dtype == np.float16 and arr.shape == (len(part), 1, *grid_shape(target))
        assert not arr.flags.writeable
        for _, rec in part.iterrows():
            src = table[table["participant_id"] == rec["participant_id"]].iloc[0]
            expected = block_average(volumes[rec["participant_id"]], factor)
            np.testing.assert_allclose(arr[rec["row"], 0], expected, rtol=1e-3, atol=1e-3)
            assert rec["age"] == pytest.approx(src["age"])
            assert rec["site"] == str(src["siteXacq"]) and rec["site_raw"] == str(src["site"])
            assert rec["split"] == src["split"] == split
            assert rec["sex"] == src["sex"] and rec["study"] == src["study"]
            assert Path(rec["source_path"]).name == f"sub-{rec['participant_id']}{SUFFIX}"


def test_round_trip_and_store_contract(tmp_path):
    table, volumes = write_cohort(tmp_path / "src")
    store = prepare(tmp_path / "src", layout="openbhb", out=tmp_path / "store", progress=False)
    assert_store_matches(store, table, volumes, "6mm")
    reopened = open_store(tmp_path / "store")
    manifest = json.loads((tmp_path / "store" / MANIFEST).read_text())
    for key in ("format", "source", "layout", "modality", "grid", "shapes", "fingerprint", "version", "created"):
        assert key in manifest
    assert manifest["shapes"]["train"] == [4, 1, 31, 37, 31]
    assert reopened.site_labels == ["10", "11", "12"]
    assert list(reopened.participants.columns[:8]) == [
        "participant_id",
        "age",
        "sex",
        "site",
        "site_raw",
        "split",
        "row",
        "source_path",
    ]
    assert reopened.participants["age"].dtype == np.float64
    assert not (tmp_path / "store" / "skipped.tsv").exists()
    # the arrays are plain .npy files readable by numpy's own memmap
    assert np.load(tmp_path / "store" / "train.npy", mmap_mode="r").shape == (4, 1, 31, 37, 31)


@pytest.mark.parametrize("dtype,lead", [(np.float32, ()), (np.float16, (1,)), (np.float64, (1, 1, 1))])
def test_any_float_dtype_and_leading_axes_and_block_averaging(tmp_path, dtype, lead):
    table, volumes = write_cohort(tmp_path / "src", grid="3mm", dtype=dtype, lead=lead)
    store = prepare(tmp_path / "src", layout="openbhb", out=tmp_path / "store", grid="6mm", progress=False)
    assert_store_matches(store, table, volumes, "6mm", factor=2)
    assert store.manifest["source_grids"] == ["3mm"]


def test_grid_no_op_and_coarser_source_refused(tmp_path):
    table, volumes = write_cohort(tmp_path / "src")
    store = prepare(tmp_path / "src", layout="openbhb", out=tmp_path / "s1", grid="6mm", progress=False)
    assert_store_matches(store, table, volumes, "6mm")
    with pytest.raises(DataError, match=r"participant '1000' .*sub-1000.*coarser than the target grid 3mm"):
        prepare(tmp_path / "src", layout="openbhb", out=tmp_path / "s2", grid="3mm", progress=False)
    assert not (tmp_path / "s2" / MANIFEST).exists()


def test_unchanged_source_is_a_no_op_and_a_change_redoes(tmp_path):
    table, volumes = write_cohort(tmp_path / "src")
    out = tmp_path / "store"
    first = prepare(tmp_path / "src", layout="openbhb", out=out, progress=False)
    stamp = (out / MANIFEST).stat().st_mtime_ns, (out / "train.npy").stat().st_mtime_ns
    again = prepare(tmp_path / "src", layout="openbhb", out=out, progress=False)
    assert again.fingerprint == first.fingerprint
    assert ((out / MANIFEST).stat().st_mtime_ns, (out / "train.npy").stat().st_mtime_ns) == stamp
    # change one file's content (size and mtime differ): the store is rebuilt with the new data
    path = subject_file(tmp_path / "src", "1001", "train")
    new = np.full(grid_shape("6mm"), 0.25, dtype=np.float32)
    np.save(path, new)
    os.utime(path, ns=(stamp[0] + 10**9, stamp[0] + 10**9))
    redone = prepare(tmp_path / "src", layout="openbhb", out=out, progress=False)
    assert redone.fingerprint != first.fingerprint
    row = redone.table("train").set_index("participant_id").at["1001", "row"]
    np.testing.assert_array_equal(redone.array("train")[row, 0], new.astype(np.float16))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_INPUTS = {
    # name: (mutation(root, table) -> table or None, participant id in message, regex for the reason)
    "truncated": (lambda r, t: _truncate(subject_file(r, "1002", "train")), "1002", r"unreadable or truncated"),
    "garbage": (lambda r, t: subject_file(r, "1002", "train").write_bytes(b"not an npy"), "1002", r"unreadable"),
    "wrong_shape": (
        lambda r, t: np.save(subject_file(r, "1005", "internal_test"), np.zeros((1, 30, 37, 31))),
        "1005",
        r"shape \(1, 30, 37, 31\); expected",
    ),
    "int_dtype": (
        lambda r, t: np.save(subject_file(r, "1001", "train"), np.zeros((31, 37, 31), dtype=np.int16)),
        "1001",
        r"dtype int16; expected a floating-point",
    ),
    "non_finite": (
        lambda r, t: np.save(subject_file(r, "1006", "external_test"), np.full((1, 1, 31, 37, 31), np.nan)),
        "1006",
        r"non-finite voxel",
    ),
    "float16_overflow": (
        lambda r, t: np.save(subject_file(r, "1003", "train"), np.full((31, 37, 31), 1e6)),
        "1003",
        r"overflows float16",
    ),
    "missing_age": (
        lambda r, t: t.assign(age=t["age"].where(t["participant_id"] != "1004")),
        "1004",
        r"age is missing",
    ),
    "nan_age": (
        lambda r, t: t.assign(age=t["age"].astype(object).where(t["participant_id"] != "1004", "NaN")),
        "1004",
        r"age is missing",
    ),
    "text_age": (
        lambda r, t: t.assign(age=t["age"].astype(object).where(t["participant_id"] != "1004", "old")),
        "1004",
        r"age 'old' is not a finite number",
    ),
    "age_out_of_range": (
        lambda r, t: t.assign(age=t["age"].where(t["participant_id"] != "1007", 250.0)),
        "1007",
        r"age 250 is out of range",
    ),
    "negative_age": (
        lambda r, t: t.assign(age=t["age"].where(t["participant_id"] != "1000", -3.0)),
        "1000",
        r"age -3 is out of range",
    ),
    "duplicate_id": (
        lambda r, t: t.assign(participant_id=t["participant_id"].replace("1003", "1002")),
        "1002",
        r"duplicate participant_id \(table rows 2, 3\)",
    ),
    "unknown_split": (
        lambda r, t: t.assign(split=t["split"].where(t["participant_id"] != "1005", "validation")),
        "1005",
        r"unknown split 'validation'",
    ),
    "row_without_file": (
        lambda r, t: subject_file(r, "1006", "external_test").unlink(),
        "1006",
        r"no file for this row",
    ),
    "file_without_row": (lambda r, t: t[t["participant_id"] != "1007"], "1007", r"file has no row in participants.tsv"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_each_bad_input_is_one_error_naming_the_culprit(tmp_path, case):
    mutate, pid, reason = BAD_INPUTS[case]
    root = tmp_path / "src"
    table, _ = write_cohort(root)
    new_table = mutate(root, table)
    if isinstance(new_table, pd.DataFrame):
        new_table.to_csv(root / "participants.tsv", sep="\t", index=False)
    out = tmp_path / "store"
    with pytest.raises(DataError) as info:
        prepare(root, layout="openbhb", out=out, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert f"participant '{pid}'" in message, message
    assert f"sub-{pid}" in message, message  # the file
    assert "expected" in message
    import re

    assert re.search(reason, message), message
    with pytest.raises(StoreError, match="incomplete store|no prepared store"):
        open_store(out)
    assert not (out / MANIFEST).exists()
    assert not list(out.glob(".tmp-*")) if out.exists() else True

    # --on-error skip: the culprit is left out and listed, the others are prepared
    store = prepare(root, layout="openbhb", out=out, on_error="skip", progress=False)
    skipped = pd.read_csv(out / "skipped.tsv", sep="\t", dtype=str)
    assert pid in set(skipped["participant_id"])
    assert re.search(reason, " ".join(skipped["reason"]))
    assert pid not in set(store.participants["participant_id"])
    assert store.manifest["skipped"] == len(skipped)
    assert sum(store.manifest["shapes"][s][0] for s in store.splits) + len(skipped) >= 7


def test_cli_exit_codes_and_one_line_error(tmp_path, capsys):
    root = tmp_path / "src"
    write_cohort(root)
    assert data_main(["prepare", str(root), "--layout", "openbhb", "--out", str(tmp_path / "ok"), "--no-progress"]) == 0
    open_store(tmp_path / "ok")
    _truncate(subject_file(root, "1001", "train"))
    capsys.readouterr()
    code = data_main(["prepare", str(root), "--out", str(tmp_path / "bad"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "participant '1001'" in err[0] and "sub-1001" in err[0]


def test_bad_options_are_config_errors(tmp_path):
    write_cohort(tmp_path / "src")
    with pytest.raises(ConfigError, match="on_error: 'ignore'"):
        prepare(tmp_path / "src", layout="openbhb", out=tmp_path / "s", on_error="ignore")
    with pytest.raises(ConfigError, match="layout: 'bids'"):
        prepare(tmp_path / "src", layout="bids", out=tmp_path / "s")
    with pytest.raises(ConfigError, match="grid: '2mm'"):
        prepare(tmp_path / "src", layout="openbhb", out=tmp_path / "s", grid="2mm")
    with pytest.raises(DataError, match="no participants table"):
        prepare(tmp_path / "src" / "train", layout="openbhb", out=tmp_path / "s")


def test_killed_mid_write_keeps_the_old_store_intact(tmp_path, monkeypatch):
    table, volumes = write_cohort(tmp_path / "src")
    out = tmp_path / "store"
    old = prepare(tmp_path / "src", layout="openbhb", out=out, progress=False)  # an older complete store
    old_train = np.array(old.array("train"))
    np.save(subject_file(tmp_path / "src", "1000", "train"), volumes["1000"][None] * 0.5)  # source changed
    calls = {"n": 0}
    real_append = StoreWriter.append

    def dying_append(self, split, volume):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_append(self, split, volume)

    monkeypatch.setattr(StoreWriter, "append", dying_append)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "src", layout="openbhb", out=out, progress=False)
    kept = open_store(out)  # the old store is still there, complete and unchanged
    assert kept.fingerprint == old.fingerprint
    np.testing.assert_array_equal(np.array(kept.array("train")), old_train)
    assert not list(tmp_path.glob(".store.tmp-*"))  # the build folder is gone
    monkeypatch.setattr(StoreWriter, "append", real_append)
    volumes["1000"] = volumes["1000"] * 0.5
    store = prepare(tmp_path / "src", layout="openbhb", out=out, progress=False)
    assert_store_matches(store, table, volumes, "6mm")


def test_leftovers_of_a_killed_process_are_detected_and_redone(tmp_path):
    table, volumes = write_cohort(tmp_path / "src")
    out = tmp_path / "store"
    out.mkdir()
    # what a SIGKILL leaves: a build folder beside the store (and, from the former in-place writer,
    # temporary files inside it)
    (tmp_path / ".store.tmp-99999").mkdir()
    (tmp_path / ".store.tmp-99999" / "train.npy").write_bytes(b"\x93NUMPY partial")
    (out / ".tmp-internal_test.npy").write_bytes(b"partial")
    with pytest.raises(StoreError, match="incomplete store"):
        open_store(out)
    store = prepare(tmp_path / "src", layout="openbhb", out=out, progress=False)
    assert_store_matches(store, table, volumes, "6mm")
    assert not list(out.glob(".tmp-*")) and not list(tmp_path.glob(".store.tmp-*"))


def test_manifest_shape_mismatch_is_a_store_error(tmp_path):
    write_cohort(tmp_path / "src")
    out = tmp_path / "store"
    prepare(tmp_path / "src", layout="openbhb", out=out, progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["shapes"]["train"][0] = 5
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"train.npy: found float16 \(4, 1, 31, 37, 31\); expected float16 \(5,"):
        open_store(out).array("train")


def test_no_split_column_puts_everything_in_train(tmp_path):
    root = tmp_path / "src"
    table, volumes = write_cohort(root)
    # move every subject under train/ and drop the split column
    for pid, split in zip(table["participant_id"], table["split"]):
        src = subject_file(root, pid, split)
        dst = subject_file(root, pid, "train")
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
    table.drop(columns=["split"]).to_csv(root / "participants.tsv", sep="\t", index=False)
    store = prepare(root, layout="openbhb", out=tmp_path / "store", progress=False)
    assert store.splits == ["train"] and store.manifest["shapes"]["train"][0] == 8


def test_quasiraw_modality_keeps_its_own_grid(tmp_path):
    root = tmp_path / "src"
    rng = np.random.default_rng(0)
    rows = []
    for k, split in enumerate(["train", "external_test"]):
        pid = f"q{k}"
        folder = "train" if split == "train" else "val"
        path = root / folder / "derivatives" / f"sub-{pid}" / "ses-1" / f"sub-{pid}_preproc-quasiraw_T1w.npy"
        path.parent.mkdir(parents=True)
        np.save(path, rng.random((1, 1, 182, 218, 182), dtype=np.float32).astype(np.float16))
        rows.append({"participant_id": pid, "age": 20.0 + k, "site": "s", "split": split})
    pd.DataFrame(rows).to_csv(root / "participants.tsv", sep="\t", index=False)
    store = prepare(root, layout="openbhb", modality="quasiraw", out=tmp_path / "store", progress=False)
    assert store.grid == "quasiraw" and store.manifest["shapes"]["external_test"] == [1, 1, 182, 218, 182]
    np.testing.assert_array_equal(
        store.array("train")[0],
        np.load(
            path.parents[3].parent / "train" / "derivatives" / "sub-q0" / "ses-1" / "sub-q0_preproc-quasiraw_T1w.npy"
        )[0],
    )
    with pytest.raises(ConfigError, match="does not apply to modality 'quasiraw'"):
        prepare(root, layout="openbhb", modality="quasiraw", grid="3mm", out=tmp_path / "s2")
    # the VBM files are absent: every row lacks its file
    with pytest.raises(DataError, match=r"participant 'q0' .*sub-q0_preproc-cat12vbm_desc-gm_T1w.npy\): no file"):
        prepare(root, layout="openbhb", out=tmp_path / "s3", progress=False)


def test_require_age_false_accepts_unknown_ages_and_the_default_still_refuses(tmp_path):
    root = tmp_path / "src"
    table, volumes = write_cohort(root)
    with_gaps = table.assign(age=table["age"].where(~table["participant_id"].isin(["1001", "1006"])))
    with_gaps.to_csv(root / "participants.tsv", sep="\t", index=False)
    with pytest.raises(DataError) as default:  # default unchanged: same one-line message as before
        prepare(root, layout="openbhb", out=tmp_path / "refused", progress=False)
    assert str(default.value).startswith("participant '1001' (file ") and "age is missing (empty or NaN)" in str(
        default.value
    )

    store = prepare(root, layout="openbhb", out=tmp_path / "gaps", progress=False, require_age=False)
    assert store.manifest["require_age"] is False and store.manifest["options"]["require_age"] is False
    got = store.participants.set_index("participant_id")["age"]
    assert got.dtype == np.float64 and len(got) == len(table)
    assert set(got.index[got.isna()]) == {"1001", "1006"}
    known = table.set_index("participant_id")["age"].drop(["1001", "1006"])
    np.testing.assert_array_equal(got.loc[known.index].to_numpy(), known.to_numpy())
    row = store.table("train").set_index("participant_id").at["1001", "row"]
    np.testing.assert_allclose(store.array("train")[row, 0], volumes["1001"].astype(np.float16), atol=0)

    # no age column at all: refused by default (same message as before), accepted with require_age=False
    table.drop(columns="age").to_csv(root / "participants.tsv", sep="\t", index=False)
    no_column = r"participants.tsv: missing column\(s\) age; expected at least participant_id, age"
    with pytest.raises(DataError, match=no_column):
        prepare(root, layout="openbhb", out=tmp_path / "refused", progress=False)
    store = prepare(root, layout="openbhb", out=tmp_path / "no_age", progress=False, require_age=False)
    assert store.participants["age"].isna().all() and len(store.participants) == len(table)

    # given ages are still checked with require_age=False
    for bad, reason in (("old", r"age 'old' is not a finite number"), (250.0, r"age 250 is out of range")):
        table.assign(age=table["age"].astype(object).where(table["participant_id"] != "1004", bad)).to_csv(
            root / "participants.tsv", sep="\t", index=False
        )
        with pytest.raises(DataError, match=rf"participant '1004'.*{reason}"):
            prepare(root, layout="openbhb", out=tmp_path / "bad", progress=False, require_age=False)


def test_default_fingerprint_does_not_record_require_age(tmp_path):
    root = tmp_path / "src"
    write_cohort(root)
    store = prepare(root, layout="openbhb", out=tmp_path / "store", progress=False)
    assert "require_age" not in store.manifest["options"] and store.manifest["require_age"] is True
    # the same source prepared with require_age=False is another preparation (another fingerprint)
    other = prepare(root, layout="openbhb", out=tmp_path / "store", progress=False, require_age=False)
    assert other.fingerprint != store.fingerprint and other.manifest["require_age"] is False
