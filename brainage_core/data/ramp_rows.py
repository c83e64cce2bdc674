"""``python -m brainage_core.data ramp-rows STORE --out DIR``: the challenge kit's data layout from a store.

From a prepared full-grid VBM store, writes what the RAMP kit (``brain_age_with_site_removal``) reads,
so that an exported ``estimator.py`` can be tried locally exactly as the challenge server feeds it:

- ``train.npy`` / ``train.tsv``: the ``train`` split; ``test.npy`` / ``test.tsv``: ``internal_test``
  rows first, then ``external_test`` (the ``split`` column says which);
- rows of the kit's full width (3,659,572 float32 values, :data:`RAMP_WIDTH`): the VBM voxels where the
  mask is > 0.05 first, in C order of the mask array, then zeros where the kit has the quasi-raw,
  FreeSurfer and ROI features (this project stores VBM only);
- ``cat12vbm_space-MNI152_desc-gm_TPM.nii.gz``: a GM probability map on the 121×145×121 grid, made from
  nilearn's packaged ICBM152 GM template resampled (linear) to the grid — the stand-in for CAT12's GM
  TPM, which is not distributed here. Its voxel count above 0.05 differs from the kit's 519,945; the
  rows use this mask's count.

Rows are written through ``numpy.lib.format.open_memmap`` one subject at a time (never the whole array
in memory); files are written under temporary names and renamed when complete. The tables keep the
store's participant columns; ``site`` holds the challenge's 64-class site label (the kit's ``problem.py``
reads ``site`` as that label, an integer 0-63: a store whose labels are not such integers is refused),
``siteXacq`` repeats it and ``site_raw`` keeps the source's raw site, so
``prepare(DIR, layout="ramp", mask=DIR/<mask>)`` reads them back unchanged.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from brainage_core.data.layout import MASK_THRESHOLD
from brainage_core.data.store import Store, open_store
from brainage_core.errors import BrainageError, ConfigError, StoreError
from brainage_core.grids import FULL_AFFINE, FULL_SHAPE

log = logging.getLogger(__name__)

#: Values per row in the challenge kit's flat arrays (VBM, quasi-raw, FreeSurfer and ROI features).
RAMP_WIDTH = 3_659_572
#: VBM values per row in the kit (CAT12 GM TPM > 0.05); this module's stand-in mask has its own count.
KIT_VBM_VALUES = 519_945
MASK_FILE = "cat12vbm_space-MNI152_desc-gm_TPM.nii.gz"
#: RAMP parts and the store splits they hold, in row order.
PARTS: dict[str, tuple[str, ...]] = {"train": ("train",), "test": ("internal_test", "external_test")}
#: Site classes of the challenge (``problem.py`` one-hot encodes ``site`` over this many).
KIT_SITE_CLASSES = 64


def gm_probability_map() -> np.ndarray:
    """nilearn's ICBM152 GM template (1 mm) resampled linearly to the full grid: float32 (121, 145, 121) in [0, 1]."""
    from nilearn import datasets, image

    img = datasets.load_mni152_gm_template(resolution=1)
    img = image.new_img_like(img, np.asarray(img.dataobj, dtype=np.float32), copy_header=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        res = image.resample_img(
            img, target_affine=FULL_AFFINE, target_shape=FULL_SHAPE, interpolation="linear",
            force_resample=True, copy_header=True,
        )
    return np.clip(np.asarray(res.dataobj, dtype=np.float32), 0.0, 1.0)


def write_mask(path: str | Path) -> np.ndarray:
    """Write the stand-in GM probability map as NIfTI (full-grid affine); return the boolean mask (> 0.05)."""
    import nibabel as nib

    gm = gm_probability_map()
    # float32(0.05) > 0.05 holds in float64 but not in float32: nudge those voxels just below the
    # threshold so that readers comparing in either precision find the same mask.
    threshold32 = np.float32(MASK_THRESHOLD)
    gm[gm == threshold32] = np.nextafter(threshold32, np.float32(0.0))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nib.save(nib.Nifti1Image(gm, FULL_AFFINE), str(tmp))
    os.replace(tmp, path)
    return gm > MASK_THRESHOLD


def _part_table(store: Store, splits: tuple[str, ...]) -> pd.DataFrame:
    tables = [store.table(s) for s in splits if s in store.splits]
    if not tables:
        return pd.DataFrame(columns=store.participants.columns)
    return pd.concat(tables, ignore_index=True)


def _kit_table(table: pd.DataFrame, where: str | Path = "store") -> pd.DataFrame:
    """The kit's tsv columns from store rows: ``site`` and ``siteXacq`` are the challenge label (the
    store's ``site``), ``site_raw`` the raw site. StoreError naming the participant when a label is not
    an integer in [0, :data:`KIT_SITE_CLASSES`)."""
    out = table.drop(columns=[c for c in ("row", "source_path") if c in table.columns]).copy()
    labels = table["site"].astype(str)
    for pid, label in zip(table["participant_id"], labels):
        if not (label.isdigit() and int(label) < KIT_SITE_CLASSES):
            raise StoreError(
                f"{where}: participant {pid!r} has site label {label!r}; expected the challenge's site label, "
                f"an integer 0-{KIT_SITE_CLASSES - 1} (the kit's problem.py reads 'site' as that class)"
            )
    out["site"] = labels
    out["siteXacq"] = labels
    out["site_raw"] = table["site_raw"].astype(str) if "site_raw" in table.columns else labels
    first = [c for c in ("participant_id", "age", "sex", "site", "siteXacq", "site_raw", "split") if c in out.columns]
    return out[first + [c for c in out.columns if c not in first]]


def write_ramp_rows(store_path: str | Path, out: str | Path, *, width: int = RAMP_WIDTH) -> dict[str, Path]:
    """Write the kit layout of a full-grid VBM store into ``out``; return ``{name: path}`` of the written files.

    ``width``: values per row (the kit's 3,659,572; smaller widths are for tests and must still hold the
    mask's voxels). Raises ``StoreError`` for a store that is not a full-grid VBM store and ``ConfigError``
    for a width below the mask's voxel count.
    """
    store = open_store(store_path)
    if store.manifest.get("modality", "vbm") != "vbm" or store.grid != "full":
        raise StoreError(
            f"{store.path}: a {store.manifest.get('modality', 'vbm')} store on grid {store.grid!r}; "
            "expected a VBM store on the full grid 121×145×121 (prepare it with --grid full)"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mask = write_mask(out / MASK_FILE)
    n_vbm = int(mask.sum())
    if width < n_vbm:
        raise ConfigError(f"--width {width}: rows must hold the {n_vbm} voxels of the mask; expected width >= {n_vbm}")
    written = {"mask": out / MASK_FILE}
    for splits in PARTS.values():
        if any(s in store.splits for s in splits):
            _kit_table(_part_table(store, splits), store.path)  # refuse bad labels before writing rows
    for part, splits in PARTS.items():
        table = _part_table(store, splits)
        if table.empty:
            log.info("%s: no %s rows in the store; %s.npy not written", store.path, "/".join(splits), part)
            continue
        npy, tsv = out / f"{part}.npy", out / f"{part}.tsv"
        tmp_npy = out / f".{part}.tmp.npy"
        rows = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.float32, shape=(len(table), width))
        for i, (split, row) in enumerate(zip(table["split"], table["row"])):
            volume = np.asarray(store.array(split)[int(row), 0], dtype=np.float32)
            rows[i, :n_vbm] = volume[mask]  # C order of the mask: numpy boolean indexing
        rows.flush()
        del rows
        os.replace(tmp_npy, npy)
        tmp_tsv = out / f".{part}.tmp.tsv"
        _kit_table(table, store.path).to_csv(tmp_tsv, sep="\t", index=False)
        os.replace(tmp_tsv, tsv)
        written[part] = npy
        written[f"{part}_table"] = tsv
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m brainage_core.data ramp-rows``."""
    parser.add_argument("store", help="prepared full-grid VBM store folder")
    parser.add_argument("--out", required=True, help="folder to write train/test .npy/.tsv and the mask into")
    parser.add_argument(
        "--width", type=int, default=RAMP_WIDTH,
        help=f"values per row (default: the kit's {RAMP_WIDTH:,}; smaller only for quick tests)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the sub-command; returns the exit status (1 on input errors, one line on stderr)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        written = write_ramp_rows(args.store, args.out, width=args.width)
    except BrainageError as exc:
        print(f"ramp-rows: error: {exc}", file=sys.stderr)
        return 1
    for name, path in written.items():
        print(f"{name}: {path}")
    print(f"VBM_MASK={written['mask']}")
    return 0
