"""The prepared store: a folder of float16 memmaps plus a participants table and a manifest.

Layout (the contract other code relies on; see ``docs/interfaces.md``)::

    STORE/<split>.npy            float16, (N, 1, D, H, W); open with np.load(mmap_mode="r")
    STORE/participants.parquet   participant_id, age, sex, site, site_raw, split, row, source_path, ...
    STORE/manifest.json          written last: {"format", "source", "layout", "modality", "grid",
                                 "shapes", "fingerprint", "version", "created", ...}
    STORE/skipped.tsv            only with on_error="skip": participant_id, file, reason

A store is complete exactly when ``manifest.json`` exists: :class:`StoreWriter` writes the whole
store in a build folder beside ``STORE`` (manifest last) and only then swaps it into place, so an
older store there stays intact until the new one is complete. :func:`open_store` refuses a folder
without a manifest (never a finished preparation). ``STORE_FILES`` / :func:`foreign_files` tell a
store's own files from anything else.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import errno
import fcntl
import glob
import json
import os
import shutil
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


def store_file_names() -> set[str]:
    """Names a prepared store folder may hold (besides the legacy ``.lock`` / ``.tmp-*`` leftovers)."""
    return {MANIFEST, PARTICIPANTS, SKIPPED, *(f"{s}.npy" for s in SPLITS)}


def foreign_files(path: str | Path) -> list[str]:
    """Sorted names in folder ``path`` that are not a store's files: any entry at all when there is no
    manifest (a folder without one was never a finished store), else the entries that no store writes.
    Leftovers of the former in-place writer (``.lock``, ``.tmp-*``) never count."""
    folder = Path(path)
    names = [p.name for p in folder.iterdir() if p.name != LOCK and not p.name.startswith(TMP_PREFIX)]
    if MANIFEST not in names:
        return sorted(names)
    own = store_file_names() | {f"{s}.npy" for s in (read_manifest(folder) or {}).get("shapes", {})}
    return sorted(n for n in names if n not in own)

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


class StoreWriter:
    """Writes a store beside its final place and swaps it in whole (memory use: one volume).

    Long for a reason: the lock, the build folder, the appends and the atomic swap are one protocol
    (the only writer of the store format); its steps are short methods.

    Usage::

        with StoreWriter(out) as writer:       # takes the store's lock (one writer at a time)
            row = writer.append("train", vol)  # float16-castable (1, D, H, W) or (D, H, W)
            ...
            store = writer.finish(participants, manifest)

    Every file is written into a build folder next to ``out`` (``<parent>/.<name>.tmp-<pid>``); only
    :meth:`finish`, once the new store is complete (manifest written last), puts it at ``out``: an
    atomic exchange of the two folders (``renameat2(RENAME_EXCHANGE)``; where the file system lacks
    it, two renames a moment apart), after which the old folder is deleted. Until then ``out`` and
    whatever it holds are not touched, so a failed or killed preparation leaves an existing store
    intact. The lock is the file ``<parent>/.<name>.lock`` (it must outlive the swap). Leaving the
    ``with`` block without :meth:`finish` removes the build folder; a killed process leaves one,
    which the next writer of ``out`` deletes. The caller decides whether ``out`` may be replaced
    (``prepare`` refuses a folder holding anything but a store). OSErrors (a read-only parent, a
    full disk) become StoreError naming the path.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_symlink():  # replace the folder it points to, never the link itself
            self.path = self.path.resolve()
        self.build = self.path.parent / f".{self.path.name}{TMP_PREFIX}{os.getpid()}"
        self._files: dict[str, Any] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._counts: dict[str, int] = {}
        self._lock_fh: Any = None
        self._finished = False

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> StoreWriter:
        lock = self.path.parent / f".{self.path.name}{LOCK}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fh = lock.open("a")
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX)
            self._remove_builds()  # under the lock: leftovers of killed writers
            self.build.mkdir()
        except OSError as exc:
            self.__exit__()
            raise StoreError(f"{self.path}: cannot write the store beside it ({_os_why(exc)}); expected a "
                             "writable folder") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._finished:
            self.abort()
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def _remove_builds(self) -> None:
        for stale in self.path.parent.glob(f".{glob.escape(self.path.name)}{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)

    def clear(self) -> None:
        """Kept for callers of the former in-place writer: nothing to do, ``out`` is replaced whole by
        :meth:`finish`."""

    def abort(self) -> None:
        """Close and delete everything written so far (the build folder); ``out`` is left as it was."""
        for fh in self._files.values():
            fh.close()
        self._files.clear()
        shutil.rmtree(self.build, ignore_errors=True)

    # -- writing ---------------------------------------------------------------------------------
    def _tmp(self, name: str) -> Path:
        return self.build / name

    def append(self, split: str, volume: np.ndarray) -> int:
        """Append one volume (cast to float16, stored as (1, D, H, W)) to ``split``; return its row."""
        vol = np.ascontiguousarray(volume, dtype=np.float16)
        if vol.ndim == 3:
            vol = vol[None]
        try:
            if split not in self._files:
                fh = self._tmp(f"{split}.npy").open("wb")
                fh.write(_npy_header((0, *vol.shape), np.float16))  # placeholder, rewritten in finish()
                self._files[split], self._shapes[split], self._counts[split] = fh, vol.shape, 0
            elif vol.shape != self._shapes[split]:
                raise StoreError(
                    f"{self.path}: volume of shape {vol.shape} appended to {split} whose rows are "
                    f"{self._shapes[split]}"
                )
            self._files[split].write(vol.tobytes())
        except OSError as exc:
            raise StoreError(f"{self.build}: cannot write {split}.npy ({_os_why(exc)})") from exc
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
        """Finalise: rewrite headers, write the table and the manifest (last), swap the store into place.

        ``manifest`` gets ``format``, ``shapes``, ``version`` and ``created`` filled in.
        """
        try:
            shapes: dict[str, list[int]] = {}
            for split, fh in self._files.items():
                shape = (self._counts[split], *self._shapes[split])
                fh.seek(0)
                fh.write(_npy_header(shape, np.float16))
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
                shapes[split] = list(shape)
            self._files.clear()
            table = _parquet_safe(participants)
            table.to_parquet(self._tmp(PARTICIPANTS), index=False)
            if skipped is not None and len(skipped):
                skipped.to_csv(self._tmp(SKIPPED), sep="\t", index=False)
            full = {
                "format": STORE_FORMAT,
                **manifest,
                "shapes": {s: shapes[s] for s in SPLITS if s in shapes},
                "version": __version__,
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            }
            _fsync_write(self._tmp(MANIFEST), json.dumps(full, indent=2, sort_keys=False) + "\n")
            self._swap_in()
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot finish the store ({_os_why(exc)}); the previous content of "
                             f"{self.path} is unchanged") from exc
        self._finished = True
        return Store(self.path)

    def _swap_in(self) -> None:
        """Put the complete build folder at ``path``; the folder it replaces is deleted afterwards."""
        if not self.path.exists():
            os.rename(self.build, self.path)
            return
        if not _exchange(self.build, self.path):
            old = self.path.parent / f".{self.path.name}{TMP_PREFIX}old-{os.getpid()}"
            os.rename(self.path, old)
            os.rename(self.build, self.path)
            self.build = old
        shutil.rmtree(self.build, ignore_errors=True)  # now the replaced store


def _os_why(exc: OSError) -> str:
    return f"{exc.strerror or type(exc).__name__}: {exc.filename}" if exc.filename else str(exc)


def _fsync_write(path: Path, text: str) -> None:
    with path.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


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
    "Store", "StoreWriter", "open_store", "require_known_ages", "read_manifest", "foreign_files", "STORE_FORMAT",
    "MANIFEST", "SPLITS",
]
