"""prepare never destroys or leaks data (issue 12, cases 1-3, 7 and 9): the source and an existing
store survive every failure, --out must be a store folder, test rows never reach train, bad volumes
and tables are refused with one line."""

from __future__ import annotations

import os

import numpy as np
import pytest

from brainage_core.data import open_store, prepare
from brainage_core.data.__main__ import main as data_main
from brainage_core.errors import DataError, StoreError
from tests.test_data_openbhb import subject_file, write_cohort
from tests.test_data_ramp import write_ramp


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_equal_to_the_ramp_source_is_refused_and_the_source_kept(tmp_path, capsys):
    """Case 1: `prepare SRC --layout ramp --out SRC` used to replace SRC/train.npy with the store's."""
    mask, _, _, _ = write_ramp(tmp_path / "src")
    before = _snapshot(tmp_path / "src")
    code = data_main(["prepare", str(tmp_path / "src"), "--layout", "ramp", "--mask", str(mask),
                      "--out", str(tmp_path / "src"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "is or contains the source" in err[0]
    assert _snapshot(tmp_path / "src") == before


@pytest.mark.parametrize("name", ["train.npy", "participants.parquet", "notes.txt"])
def test_out_holding_user_files_is_refused(tmp_path, name):
    """Case 1: any user file in --out (even named like a store file) is never overwritten."""
    write_cohort(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"user data")
    with pytest.raises(StoreError, match=rf"--out .*holds no prepared store \(no manifest.json\): {name}"):
        prepare(tmp_path / "src", layout="openbhb", out=out, progress=False)
    assert (out / name).read_bytes() == b"user data" and sorted(os.listdir(out)) == [name]


def test_store_with_extra_user_file_is_refused(tmp_path):
    write_cohort(tmp_path / "src")
    out = tmp_path / "store"
    prepare(tmp_path / "src", layout="openbhb", out=out, progress=False)
    (out / "my_notes.txt").write_text("keep me")
    np.save(subject_file(tmp_path / "src", "1000", "train"), np.ones((1, 1, 31, 37, 31)))  # source changed
    with pytest.raises(StoreError, match="holds a store plus other files: my_notes.txt"):
        prepare(tmp_path / "src", layout="openbhb", out=out, progress=False)
    assert (out / "my_notes.txt").read_text() == "keep me"


def test_a_bad_new_source_leaves_the_existing_store_intact(tmp_path):
    """Case 2: a truncated volume in the new source used to leave only `.lock` in --out."""
    write_cohort(tmp_path / "a")
    out = tmp_path / "store"
    prepare(tmp_path / "a", layout="openbhb", out=out, progress=False)
    before = _snapshot(out)
    write_cohort(tmp_path / "b", seed=1)
    victim = subject_file(tmp_path / "b", "1005", "internal_test")
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(DataError, match="participant '1005'"):
        prepare(tmp_path / "b", layout="openbhb", out=out, progress=False)
    assert _snapshot(out) == before
    open_store(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".store.lock", "a", "b", "store"]


def test_a_valid_new_source_replaces_the_store_with_a_warning(tmp_path, caplog):
    """Case 2: the replacement is said, naming the store replaced."""
    write_cohort(tmp_path / "a")
    out = tmp_path / "store"
    old = prepare(tmp_path / "a", layout="openbhb", out=out, progress=False)
    write_cohort(tmp_path / "b", seed=1)
    with caplog.at_level("WARNING"):
        new = prepare(tmp_path / "b", layout="openbhb", out=out, progress=False)
    assert new.fingerprint != old.fingerprint and open_store(out).fingerprint == new.fingerprint
    assert f"replaced the store prepared {old.manifest['created']} from {tmp_path / 'a'}" in caplog.text


def test_out_containing_the_source_is_refused(tmp_path):
    write_cohort(tmp_path / "data" / "src")
    with pytest.raises(StoreError, match="is or contains the source"):
        prepare(tmp_path / "data" / "src", layout="openbhb", out=tmp_path / "data", progress=False)


def test_read_only_parent_is_one_line(tmp_path, capsys):
    """Case 7: a read-only --out used to end in a PermissionError traceback."""
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    write_cohort(tmp_path / "src")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code = data_main(["prepare", str(tmp_path / "src"), "--out", str(parent / "store"), "--no-progress"])
    finally:
        parent.chmod(0o755)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and str(parent / "store") in err[0]


def test_read_only_out_is_one_line_even_as_root(tmp_path, capsys, monkeypatch):
    """Case 7, whatever the user: an OSError while writing becomes one StoreError line."""
    from brainage_core.data import store as store_module

    write_cohort(tmp_path / "src")

    monkeypatch.setattr(store_module.StoreWriter, "_tmp", lambda self, name: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", str(self.build / name))))
    code = data_main(["prepare", str(tmp_path / "src"), "--out", str(tmp_path / "store"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "Permission denied" in err[0] and "store" in err[0]
    assert not (tmp_path / "store").exists()


def test_ramp_test_row_with_split_train_is_refused(tmp_path):
    """Case 3: a test.tsv row whose split is `train` used to land in the training split."""
    mask, tables, _, _ = write_ramp(tmp_path / "src")
    test = tables["test"].copy()
    test.loc[0, "split"] = "train"
    test.to_csv(tmp_path / "src" / "test.tsv", sep="\t", index=False)
    pid = test.loc[0, "participant_id"]
    with pytest.raises(DataError, match=rf"participant '{pid}'.*split 'train' in test.tsv: a test row cannot"):
        prepare(tmp_path / "src", layout="ramp", mask=mask, out=tmp_path / "store", progress=False)
    store = prepare(tmp_path / "src", layout="ramp", mask=mask, out=tmp_path / "store", progress=False,
                    on_error="skip")
    assert pid not in set(store.table("train")["participant_id"])
    assert len(store.table("train")) == len(tables["train"])


def test_all_zero_volume_is_refused(tmp_path):
    """Case 9: an all-zero volume used to be accepted without a word."""
    write_cohort(tmp_path / "src")
    np.save(subject_file(tmp_path / "src", "1001", "train"), np.zeros((1, 1, 31, 37, 31)))
    with pytest.raises(DataError, match="participant '1001'.*every voxel is 0"):
        prepare(tmp_path / "src", layout="openbhb", out=tmp_path / "store", progress=False)


def test_table_without_site_needs_the_flag(tmp_path, capsys, caplog):
    """Case 9: without `site` every subject became site "unknown" silently."""
    table, _ = write_cohort(tmp_path / "src")
    table.drop(columns=["site", "siteXacq"]).to_csv(tmp_path / "src" / "participants.tsv", sep="\t", index=False)
    code = data_main(["prepare", str(tmp_path / "src"), "--out", str(tmp_path / "store"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "gives no site" in err[0] and "--allow-missing-site" in err[0]
    assert not (tmp_path / "store").exists()
    with caplog.at_level("WARNING"):
        code = data_main(["prepare", str(tmp_path / "src"), "--out", str(tmp_path / "store"), "--no-progress",
                          "--allow-missing-site"])
    assert code == 0 and "every subject is site 'unknown'" in caplog.text
    assert set(open_store(tmp_path / "store").participants["site"]) == {"unknown"}


def test_abbreviated_options_are_refused(tmp_path, capsys):
    """Case 9: argparse took `--no-prog` for `--no-progress` (and `--resum` for `--resume`)."""
    write_cohort(tmp_path / "src")
    with pytest.raises(SystemExit) as exc:
        data_main(["prepare", str(tmp_path / "src"), "--out", str(tmp_path / "s"), "--no-prog"])
    assert exc.value.code == 2 and "unrecognized arguments: --no-prog" in capsys.readouterr().err
    from study.run import _parse_args

    with pytest.raises(SystemExit):
        _parse_args(["space.yaml", "--resum"])
    assert "--resum" in capsys.readouterr().err


def test_ramp_rows_site_column_is_the_challenge_label():
    """Case 5: the kit's problem.py reads `site` as the 64-class label; the raw code (up to 65) crashed it."""
    import pandas as pd

    from brainage_core.data.ramp_rows import _kit_table
    from brainage_core.data.tables import normalise_table

    store_rows = pd.DataFrame({"participant_id": ["a", "b"], "age": [20.0, 30.0], "sex": ["F", "M"],
                               "site": ["3", "63"], "site_raw": ["65", "7"], "split": ["train", "train"],
                               "row": [0, 1], "source_path": ["x", "y"]})
    kit = _kit_table(store_rows)
    assert kit["site"].tolist() == ["3", "63"] and kit["siteXacq"].tolist() == ["3", "63"]
    assert kit["site_raw"].tolist() == ["65", "7"]
    back = normalise_table(kit)  # what prepare --layout ramp reads from it
    assert back["site"].tolist() == ["3", "63"] and back["site_raw"].tolist() == ["65", "7"]
    bad = store_rows.assign(site=["S0", "3"])
    with pytest.raises(StoreError, match="participant 'a' has site label 'S0'; expected .* integer 0-63"):
        _kit_table(bad)


def test_out_as_a_symlink_replaces_the_target_folder(tmp_path):
    write_cohort(tmp_path / "a")
    prepare(tmp_path / "a", layout="openbhb", out=tmp_path / "real", progress=False)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    write_cohort(tmp_path / "b", seed=1)
    new = prepare(tmp_path / "b", layout="openbhb", out=tmp_path / "link", progress=False)
    assert (tmp_path / "link").is_symlink() and open_store(tmp_path / "real").fingerprint == new.fingerprint
