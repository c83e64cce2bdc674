"""The prepared store: a folder of float16 memmaps plus a participants table and a manifest.

Layout (the contract other code relies on; see ``docs/interfaces.md``)::

    STORE/<split>.npy            float16, (N, 1, D, H, W); open with np.load(mmap_mode="r")
    STORE/participants.parquet   participant_id, age, sex, site, site_raw, split, row, source_path, ...
    STORE/manifest.json          written last: {"format", "source", "layout", "modality", "grid",
                                 "shapes", "fingerprint", "version", "created", ...}
    STORE/skipped.tsv            only with on_error="skip": participant_id, file, reason

A store is complete exactly when ``manifest.json`` exists: :class:`StoreWriter` writes every file
under a temporary name, renames them into place and writes the manifest last, and deletes the
manifest of an older store before touching anything else. :func:`open_store` refuses a folder
without a manifest (an interrupted or never-finished preparation).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainage_core import __version__
from brainage_core.data.tables import SPLITS
from brainage_core.errors import StoreError

STORE_FORMAT = 1
MANIFEST = "manifest.json"
PARTICIPANTS = "participants.parquet"
SKIPPED = "skipped.tsv"
TMP_PREFIX = ".tmp-"
LOCK = ".lock"

#: Bytes of the .npy header we write (magic + length + dict, padded): fixed so it can be rewritten
#: in place with the final row count once all rows are appended. A multiple of 64 keeps the data aligned.
_NPY_HEADER_BYTES = 128


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """A version-1.0 .npy header for a C-ordered array, padded to exactly ``_NPY_HEADER_BYTES``."""
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    body = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {tuple(int(s) for s in shape)!r}, }}"
    pad = _NPY_HEADER_BYTES - 10 - len(body) - 1
    if pad < 0:
        raise StoreError(f"array shape {shape} too long for the store's .npy header")
    header = (body + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


class Store:
    """Read-only view of a prepared store.

    Attributes: ``path``, ``manifest`` (dict), ``grid`` (grid name), ``fingerprint`` (of the source),
    ``participants`` (the whole table), ``splits`` (present splits, canonical order) and
    ``site_labels`` (sorted unique ``site`` values over the whole store; a subject's site code is its
    index in this list). Arrays are memory-mapped on first use and never loaded whole. Picklable: the
    memmaps are dropped on pickling and re-opened lazily.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            raise StoreError(f"{self.path}: no prepared store here (folder missing); run `prepare` first")
        if not manifest_path.is_file():
            raise StoreError(
                f"{self.path}: incomplete store (no {MANIFEST}: preparation never finished or was "
                "interrupted); run `prepare` again"
            )
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"{manifest_path}: unreadable manifest ({exc}); run `prepare` again") from exc
        if self.manifest.get("format") != STORE_FORMAT:
            raise StoreError(
                f"{manifest_path}: store format {self.manifest.get('format')!r}; expected {STORE_FORMAT} "
                "(prepare the store again)"
            )
        shapes = self.manifest.get("shapes") or {}
        self.splits: list[str] = [s for s in SPLITS if s in shapes] + sorted(set(shapes) - set(SPLITS))
        for split in self.splits:
            if not (self.path / f"{split}.npy").is_file():
                raise StoreError(f"{self.path}: {split}.npy listed in {MANIFEST} is missing; run `prepare` again")
        try:
            self.participants: pd.DataFrame = pd.read_parquet(self.path / PARTICIPANTS)
        except Exception as exc:  # pyarrow raises several types
            raise StoreError(f"{self.path / PARTICIPANTS}: unreadable ({exc}); run `prepare` again") from exc
        self.grid: str = self.manifest["grid"]
        self.fingerprint: str = self.manifest["fingerprint"]
        self.site_labels: list[str] = sorted(self.participants["site"].astype(str).unique().tolist())
        self._arrays: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.manifest['shapes'][s][0]}" for s in self.splits)
        return f"Store({str(self.path)!r}, grid={self.grid!r}, {sizes})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise StoreError(f"{self.path}: no split {split!r}; this store has {', '.join(self.splits)}")

    def array(self, split: str) -> np.ndarray:
        """The read-only memmap of ``split``: float16, shape (N, 1, D, H, W)."""
        self._check_split(split)
        if split not in self._arrays:
            file = self.path / f"{split}.npy"
            try:
                arr = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise StoreError(f"{file}: unreadable ({exc}); run `prepare` again") from exc
            expected = tuple(self.manifest["shapes"][split])
            if arr.shape != expected or arr.dtype != np.float16:
                raise StoreError(f"{file}: found {arr.dtype} {arr.shape}; expected float16 {expected} as in {MANIFEST}")
            self._arrays[split] = arr
        return self._arrays[split]

    def table(self, split: str) -> pd.DataFrame:
        """Participants of ``split`` sorted by ``row`` (row i describes ``array(split)[i]``)."""
        self._check_split(split)
        part = self.participants[self.participants["split"] == split]
        return part.sort_values("row").reset_index(drop=True)

    def site_codes(self, split: str) -> np.ndarray:
        """int64 site code (index into ``site_labels``) of each row of ``split``."""
        lookup = {label: i for i, label in enumerate(self.site_labels)}
        return self.table(split)["site"].astype(str).map(lookup).to_numpy(dtype=np.int64)


