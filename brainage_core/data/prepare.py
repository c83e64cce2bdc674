"""Validate a source cohort and write the prepared store (``python -m brainage_core.data prepare``).

:func:`prepare` reads one of the three layouts (``readers.py``), validates every table row before
anything is written (participant id, age, duplicate ids, split value, row without file, file
without row), then reads one volume at a time, validates it (readable, shape/grid, finite) and
appends it to its split's temporary array (a full cohort never sits in memory). The store becomes
complete only when ``manifest.json`` is written, last (``store.StoreWriter``).

With ``on_error="raise"`` (default) the first invalid subject stops everything with one
``DataError`` line naming the participant, the file and what was expected; with ``"skip"`` invalid
subjects are left out and listed in ``STORE/skipped.tsv``.

``require_age=False`` (a cohort to predict, true ages unknown): the table may lack the ``age`` column
and empty/NaN ages are accepted and stored as NaN; ages that are given are still checked (number,
range). The manifest then records ``"require_age": false`` and training/evaluation refuse the store
(``brainage_core.evaluation.Evaluator``).

Idempotence: the manifest records a fingerprint of the source (hash of the table(s), each file's
path, size and mtime, the RAMP mask's hash) and of the options; preparing the same source with the
same options again is a no-op.

Nothing is lost: the new store is built beside ``out`` and swapped in only once complete
(``store.StoreWriter``), so the source and an existing store in ``out`` are untouched by a failed or
interrupted preparation; a store of another source or options is replaced (with a warning naming it)
only then. ``out`` must be absent, empty or a prepared store: a folder holding anything else (the
source itself, user files) is refused, as is an ``out`` that contains the source or the mask.

A participants table without a ``site`` (or ``siteXacq``) value for any subject is refused: every
subject would be site "unknown" and the site probe meaningless. ``allow_missing_site=True``
(``--allow-missing-site``) accepts it and says so in a warning.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from brainage_core.data.readers import (
    LAYOUTS,
    MODALITIES,
    QUASIRAW_GRID,
    VolumeRejected,
    make_reader,
    standardise_volume,
)
from brainage_core.data.store import STORE_FORMAT, Store, StoreWriter, foreign_files, open_store, read_manifest
from brainage_core.data.tables import SPLITS, Problem, row_problems
from brainage_core.errors import BrainageError, ConfigError, DataError, StoreError
from brainage_core.grids import GRID_NAMES

log = logging.getLogger(__name__)

ON_ERROR: tuple[str, ...] = ("raise", "skip")

#: Leading columns of participants.parquet, in order; the source's other columns follow.
STORE_COLUMNS: tuple[str, ...] = ("participant_id", "age", "sex", "site", "site_raw", "split", "row", "source_path")
_INTERNAL_COLUMNS = ("age_raw", "_part", "_row")


def _fingerprint(source_parts: dict, options: dict) -> str:
    blob = json.dumps({"format": STORE_FORMAT, "options": options, "source": source_parts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _raise_first(problems: list[Problem]) -> None:
    first = problems[0].message()
    more = f" [+{len(problems) - 1} more problem(s); --on-error skip leaves them out]" if len(problems) > 1 else ""
    raise DataError(first + more)


def _check_out(source: Path, out: Path, mask: str | Path | None) -> None:
    """StoreError unless ``out`` may receive the store: absent, empty or a store, and not holding the
    source or the mask (the old folder is deleted once the new store is in place)."""
    src = source.resolve()
    src_dir = src if src.is_dir() else src.parent
    target = out.resolve()
    if target == src_dir or target in src_dir.parents:
        raise StoreError(f"--out {out}: is or contains the source {source}; expected a separate folder for the store")
    if mask is not None and target in Path(mask).resolve().parents:
        raise StoreError(f"--out {out}: contains the mask {mask}; expected a separate folder for the store")
    if out.exists() and not out.is_dir():
        raise StoreError(f"--out {out}: is a file; expected a folder (absent, empty or a prepared store)")
    if out.is_dir():
        try:
            foreign = foreign_files(out)
        except OSError as exc:
            raise StoreError(f"--out {out}: unreadable ({exc.strerror}); expected a writable folder") from exc
        if foreign:
            shown = ", ".join(foreign[:4]) + (f" (+{len(foreign) - 4} more)" if len(foreign) > 4 else "")
            what = "no prepared store (no manifest.json)" if read_manifest(out) is None else "a store plus other files"
            raise StoreError(
                f"--out {out}: holds {what}: {shown}; expected an absent or empty folder or a prepared store "
                "(nothing else is overwritten: choose another --out or move those files)"
            )


def prepare(
    source: str | Path,
    *,
    layout: str,
    out: str | Path,
    modality: str = "vbm",
    on_error: str = "raise",
    grid: str | None = None,
    mask: str | Path | None = None,
    resample: bool = False,
    progress: bool = True,
    require_age: bool = True,
    allow_missing_site: bool = False,
) -> Store:
    """Prepare ``source`` (a cohort in ``layout``) into the store folder ``out``; return the Store.

    ``grid``: target grid (``full``/``3mm``/``6mm``; None keeps the source grid, which every subject
    must then share); finer sources are block-averaged, coarser ones rejected. ``mask``: the RAMP
    layout's GM mask NIfTI. ``resample``: NIfTI layout, resample images on other grids by their
    affine (nilearn) instead of rejecting them. ``require_age``: False accepts a missing age column
    and empty/NaN ages (stored as NaN; for prediction only). ``allow_missing_site``: accept a table
    giving no site at all (every subject site "unknown"). Raises DataError (bad input), ConfigError
    (bad option) or StoreError (``out`` not a store folder, unwritable); on any error ``out`` and the
    source are as they were (see the module docstring).
    """
    _check_options(layout=layout, modality=modality, on_error=on_error, grid=grid)
    out = Path(out)
    _check_out(Path(source), out, mask)
    reader = make_reader(
        layout, source, modality=modality, mask=mask, resample=resample, target=grid, require_age=require_age
    )
    scan = reader.scan()
    options = {"layout": layout, "modality": modality, "grid": grid, "on_error": on_error, "resample": resample}
    if not require_age:  # only then, so that the fingerprints of stores prepared before the option hold
        options["require_age"] = False
    fingerprint = _fingerprint(scan.fingerprint, options)
    store = _up_to_date(out, fingerprint)
    if store is not None:
        return store

    # nothing is written before the table-level validation passes
    valid, skipped = _validate_table(source, scan, on_error=on_error, require_age=require_age,
                                     allow_missing_site=allow_missing_site)
    with StoreWriter(out) as writer:
        manifest = read_manifest(out)  # another process may have finished it while we waited
        if manifest is not None and manifest.get("fingerprint") == fingerprint:
            return open_store(out)
        _check_out(Path(source), out, mask)  # again under the lock: the folder may have changed meanwhile
        replaced = manifest
        kept, target, source_grids = _write_volumes(writer, reader, valid, skipped, grid=grid, modality=modality,
                                                    on_error=on_error, progress=progress,
                                                    desc=f"prepare {layout}")
        if not kept:
            detail = f"; first: {skipped[0].message()}" if skipped else ""
            raise DataError(f"{source}: no valid subject to prepare ({len(skipped)} skipped){detail}")
        skipped_table = pd.DataFrame(
            [(p.participant_id, p.file, p.reason) for p in skipped], columns=["participant_id", "file", "reason"]
        )
        store = writer.finish(
            _participants_table(valid, kept),
            {
                "source": str(Path(source).resolve()),
                "layout": layout,
                "modality": modality,
                "grid": target if target != QUASIRAW_GRID else QUASIRAW_GRID,
                "fingerprint": fingerprint,
                "source_grids": sorted(source_grids),
                "options": options,
                "skipped": len(skipped),
                "require_age": require_age,
            },
            skipped_table,
        )
    if replaced is not None:
        log.warning("%s: replaced the store prepared %s from %s (other source or options)", out,
                    replaced.get("created", "?"), replaced.get("source", "?"))
    if skipped:
        log.warning("%s: %d subject(s) skipped, listed in %s/skipped.tsv", out, len(skipped), out)
    return store


def _check_options(*, layout: str, modality: str, on_error: str, grid: str | None) -> None:
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error: {on_error!r}; expected one of {', '.join(ON_ERROR)}")
    if layout not in LAYOUTS:
        raise ConfigError(f"layout: {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if modality not in MODALITIES:
        raise ConfigError(f"modality: {modality!r}; expected one of {', '.join(MODALITIES)}")
    if grid is not None and grid not in GRID_NAMES:
        raise ConfigError(f"grid: {grid!r}; expected one of {', '.join(GRID_NAMES)} (or none: keep the source grid)")
    if modality == "quasiraw" and grid is not None:
        raise ConfigError(f"grid: {grid!r} does not apply to modality 'quasiraw' (its own 1 mm grid); expected none")


def _up_to_date(out: Path, fingerprint: str) -> Store | None:
    """The store in ``out`` when it was prepared from this source with these options and opens; else None
    (a damaged one is said and prepared again)."""
    manifest = read_manifest(out)
    if manifest is not None and manifest.get("fingerprint") == fingerprint:
        try:
            store = open_store(out)
            log.info("%s: store up to date (fingerprint %s), nothing to do", out, fingerprint[:12])
            return store
        except StoreError as exc:
            log.warning("%s: damaged store (%s); preparing again", out, exc)
    return None


def _validate_table(source: str | Path, scan: Any, *, on_error: str, require_age: bool,
                    allow_missing_site: bool) -> tuple[pd.DataFrame, list[Problem]]:
    """The rows that pass the table-level checks and the problems found (table order, then the files
    without a row); with ``on_error="raise"`` the first problem is a DataError."""
    table = scan.table
    if len(table) and (table["site"] == "unknown").all() and (table["site_raw"] == "").all():
        if not allow_missing_site:
            raise DataError(
                f"{source}: the participants table gives no site (no 'site' or 'siteXacq' column, or only "
                "empty cells); expected each subject's site (the site probe needs it), or --allow-missing-site "
                "to prepare every subject as site 'unknown'"
            )
        log.warning("%s: no site in the participants table: every subject is site 'unknown' (the site probe "
                    "is meaningless for this store)", source)
    files = table["source_path"].copy()
    for i, problem in scan.problems.items():
        if not files.at[i]:
            files.at[i] = problem.file
    problems = {**scan.problems, **row_problems(table, files, require_age=require_age)}
    ordered = [problems[i] for i in table.index if i in problems] + scan.orphans
    if ordered and on_error == "raise":
        _raise_first(ordered)
    return table.drop(index=list(problems)), list(ordered)


def _write_volumes(writer: StoreWriter, reader: Any, valid: pd.DataFrame, skipped: list[Problem], *,
                   grid: str | None, modality: str, on_error: str, progress: bool,
                   desc: str) -> tuple[list[tuple[int, str, int]], str | None, set[str]]:
    """Read, check and append every valid subject, split by split, one volume at a time. Returns the kept
    ``(table index, split, store row)``, the store's grid and the source grids met; a rejected volume is a
    DataError (``on_error="raise"``) or appended to ``skipped``."""
    from tqdm.auto import tqdm

    target = grid
    kept: list[tuple[int, str, int]] = []
    source_grids: set[str] = set()
    with tqdm(total=len(valid), desc=desc, unit="subject", disable=not progress) as bar:
        for split in SPLITS:
            for i in valid.index[valid["split"] == split]:
                pid, file = str(valid.at[i, "participant_id"]), str(valid.at[i, "source_path"])
                try:
                    raw = reader.load(valid, i)
                    volume, src = standardise_volume(raw, target=target, modality=modality)
                    if grid is None and target is not None and src != target:
                        raise VolumeRejected(
                            f"grid {src} differs from the cohort's grid {target} (that of the first subject); "
                            "expected one grid, or pass --grid to bring all subjects to one"
                        )
                    target = target or src
                    row = writer.append(split, volume[None])
                except VolumeRejected as exc:
                    problem = Problem(pid, file, str(exc))
                    if on_error == "raise":
                        raise DataError(problem.message()) from exc
                    skipped.append(problem)
                else:
                    kept.append((i, split, row))
                    source_grids.add(src)
                bar.update(1)
    return kept, target, source_grids


def _participants_table(valid: pd.DataFrame, kept: list[tuple[int, str, int]]) -> pd.DataFrame:
    """``participants.parquet``: the kept rows with their split and store row, :data:`STORE_COLUMNS` first."""
    index = [i for i, _, _ in kept]
    participants = valid.loc[index].copy()
    participants["split"] = [s for _, s, _ in kept]
    participants["row"] = [r for _, _, r in kept]
    participants["age"] = participants["age"].astype("float64")
    participants = participants.drop(columns=[c for c in _INTERNAL_COLUMNS if c in participants.columns])
    for column in ("participant_id", "sex", "site", "site_raw", "split", "source_path"):
        participants[column] = participants[column].astype(str)
    rest = [c for c in participants.columns if c not in STORE_COLUMNS]
    return participants[list(STORE_COLUMNS) + rest].reset_index(drop=True)


# -- command line ----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m brainage_core.data prepare``."""
    parser.add_argument("source", help="cohort folder (nifti layout: or its participants table)")
    parser.add_argument("--layout", choices=LAYOUTS, default="openbhb", help="source layout (default openbhb)")
    parser.add_argument("--out", required=True, help="store folder to write")
    parser.add_argument("--modality", choices=MODALITIES, default="vbm")
    parser.add_argument("--on-error", choices=ON_ERROR, default="raise", help="stop at the first bad subject or skip")
    parser.add_argument("--grid", choices=GRID_NAMES, default=None, help="target grid (default: the source's)")
    parser.add_argument("--mask", default=None, help="ramp layout: the CAT12 GM mask NIfTI")
    parser.add_argument("--resample", action="store_true", help="nifti layout: resample other grids by affine")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--allow-missing-site", action="store_true",
                        help="accept a table without site: every subject becomes site 'unknown' (no site probe)")


def run(args: argparse.Namespace) -> int:
    """Run the sub-command; returns the exit status (1 on any input error, one line on stderr)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        store = prepare(
            args.source,
            layout=args.layout,
            out=args.out,
            modality=args.modality,
            on_error=args.on_error,
            grid=args.grid,
            mask=args.mask,
            resample=args.resample,
            progress=not args.no_progress,
            allow_missing_site=args.allow_missing_site,
        )
    except BrainageError as exc:
        print(f"prepare: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. a read-only --out's parent, a full disk: one line, not a traceback
        print(f"prepare: error: {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{s} {store.manifest['shapes'][s][0]}" for s in store.splits)
    print(f"{store.path}: grid {store.grid}, {sizes}; skipped {store.manifest.get('skipped', 0)}")
    return 0
