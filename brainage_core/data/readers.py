"""Readers of the three source layouts (see ``docs/evaluation.md``, "The data set").

* ``openbhb`` — per-subject: ``participants.tsv`` at the root and, per subject,
  ``<train|val>/derivatives/sub-<id>/ses-*/sub-<id>_preproc-cat12vbm_desc-gm_T1w.npy``
  (``..._preproc-quasiraw_T1w.npy`` for modality ``quasiraw``).
* ``ramp`` — the challenge kit's flat arrays ``train.npy``/``train.tsv`` and ``test.npy``/``test.tsv``
  (one subject per row; the first ``mask voxel count`` values of a row are the VBM voxels where the
  GM mask is > 0.05, in C order) plus the mask NIfTI; ``test.tsv``'s ``split`` column tells
  internal from external rows.
* ``nifti`` — a participants table (tsv/csv/parquet) and one ``.nii``/``.nii.gz`` image per subject,
  named by a ``path`` column (relative to the table's folder) or found by name
  (``sub-<id>*.nii[.gz]`` or ``<id>*.nii[.gz]`` anywhere under the folder).

A reader's :meth:`~Reader.scan` pairs table rows with files without reading any volume (listing
rows without a file and files without a row); :meth:`~Reader.load` reads one subject's raw array.
:func:`standardise_volume` then checks dtype, shape, grid and finiteness and brings the volume
to the target grid.

Long (over 400 lines) for a reason: the three readers share :class:`Scan`, :class:`Reader` and
:func:`standardise_volume`, and are read together when a layout's rules are compared; the RAMP and NIfTI
readers are over 80 lines because each holds its layout's whole pairing of rows with files (``scan``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainage_core.data.layout import MASK_THRESHOLD, OPENBHB_SUFFIX, openbhb_glob, split_folder, subject_relpath
from brainage_core.data.tables import SPLIT_ALIASES, Problem, file_digest, find_table, normalise_table, read_table
from brainage_core.errors import ConfigError, DataError
from brainage_core.grids import GRID_FACTORS, GRID_NAMES, GRID_SHAPES, block_average, grid_affine, grid_of_shape

LAYOUTS: tuple[str, ...] = ("openbhb", "ramp", "nifti")
MODALITIES: tuple[str, ...] = ("vbm", "quasiraw")

#: Grid of the quasi-raw T1 (1 mm MNI); it has no coarser versions.
QUASIRAW_GRID = "quasiraw"
QUASIRAW_SHAPE: tuple[int, int, int] = (182, 218, 182)

#: RAMP: a VBM voxel is in the mask where the CAT12 GM probability exceeds this (layout.MASK_THRESHOLD).
RAMP_MASK_THRESHOLD = MASK_THRESHOLD

_GRID_LIST = ", ".join(f"{g} {'×'.join(map(str, GRID_SHAPES[g]))}" for g in GRID_NAMES)


class VolumeRejected(DataError):
    """One subject's volume is unreadable or invalid; ``str(exc)`` is the reason (no id/file)."""


@dataclass
class Scan:
    """What a reader found before reading any volume.

    ``table``: the normalised participants table (see ``tables.normalise_table``) with a
    ``source_path`` column (the subject's file, ``""`` when none was found); ``problems``: rows that
    cannot be prepared (e.g. no file), by table index; ``orphans``: files with no table row;
    ``fingerprint``: JSON-able description of the source (table digests, file paths/sizes/mtimes).
    """

    table: pd.DataFrame
    problems: dict[int, Problem] = field(default_factory=dict)
    orphans: list[Problem] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)


def _file_stat(path: Path, root: Path) -> list[Any]:
    st = path.stat()
    try:
        name = str(path.relative_to(root))
    except ValueError:
        name = str(path)
    return [name, st.st_size, st.st_mtime_ns]