def require_known_ages(store: Any, *, purpose: str = "training") -> None:
    """StoreError naming the store and its participants without an age (NaN), if it has any.

    ``store``: a :class:`Store` (or anything with ``path``, ``splits``, ``table(split)``). A store
    prepared with ``require_age=False`` (prediction of a cohort whose ages are unknown) may hold NaN
    ages; ``purpose`` (e.g. ``"training"``) says in the message what needs them.
    """
    missing: list[str] = []
    for split in store.splits:
        table = store.table(split)
        missing += table.loc[table["age"].isna(), "participant_id"].astype(str).tolist()
    if missing:
        shown = ", ".join(repr(p) for p in missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise StoreError(
            f"{store.path}: {len(missing)} participant(s) without age: {shown}; {purpose} needs every age "
            "(the store was prepared with require_age=False, for prediction only); expected a store "
            "prepared from a table giving each subject's age"
        )


def open_store(path: str | Path) -> Store:
    """Open a prepared store; StoreError when it is missing or incomplete (no manifest)."""
    return Store(path)


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of the store at ``path``, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _fsync_replace(tmp: Path, final: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)


class StoreWriter:
    """Writes a store atomically, one volume at a time (memory use: one volume).

    Usage::

        with StoreWriter(out) as writer:       # takes the store's lock (one writer at a time)
            writer.clear()                     # removes any old store files, manifest first
            row = writer.append("train", vol)  # float16-castable (1, D, H, W) or (D, H, W)
            ...
            store = writer.finish(participants, manifest)

    Leaving the ``with`` block without :meth:`finish` (an exception) removes the temporary files;
    a killed process leaves only ``.tmp-*`` files and no manifest, which the next writer cleans up.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._files: dict[str, Any] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._counts: dict[str, int] = {}
        self._lock_fh: Any = None
        self._finished = False

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> StoreWriter:
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fh = (self.path / LOCK).open("a")
        fcntl.flock(self._lock_fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._finished:
            self.abort()
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def clear(self) -> None:
        """Make the folder hold no store: manifest first, then the data files and stale temp files."""
        (self.path / MANIFEST).unlink(missing_ok=True)
        for name in [*(f"{s}.npy" for s in SPLITS), PARTICIPANTS, SKIPPED]:
            (self.path / name).unlink(missing_ok=True)
        for stale in self.path.glob(TMP_PREFIX + "*"):
            stale.unlink(missing_ok=True)

    def abort(self) -> None:
        """Close and delete every temporary file written so far."""
        for fh in self._files.values():
            fh.close()
        self._files.clear()
        for stale in self.path.glob(TMP_PREFIX + "*"):
            stale.unlink(missing_ok=True)

    # -- writing ---------------------------------------------------------------------------------
    def _tmp(self, name: str) -> Path:
        return self.path / f"{TMP_PREFIX}{name}"

    def append(self, split: str, volume: np.ndarray) -> int:
        """Append one volume (cast to float16, stored as (1, D, H, W)) to ``split``; return its row."""
        vol = np.ascontiguousarray(volume, dtype=np.float16)
        if vol.ndim == 3:
            vol = vol[None]
        if split not in self._files:
            fh = self._tmp(f"{split}.npy").open("wb")
            fh.write(_npy_header((0, *vol.shape), np.float16))  # placeholder, rewritten in finish()
            self._files[split], self._shapes[split], self._counts[split] = fh, vol.shape, 0
        elif vol.shape != self._shapes[split]:
            raise StoreError(
                f"{self.path}: volume of shape {vol.shape} appended to {split} whose rows are {self._shapes[split]}"
            )
        self._files[split].write(vol.tobytes())
        self._counts[split] += 1
        return self._counts[split] - 1

    @property
    def counts(self) -> dict[str, int]:
        """Rows appended so far per split."""
        return dict(self._counts)

    def finish(
        self,
        participants: pd.DataFrame,
        manifest: dict[str, Any],
        skipped: pd.DataFrame | None = None,
    ) -> Store:
        """Finalise: rewrite headers, rename every file into place, write the manifest last.

        ``manifest`` gets ``format``, ``shapes``, ``version`` and ``created`` filled in.
        """
        shapes: dict[str, list[int]] = {}
        for split, fh in self._files.items():
            shape = (self._counts[split], *self._shapes[split])
            fh.seek(0)
            fh.write(_npy_header(shape, np.float16))
            fh.close()
            shapes[split] = list(shape)
        self._files.clear()
        table = _parquet_safe(participants)
        table.to_parquet(self._tmp(PARTICIPANTS), index=False)
        if skipped is not None and len(skipped):
            skipped.to_csv(self._tmp(SKIPPED), sep="\t", index=False)
        for split in shapes:
            _fsync_replace(self._tmp(f"{split}.npy"), self.path / f"{split}.npy")
        _fsync_replace(self._tmp(PARTICIPANTS), self.path / PARTICIPANTS)
        if skipped is not None and len(skipped):
            _fsync_replace(self._tmp(SKIPPED), self.path / SKIPPED)
        full = {
            "format": STORE_FORMAT,
            **manifest,
            "shapes": {s: shapes[s] for s in SPLITS if s in shapes},
            "version": __version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        self._tmp(MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=False) + "\n")
        _fsync_replace(self._tmp(MANIFEST), self.path / MANIFEST)
        self._finished = True
        return Store(self.path)


def _parquet_safe(table: pd.DataFrame) -> pd.DataFrame:
    """Copy of ``table`` whose object columns of mixed types are turned into text (parquet needs one type)."""
    out = table.copy()
    for column in out.columns:
        if out[column].dtype == object:
            kinds = {type(v) for v in out[column] if v is not None and not (isinstance(v, float) and np.isnan(v))}
            if len(kinds) > 1 or (kinds and not kinds <= {str}):
                out[column] = out[column].map(lambda v: "" if v is None else str(v))
    return out


__all__ = [
    "Store", "StoreWriter", "open_store", "require_known_ages", "read_manifest", "STORE_FORMAT", "MANIFEST", "SPLITS"
]
