"""Participants tables: reading (tsv, csv, parquet), column checks and row validation.

A participants table has one row per subject and at least the columns ``participant_id`` and
``age`` (years; with ``require_age=False`` the age column may be absent or hold empty/NaN cells —
a cohort to predict, whose true ages are unknown). Optional: ``sex``, ``site``, ``siteXacq`` (the
challenge's site label), ``split`` (``train`` / ``internal_test`` / ``external_test``) and any other
column, which is carried into the prepared store unchanged.

:func:`normalise_table` turns a raw table into the store's columns (``participant_id``, ``age``,
``sex``, ``site``, ``site_raw``, ``split`` + the other source columns); :func:`row_problems` lists
every invalid row (missing/NaN/out-of-range age, duplicate id, unknown split) as :class:`Problem`
records, so that the caller can raise on the first one or skip them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from brainage_core.errors import DataError

#: Split names of a prepared store, in their canonical order.
SPLITS: tuple[str, ...] = ("train", "internal_test", "external_test")

#: Accepted spellings of split values in a source table (lower-cased) -> store split name.
SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "internal_test": "internal_test",
    "internal": "internal_test",
    "external_test": "external_test",
    "external": "external_test",
}

#: Plausible ages in years (inclusive); OpenBHB spans 6–88.
AGE_RANGE: tuple[float, float] = (0.0, 120.0)

REQUIRED_COLUMNS: tuple[str, ...] = ("participant_id", "age")
#: Required columns when ages may be unknown (``require_age=False``).
REQUIRED_COLUMNS_AGE_OPTIONAL: tuple[str, ...] = ("participant_id",)

#: Columns read as text whatever they hold (ids and labels must not become floats).
_TEXT_COLUMNS = ("participant_id", "site", "siteXacq", "sex", "split", "path")

TABLE_SUFFIXES: tuple[str, ...] = (".tsv", ".csv", ".parquet")


@dataclass(frozen=True)
class Problem:
    """One invalid subject: who, which file, and what was found versus expected."""

    participant_id: str
    file: str
    reason: str

    def message(self) -> str:
        """The one-line error message naming participant, file and the problem."""
        return f"participant {self.participant_id!r} (file {self.file}): {self.reason}"


def find_table(folder: Path, stem: str = "participants") -> Path:
    """Return ``folder/<stem>.{tsv,csv,parquet}`` (the first that exists); DataError if none does."""
    for suffix in TABLE_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{folder}: no participants table found; expected one of " + ", ".join(f"{stem}{s}" for s in TABLE_SUFFIXES)
    )


def _label(value: object) -> str:
    """Text form of a label cell: integral floats lose their '.0', missing values become ''."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def read_table(path: str | Path, *, require_age: bool = True) -> pd.DataFrame:
    """Read a participants table (``.tsv``, ``.csv`` or ``.parquet``) and check its columns.

    Id and label columns (participant_id, site, siteXacq, sex, split, path) come back as text.
    Raises DataError naming the file when it is unreadable, has an unknown suffix or lacks a
    required column (:data:`REQUIRED_COLUMNS`; only ``participant_id`` when ``require_age`` is False).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".tsv":
            table = pd.read_csv(path, sep="\t", dtype={c: str for c in _TEXT_COLUMNS}, keep_default_na=True)
        elif suffix == ".csv":
            table = pd.read_csv(path, dtype={c: str for c in _TEXT_COLUMNS})
        elif suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            raise DataError(f"{path}: unknown table format {suffix!r}; expected .tsv, .csv or .parquet")
    except DataError:
        raise
    except Exception as exc:  # pandas/pyarrow raise many types; report them all the same way
        why = " ".join(str(exc).split())[:160]
        raise DataError(
            f"{path}: unreadable participants table ({type(exc).__name__}: {why}); expected tsv/csv/parquet"
        ) from exc
    required = REQUIRED_COLUMNS if require_age else REQUIRED_COLUMNS_AGE_OPTIONAL
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; expected at least "
            f"{', '.join(required)} (found: {', '.join(map(str, table.columns))})"
        )
    for column in _TEXT_COLUMNS:
        if column in table.columns:
            table[column] = table[column].map(_label).astype(object)
    return table.reset_index(drop=True)


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def normalise_table(table: pd.DataFrame, *, default_split: str | None = "train") -> pd.DataFrame:
    """Return the store's view of a source table.

    Columns: ``participant_id`` (str), ``age`` (float64, NaN where not a number), ``sex`` (str),
    ``site`` (str: ``siteXacq`` where the source has it, else ``site``, else ``"unknown"``),
    ``site_raw`` (the source's ``site_raw`` where it has one, as ``ramp-rows`` writes, else its ``site``),
    ``split`` (as written in the source, lower-cased; or
    ``default_split`` when the column is absent) and ``age_raw`` (the original cell, for messages),
    followed by every other source column. A table without an ``age`` column (read with
    ``require_age=False``) gets NaN ages. Nothing is validated here (see :func:`row_problems`).
    """
    out = pd.DataFrame(index=table.index)
    out["participant_id"] = table["participant_id"].astype(object)
    raw_age = table["age"] if "age" in table.columns else pd.Series(np.nan, index=table.index)
    out["age_raw"] = raw_age.astype(object)
    out["age"] = pd.to_numeric(raw_age, errors="coerce").astype("float64")
    out["sex"] = table["sex"].astype(object) if "sex" in table.columns else ""
    raw_site = table["site"].astype(object) if "site" in table.columns else pd.Series("", index=table.index)
    if "site_raw" in table.columns:  # a table written by ramp-rows: site is the challenge label there
        raw_site = table["site_raw"].map(_label).astype(object)
    if "siteXacq" in table.columns:
        site = table["siteXacq"].astype(object).where(table["siteXacq"] != "", raw_site)
    else:
        site = raw_site
    out["site"] = site.where(site != "", "unknown")
    out["site_raw"] = raw_site
    if "split" in table.columns:
        out["split"] = table["split"].astype(str).str.strip().str.lower()
    else:
        out["split"] = default_split
    reserved = set(out.columns) | {"row", "source_path"}
    for column in table.columns:
        if column not in reserved and column not in ("age",):
            out[column] = table[column]
    return out


def row_problems(table: pd.DataFrame, files: pd.Series, *, require_age: bool = True) -> dict[int, Problem]:
    """Validate the rows of a normalised table; return ``{row index: Problem}`` for invalid rows.

    ``files`` gives, per row, the source file named in messages. Checks: participant id present,
    age present (unless ``require_age`` is False: an empty/NaN age is then accepted and stays NaN) /
    a number / finite / within :data:`AGE_RANGE` (always, for ages that are given), split value known
    (:data:`SPLIT_ALIASES`; the table is updated in place to the canonical split names), participant
    id unique (every occurrence of a duplicated id is a problem).
    """
    problems: dict[int, Problem] = {}
    lo, hi = AGE_RANGE
    counts = table["participant_id"].value_counts()
    for i in table.index:
        pid = str(table.at[i, "participant_id"])
        file = str(files.at[i])
        age, raw = table.at[i, "age"], table.at[i, "age_raw"]
        given = _label(raw) != ""  # an unknown age (empty/NaN) stays NaN when not require_age
        split = str(table.at[i, "split"])
        if pid == "":
            reason = f"row {i} has no participant_id; expected a non-empty id"
        elif counts.get(pid, 0) > 1:
            rows = ", ".join(str(r) for r in table.index[table["participant_id"] == pid])
            reason = f"duplicate participant_id (table rows {rows}); expected each id once"
        elif not given and require_age:
            reason = f"age is missing (empty or NaN); expected a number of years in [{lo:g}, {hi:g}]"
        elif given and not np.isfinite(age):
            reason = f"age {raw!r} is not a finite number; expected years in [{lo:g}, {hi:g}]"
        elif given and not lo <= age <= hi:
            reason = f"age {age:g} is out of range; expected years in [{lo:g}, {hi:g}]"
        elif split not in SPLIT_ALIASES:
            reason = f"unknown split {split!r}; expected one of {', '.join(SPLITS)}"
        else:
            table.at[i, "split"] = SPLIT_ALIASES[split]
            continue
        problems[i] = Problem(pid, file, reason)
    return problems