def _why(exc: BaseException) -> str:
    """One-line, bounded description of a library exception for our messages."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}{'…' if len(text) > 160 else ''}"


def _bare_id(participant_id: str) -> str:
    return participant_id[4:] if participant_id.startswith("sub-") else participant_id


def standardise_volume(array: np.ndarray, *, target: str | None, modality: str = "vbm") -> tuple[np.ndarray, str]:
    """Check a raw subject array and bring it to grid ``target``.

    Accepts any floating dtype and any number of leading singleton axes before (D, H, W) on one
    of the grids (``quasiraw``: 182×218×182 only). ``target`` None keeps the source grid.
    Returns (float32 or float64 volume (D, H, W) on the target grid, source grid name).
    Raises :class:`VolumeRejected` with the reason (wrong dtype/shape, non-finite voxels, grid
    coarser than the target, values beyond float16 range, every voxel zero).
    """
    if not np.issubdtype(array.dtype, np.floating):
        raise VolumeRejected(f"array dtype {array.dtype}; expected a floating-point array")
    vol = array
    while vol.ndim > 3 and vol.shape[0] == 1:
        vol = vol[0]
    if modality == "quasiraw":
        if vol.shape != QUASIRAW_SHAPE:
            raise VolumeRejected(
                f"array shape {array.shape}; expected (…1, {', '.join(map(str, QUASIRAW_SHAPE))}) "
                "(the quasi-raw 1 mm grid, any leading singleton axes)"
            )
        source = QUASIRAW_GRID
    else:
        source = grid_of_shape(vol.shape) if vol.ndim == 3 else None
        if source is None:
            raise VolumeRejected(
                f"array shape {array.shape}; expected leading singleton axes then one of the grids {_GRID_LIST}"
            )
    vol = np.asarray(vol)
    finite = np.isfinite(vol)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise VolumeRejected(f"{bad} non-finite voxel(s) (first at {first}); expected finite values")
    if not np.any(vol):
        raise VolumeRejected("every voxel is 0 (an empty image); expected a brain volume")
    target = target or source
    if source != target:
        if source == QUASIRAW_GRID or target == QUASIRAW_GRID:
            raise VolumeRejected(f"grid {source!r} cannot be brought to grid {target!r}")
        if GRID_FACTORS[source] > GRID_FACTORS[target]:
            raise VolumeRejected(
                f"grid {source} {'×'.join(map(str, vol.shape))} is coarser than the target grid {target} "
                f"{'×'.join(map(str, GRID_SHAPES[target]))}; expected a grid at least as fine as the target"
            )
        vol = block_average(vol, GRID_FACTORS[target] // GRID_FACTORS[source])
    peak = float(np.abs(vol).max()) if vol.size else 0.0
    if peak > float(np.finfo(np.float16).max):
        raise VolumeRejected(f"largest |value| {peak:g} overflows float16; expected values within ±65504")
    return vol, source


class Reader:
    """Base class: ``scan()`` then ``load(index)`` for each table index; see the module docstring."""

    layout: str = ""

    def __init__(self, source: str | Path, *, modality: str = "vbm", require_age: bool = True):
        self.source = Path(source)
        #: False: the participants table may lack the age column (ages then NaN; see tables.read_table)
        self.require_age = require_age
        if modality not in MODALITIES:
            raise ConfigError(f"modality: {modality!r}; expected one of {', '.join(MODALITIES)}")
        self.modality = modality
        if not self.source.exists():
            raise DataError(f"{self.source}: source not found; expected a cohort folder ({self.layout} layout)")

    def scan(self) -> Scan:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, table: pd.DataFrame, index: int) -> np.ndarray:  # pragma: no cover - abstract
        """Raw array of row ``index`` of the scanned ``table``; VolumeRejected when unreadable."""
        raise NotImplementedError


class OpenBHBReader(Reader):
    """Per-subject OpenBHB layout (``participants.tsv`` + per-subject ``.npy``)."""

    layout = "openbhb"

    def scan(self) -> Scan:
        root = self.source
        table_path = find_table(root)
        table = normalise_table(read_table(table_path, require_age=self.require_age))
        suffix = OPENBHB_SUFFIX[self.modality]
        found: dict[str, list[Path]] = {}
        for path in sorted(root.glob(openbhb_glob(self.modality))):
            found.setdefault(path.name[len("sub-") : -len(suffix)], []).append(path)
        problems: dict[int, Problem] = {}
        paths: list[str] = []
        for i in table.index:
            pid = str(table.at[i, "participant_id"])
            bare = _bare_id(pid)
            folder = split_folder(table.at[i, "split"])
            candidates = found.get(bare, [])
            preferred = [p for p in candidates if p.relative_to(root).parts[0] == folder]
            chosen = (preferred or candidates or [None])[0]
            if chosen is None:
                expected = root / subject_relpath(bare, table.at[i, "split"], modality=self.modality)
                problems[i] = Problem(pid, str(expected), "no file for this row; expected this file")
                paths.append("")
            else:
                paths.append(str(chosen))
        table["source_path"] = paths
        known = {_bare_id(str(p)) for p in table["participant_id"]}
        orphans = [
            Problem(bare, str(p), f"file has no row in {table_path.name}; expected a row with participant_id {bare!r}")
            for bare, ps in found.items()
            if bare not in known
            for p in ps
        ]
        fingerprint = {
            "table": [table_path.name, file_digest(table_path)],
            "files": [_file_stat(p, root) for ps in found.values() for p in ps],
        }
        return Scan(table, problems, orphans, fingerprint)

    def load(self, table: pd.DataFrame, index: int) -> np.ndarray:
        path = str(table.at[index, "source_path"])
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # truncated/corrupt .npy raise ValueError, OSError, EOFError...
            raise VolumeRejected(f"unreadable or truncated .npy ({_why(exc)}); expected a complete .npy array") from exc
        if not isinstance(array, np.ndarray):
            raise VolumeRejected("not a single .npy array; expected one array per file")
        return array


class RampReader(Reader):
    """RAMP flat arrays (``train|test.{npy,tsv}``) plus the GM mask NIfTI."""

    layout = "ramp"

    def __init__(
        self, source: str | Path, *, modality: str = "vbm", mask: str | Path | None = None, require_age: bool = True
    ):
        super().__init__(source, modality=modality, require_age=require_age)
        if modality != "vbm":
            raise ConfigError(
                "modality: 'quasiraw' is not readable from RAMP flat arrays (needs the quasi-raw mask); "
                "expected 'vbm' or the openbhb layout"
            )
        if mask is None:
            raise ConfigError("mask: the ramp layout needs --mask PATH (the CAT12 GM mask NIfTI); got none")
        self.mask_path = Path(mask)
        self.mask = self._read_mask(self.mask_path)
        self.n_vbm = int(np.count_nonzero(self.mask))
        self._arrays: dict[str, np.ndarray] = {}

    @staticmethod
    def _read_mask(path: Path) -> np.ndarray:
        import nibabel as nib

        try:
            data = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
        except Exception as exc:
            raise DataError(f"{path}: unreadable mask ({_why(exc)}); expected a NIfTI GM mask") from exc
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != 3 or grid_of_shape(data.shape) is None:
            raise DataError(f"{path}: mask shape {data.shape}; expected one of the grids {_GRID_LIST}")
        mask = data > RAMP_MASK_THRESHOLD
        if not mask.any():
            raise DataError(f"{path}: no voxel above {RAMP_MASK_THRESHOLD}; expected a GM probability mask")
        return mask

    def _open_array(self, path: Path) -> np.ndarray:
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise DataError(
                f"{path}: unreadable or truncated ({_why(exc)}); expected a complete 2-D .npy array"
            ) from exc
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
            raise DataError(f"{path}: found {array.dtype} {array.shape}; expected a 2-D float array (subjects, values)")
        if array.shape[1] < self.n_vbm:
            raise DataError(
                f"{path}: rows have {array.shape[1]} values; expected at least {self.n_vbm} "
                f"(the voxels of mask {self.mask_path} above {RAMP_MASK_THRESHOLD})"
            )
        return array

    def scan(self) -> Scan:
        root = self.source
        tables, problems, orphans = [], {}, []
        fingerprint: dict[str, Any] = {"mask": [str(self.mask_path), file_digest(self.mask_path)], "files": []}
        offset = 0
        for part in ("train", "test"):
            npy = root / f"{part}.npy"
            try:
                table_path = find_table(root, part)
            except DataError:
                if part == "test" and not npy.exists():
                    continue
                raise
            raw = read_table(table_path, require_age=self.require_age)
            if part == "test" and "split" not in raw.columns:
                raise DataError(
                    f"{table_path}: no 'split' column; expected internal_test or external_test on every row"
                )
            table = normalise_table(raw, default_split="train")
            if part == "test":  # a test row must never reach the training split
                for i, value in enumerate(table["split"]):
                    if SPLIT_ALIASES.get(str(value)) == "train":
                        pid = str(table["participant_id"].iloc[i])
                        problems[offset + i] = Problem(
                            pid, f"{npy}#{i}", f"split {value!r} in {table_path.name}: a test row cannot be a "
                            "training subject; expected internal_test or external_test"
                        )
            if not npy.is_file():
                raise DataError(f"{npy}: missing; expected the flat array matching {table_path.name}")
            array = self._open_array(npy)
            self._arrays[part] = array
            fingerprint[part] = [table_path.name, file_digest(table_path)]
            fingerprint["files"].append(_file_stat(npy, root))
            n = array.shape[0]
            table["source_path"] = [f"{npy}#{i}" if i < n else "" for i in range(len(table))]
            table["_part"], table["_row"] = part, np.arange(len(table))
            table.index = np.arange(offset, offset + len(table))
            for i in range(len(table)):
                if i >= n:
                    pid = str(table["participant_id"].iloc[i])
                    problems[offset + i] = Problem(
                        pid, f"{npy}#{i}", f"no row {i} in {npy.name} (it has {n}); expected one row per table row"
                    )
            for i in range(len(table), n):
                orphans.append(
                    Problem(f"<row {i}>", f"{npy}#{i}", f"array row has no {table_path.name} row; expected {n} rows")
                )
            offset += len(table)
            tables.append(table)
        return Scan(pd.concat(tables), problems, orphans, fingerprint)

    def load(self, table: pd.DataFrame, index: int) -> np.ndarray:
        part, row = str(table.at[index, "_part"]), int(table.at[index, "_row"])
        try:
            flat = np.asarray(self._arrays[part][row, : self.n_vbm])
        except Exception as exc:
            raise VolumeRejected(f"unreadable flat-array row ({_why(exc)}); expected a readable row") from exc
        volume = np.zeros(self.mask.shape, dtype=np.float64 if flat.dtype == np.float64 else np.float32)
        volume[self.mask] = flat  # C order of the mask, as numpy boolean indexing / nilearn unmask
        return volume


class NiftiReader(Reader):
    """NIfTI images plus a participants table; other grids resampled by affine when ``resample``."""

    layout = "nifti"

    def __init__(
        self,
        source: str | Path,
        *,
        modality: str = "vbm",
        resample: bool = False,
        target: str | None = None,
        require_age: bool = True,
    ):
        super().__init__(source, modality=modality, require_age=require_age)
        self.resample = resample
        self.target = target

    def scan(self) -> Scan:
        if self.source.is_file():
            table_path, root = self.source, self.source.parent
        else:
            root = self.source
            table_path = find_table(root)
        raw = read_table(table_path, require_age=self.require_age)
        table = normalise_table(raw)
        images = sorted(p for p in root.rglob("*") if p.is_file() and re.search(r"\.nii(\.gz)?$", p.name))
        by_stem: dict[str, list[Path]] = {}
        for p in images:
            stem = re.sub(r"\.nii(\.gz)?$", "", p.name)
            for key in {stem, stem.split("_")[0]}:
                by_stem.setdefault(_bare_id(key), []).append(p)
        problems: dict[int, Problem] = {}
        paths: list[str] = []
        used: set[Path] = set()
        path_column = "path" if "path" in raw.columns else None
        for i in table.index:
            pid = str(table.at[i, "participant_id"])
            if path_column:
                rel = str(raw.at[i, path_column])
                candidate = Path(rel) if Path(rel).is_absolute() else root / rel
                found = [candidate] if rel and candidate.is_file() else []
                expected = str(candidate)
            else:
                found = sorted(set(by_stem.get(_bare_id(pid), [])))
                expected = str(root / f"sub-{_bare_id(pid)}.nii.gz")
            if len(found) == 1:
                paths.append(str(found[0]))
                used.add(found[0].resolve())
            else:
                paths.append("")
                if found:
                    names = ", ".join(str(p) for p in found)
                    problems[i] = Problem(pid, names, "several images match this id; expected exactly one")
                else:
                    problems[i] = Problem(pid, expected, "no image for this row; expected this .nii/.nii.gz file")
        table["source_path"] = paths
        orphans = [
            Problem(re.sub(r"\.nii(\.gz)?$", "", p.name), str(p), f"image has no {table_path.name} row; expected one")
            for p in images
            if p.resolve() not in used
        ]
        fingerprint = {
            "table": [table_path.name, file_digest(table_path)],
            "files": [_file_stat(p, root) for p in images],
            "resample": self.resample,
        }
        return Scan(table, problems, orphans, fingerprint)

    def load(self, table: pd.DataFrame, index: int) -> np.ndarray:
        import nibabel as nib

        path = str(table.at[index, "source_path"])
        try:
            img = nib.load(path)
            shape = img.shape
            while len(shape) > 3 and shape[-1] == 1:
                shape = shape[:-1]
            if len(shape) != 3:
                raise VolumeRejected(f"image shape {img.shape}; expected a 3-D image")
            grid = grid_of_shape(shape)
            on_grid = grid is not None and np.allclose(img.affine, grid_affine(grid), atol=1e-2)
            if self.modality == "quasiraw":
                on_grid = tuple(shape) == QUASIRAW_SHAPE  # its own 1 mm grid; no resampling offered
                if not on_grid:
                    raise VolumeRejected(f"image shape {img.shape}; expected the quasi-raw grid {QUASIRAW_SHAPE}")
            if not on_grid:
                voxel = "×".join(f"{v:g}" for v in np.abs(np.diag(img.affine)[:3]))
                found = f"{'×'.join(map(str, shape))} at {voxel} mm"
                if not self.resample:
                    raise VolumeRejected(
                        f"image grid {found} (affine origin {np.round(img.affine[:3, 3], 2).tolist()}) is not "
                        f"a store grid ({_GRID_LIST}, OpenBHB MNI affine); expected one of them, or pass --resample"
                    )
                from nilearn.image import resample_img

                target = self.target or "full"
                img3 = nib.Nifti1Image(np.asarray(img.dataobj).reshape(shape), img.affine)
                img = resample_img(
                    img3,
                    target_affine=grid_affine(target),
                    target_shape=grid_shape_of(target),
                    interpolation="continuous",
                    force_resample=True,
                    copy_header=True,
                )
            data = np.asarray(img.get_fdata(dtype=np.float32))
        except VolumeRejected:
            raise
        except Exception as exc:  # nibabel raises many types for truncated/corrupt files
            raise VolumeRejected(f"unreadable or truncated NIfTI ({_why(exc)}); expected a complete image") from exc
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        return data


def grid_shape_of(name: str) -> tuple[int, int, int]:
    """Spatial shape of a store grid (including ``quasiraw``)."""
    return QUASIRAW_SHAPE if name == QUASIRAW_GRID else GRID_SHAPES[name]


def make_reader(
    layout: str,
    source: str | Path,
    *,
    modality: str = "vbm",
    mask: str | Path | None = None,
    resample: bool = False,
    target: str | None = None,
    require_age: bool = True,
) -> Reader:
    """The reader of ``layout`` (``openbhb``, ``ramp`` or ``nifti``); ConfigError for another name.

    ``require_age=False``: the participants table may lack the ``age`` column (see ``tables.read_table``).
    """
    if layout == "openbhb":
        return OpenBHBReader(source, modality=modality, require_age=require_age)
    if layout == "ramp":
        return RampReader(source, modality=modality, mask=mask, require_age=require_age)
    if layout == "nifti":
        return NiftiReader(source, modality=modality, resample=resample, target=target, require_age=require_age)
    raise ConfigError(f"layout: {layout!r}; expected one of {', '.join(LAYOUTS)}")
