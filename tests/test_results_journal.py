"""The journal of ``results.parquet`` (study.results): every change appended at once, the table rewritten
at most every ``compact_every_s``; what a killed driver leaves is read back whole, by every reader."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from brainage_core.errors import DataError
from study.results import ResultsTable, journal_path, read_results

KEYS = ["loss.temperature"]


def table(path, *, resume=False, every=3600.0, on_write=None):
    return ResultsTable(path, param_keys=KEYS, static={"git_commit": "abc"}, resume=resume,
                        compact_every_s=every, on_write=on_write)


def fill(t):
    t.add("t1", {"loss.temperature": 0.1}, {"epoch": 1, "val_mae_ext": np.float32(5.5), "wall_s": 2.0}, seed=0)
    t.set_checkpoint("t1", "/ckpt/1")
    t.add("t1", {"loss.temperature": 0.1}, {"epoch": 2, "val_mae_ext": 4.0, "wall_s": 4.0}, seed=0)
    t.set_status("t1", "completed")
    t.add("t2", {"loss.temperature": 0.3}, {"epoch": 1, "val_mae_ext": float("nan"), "wall_s": 2.0}, seed=1)


def test_changes_go_to_the_journal_and_a_killed_driver_loses_none(tmp_path):
    path = tmp_path / "results.parquet"
    written = []
    t = table(path, on_write=written.append)
    fill(t)
    expected = t.frame()
    # between two rewrites: no table yet, one journal line per change, each published as it is written
    assert not path.exists() and len(journal_path(path).read_text().splitlines()) == 5
    assert written == ["results.journal.jsonl"] * 5
    # the driver dies here: every reader gets every row, statuses and checkpoint paths included
    got = read_results(path)
    pd.testing.assert_frame_equal(got, expected)
    assert got["status"].tolist() == ["completed", "completed", "running"]
    assert got["checkpoint_path"].iloc[0] == "/ckpt/1" and got["checkpoint_path"].iloc[1:].isna().all()
    assert got["val_mae_ext"].iloc[0] == pytest.approx(5.5) and np.isnan(got["val_mae_ext"].iloc[2])
    # the resumed driver folds the journal into the table first
    again = table(path, resume=True)
    assert len(again) == 3 and journal_path(path).read_text() == ""
    pd.testing.assert_frame_equal(pd.read_parquet(path), expected)


def test_rewrite_every_interval_and_at_flush(tmp_path):
    path = tmp_path / "results.parquet"
    t = table(path, every=0.0)  # 0: every change rewrites the table, the journal stays empty
    fill(t)
    assert len(pd.read_parquet(path)) == 3 and journal_path(path).read_text() == ""
    path2 = tmp_path / "b" / "results.parquet"
    t2 = table(path2)
    fill(t2)
    t2.flush()
    pd.testing.assert_frame_equal(pd.read_parquet(path2), t2.frame())
    assert journal_path(path2).read_text() == "" and not t2.pending


def test_a_crash_between_rewrite_and_emptying_replays_to_the_same_rows(tmp_path):
    path = tmp_path / "results.parquet"
    t = table(path)
    fill(t)
    lines = journal_path(path).read_text()
    t.flush()
    journal_path(path).write_text(lines)  # the table holds them already: replaying them again changes nothing
    pd.testing.assert_frame_equal(read_results(path), t.frame())


def test_a_torn_last_line_is_dropped_and_a_bad_line_is_named(tmp_path):
    path = tmp_path / "results.parquet"
    fill(table(path))
    journal = journal_path(path)
    text = journal.read_text()
    journal.write_text(text + '{"op": "row", "row": {"trial_id": "t3", "ep')  # died mid-append
    assert sorted(read_results(path)["trial_id"].unique()) == ["t1", "t2"]
    lines = text.splitlines()
    lines[1] = "not json"
    journal.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"results\.journal\.jsonl, line 2: not a results-journal operation"):
        read_results(path)
    lines[1] = json.dumps({"op": "rename", "trial_id": "t1"})
    journal.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 2"):
        table(path, resume=True)


def test_missing_empty_and_foreign_tables_are_one_clear_error(tmp_path):
    path = tmp_path / "results.parquet"
    with pytest.raises(DataError, match="results.parquet not found"):
        read_results(path)
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="results.parquet is not a readable parquet table"):
        read_results(path)
    pd.DataFrame({"x": [1]}).to_parquet(path)
    with pytest.raises(DataError, match=r"lacks the column\(s\) trial_id, epoch"):
        read_results(path)
    path.unlink()
    journal_path(path).write_text("")
    with pytest.raises(DataError, match="holds no row"):
        read_results(path)


def test_a_new_table_refuses_an_earlier_runs_journal(tmp_path):
    path = tmp_path / "results.parquet"
    fill(table(path))
    with pytest.raises(DataError, match="holds changes of an earlier run"):
        table(path, resume=False)
    assert len(read_results(path)) == 3  # and left it as it was
