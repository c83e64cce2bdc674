"""The synthetic multi-site OpenBHB-like cohort (``python -m brainage_core.data synth``).

The generative model is the one of ``docs/synthetic-cohort.md`` (version 2); per subject with age a,
sex and site s (all randomness from the cohort seed and the subject's plan index, so any subject can
be regenerated alone):

1. biological age ``bio = a + N(0, 3·clip(a/30, 0.35, 1.5))``;
2. one displacement field, applied with a single linear resampling of the GM template: subject
   anatomy (smooth random field, SD 2.5 mm per axis) + ventricle expansion (outward field around the
   lateral ventricles, ``0.5 + 7·t^2.5`` mm with ``t = (bio − 6)/82``) + a per-site registration shift
   (N(0, 0.75 mm) per axis) + 0.3 mm per subject;
3. grey-matter ageing (tissue loss) ``× (1 − loss(bio)·(0.6·regional + 0.4·closeness to CSF))`` with
   ``loss(a) = 0.06·tanh((a − 6)/8) + 0.24·t``;
4. site segmentation of the *aged* tissue, regionally varying:
   ``p' = sigmoid(k_s(x)·logit(p) + b_s(x))`` with ``b_s(x) = b_s + 0.35·f_s(x)``, ``b_s ~ N(0, 0.35)``,
   and ``log k_s(x) = log k_s + 0.12·g_s(x)``, ``log k_s ~ N(0, 0.12)``; ``f_s``, ``g_s`` are per-site
   unit-variance smooth fields of 25 mm correlation (tissue contrast, hence CAT12's classification of
   partial-volume voxels, varies across the head with coil sensitivity and B1 inhomogeneity, and differs
   between scanners region by region, e.g. deep grey matter versus cortex). A field has hundreds of
   degrees of freedom, so a linear model trained on a few dozen sites cannot become invariant to a new
   site's field; segmenting after ageing makes the site's local contrast decide how much of the
   age-related loss shows in the map (an age-dependent site effect);
5. Jacobian-like modulation: head size ``exp(N(0, 0.07))·(1.05 male | 0.95 female)`` and a smooth
   ``1 + 0.04·field``;
6. site acquisition: native voxel size (in-plane U(0.9, 1.3) mm, slice one of 1, 1, 1.2, 1.5, 2 mm,
   along a per-site axis) applied by resampling down and up, Gaussian blur FWHM U(0, 3) mm, a per-site
   smooth bias field (amplitude U(2 %, 8 %), ×U(0.7, 1.3) per subject), gain ``1 + N(0, 0.06)``,
   offset N(0, 0.01), smoothed noise SD ``0.005 + U(0, 0.03)``; clip at 0; × dilated brain mask.

Departures from the first version of the model (documented with their measurements in
``docs/realism.md``): the regional segmentation fields of step 4, and segmentation after ageing
(version 1 segmented before ageing). With only version 1's scalar site effects, a ridge trained on 56 sites became
invariant to them and unseen sites were not predicted worse than seen ones.

``strength`` multiplies every site deviation *from the cohort average* (registration shift,
segmentation bias and slope and their regional fields, bias-field amplitude, gain, offset, and the
departures of voxel size, blur and noise from their means): 0 = every site acquires alike. Volumes
are float32, about 0…1.25.

Coarse grids run the same steps at their own resolution (millimetre parameters converted to voxels;
noise SD scaled by ``factor^-1.5``, the effect of block-averaging finely correlated noise).

Layout written (``fmt="openbhb"``): ``participants.tsv`` (the real OpenBHB columns) and
``{train|val}/derivatives/sub-<id>/ses-1/sub-<id>_preproc-cat12vbm_desc-gm_T1w.npy`` (float32,
(1, 1, D, H, W)); ``fmt="nifti"``: ``sub-<id>/ses-1/anat/sub-<id>_desc-gm_T1w.nii`` on the grid's
affine, and a ``path`` column in the table.

Long (over 400 lines) for a reason: this docstring is the generative model's specification, next to
the code of each step; the cohort plan and the anatomy are already apart (``cohort_plan.py``,
``synthetic_anatomy.py``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from brainage_core.data.cohort_plan import (
    SITE_STREAM,
    SPLITS,
    SUBJECT_STREAM,
    plan_cohort,
)
from brainage_core.data.layout import PARTICIPANTS_COLUMNS, subject_relpath
from brainage_core.data.synthetic_anatomy import field_weights, load_anatomy, smooth_field
from brainage_core.errors import ConfigError
from brainage_core.grids import GRID_FACTORS, GRID_NAMES, check_grid

#: participants.tsv columns, in the real OpenBHB order (NIfTI output appends ``path``).
TABLE_COLUMNS: tuple[str, ...] = PARTICIPANTS_COLUMNS
FORMATS: tuple[str, ...] = ("openbhb", "nifti")

#: Bumped whenever the generative model changes what a (seed, subject) pair produces, so that
#: cached cohorts (brainage_core.data.sources) made by an older generator are not reused.
GENERATOR_VERSION = 2

ANATOMY_SD_MM = 2.5
#: Gaussian correlation scales (mm) of the smooth random fields.
ANATOMY_SMOOTH_MM = 12.0
MODULATION_SMOOTH_MM = 12.0
BIAS_SMOOTH_MM = 30.0
SUBJECT_SHIFT_MM = 0.3
SLICE_CHOICES_MM = (1.0, 1.0, 1.2, 1.5, 2.0)
INPLANE_RANGE_MM = (0.9, 1.3)
FWHM_RANGE_MM = (0.0, 3.0)
NOISE_RANGE = (0.0, 0.03)
NOISE_FLOOR = 0.005
NOISE_SMOOTH_VOXELS = 0.7  # sigma of the noise's Gaussian correlation, in full-grid voxels
#: Per-site *regional* segmentation differences: smooth fields (Gaussian correlation scale in mm) added to
#: the site's logit bias b_s and log slope log k_s, with the same SDs as the global draws.
SEG_FIELD_SMOOTH_MM = 25.0
SEG_BIAS_FIELD_SD = 0.35
SEG_SLOPE_FIELD_SD = 0.12


@dataclass(frozen=True)
class SiteEffects:
    """One site's acquisition and processing signature, at strength 1 (deviations from the average)."""

    shift_mm: np.ndarray  # (3,) registration shift, voxel axes
    seg_bias: float
    seg_log_slope: float
    inplane_mm: float
    slice_mm: float
    slice_axis: int
    fwhm_mm: float
    bias_amplitude: float
    bias_coefficients: np.ndarray  # (K, K, K) coefficients of a unit-variance field (field_weights)
    gain: float
    offset: float
    noise: float  # U(0, 0.03) draw; SD = NOISE_FLOOR + noise at strength 1
    seg_bias_coefficients: np.ndarray  # (K, K, K) unit-variance field (SEG_FIELD_SMOOTH_MM) added to seg_bias
    seg_slope_coefficients: np.ndarray  # same, added to seg_log_slope


def _field_coefficients(rng: np.random.Generator, smooth_mm: float) -> np.ndarray:
    """Random coefficients of a unit-variance smooth field of correlation scale ``smooth_mm``."""
    weights = field_weights(float(smooth_mm))
    return rng.standard_normal(weights.shape, dtype=np.float32) * weights


@lru_cache(maxsize=256)
def site_effects(site_xacq: int, seed: int) -> SiteEffects:
    """The signature of site ``site_xacq`` in the cohort of seed ``seed`` (independent of the plan)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), SITE_STREAM, int(site_xacq)]))
    return SiteEffects(
        shift_mm=rng.normal(0.0, 0.75, 3),
        seg_bias=float(rng.normal(0.0, 0.35)),
        seg_log_slope=float(rng.normal(0.0, 0.12)),
        inplane_mm=float(rng.uniform(*INPLANE_RANGE_MM)),
        slice_mm=float(rng.choice(SLICE_CHOICES_MM)),
        slice_axis=int(rng.integers(3)),
        fwhm_mm=float(rng.uniform(*FWHM_RANGE_MM)),
        bias_amplitude=float(rng.uniform(0.02, 0.08)),
        bias_coefficients=_field_coefficients(rng, BIAS_SMOOTH_MM),
        gain=float(rng.normal(0.0, 0.06)),
        offset=float(rng.normal(0.0, 0.01)),
        noise=float(rng.uniform(*NOISE_RANGE)),
        seg_bias_coefficients=_field_coefficients(rng, SEG_FIELD_SMOOTH_MM),
        seg_slope_coefficients=_field_coefficients(rng, SEG_FIELD_SMOOTH_MM),
    )


def _subject_rngs(seed: int, index: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    """(scalars, fields, noise) generators of plan row ``index``: the scalars stream is also what the
    participants table's volume figures use, so the plan alone reproduces them."""
    children = np.random.SeedSequence([int(seed), SUBJECT_STREAM, int(index)]).spawn(3)
    return tuple(np.random.default_rng(c) for c in children)  # type: ignore[return-value]


def ageing_t(bio: float) -> float:
    """Normalised adult ageing time t = (bio − 6) / 82 (0 at 6 y, 1 at 88 y)."""
    return (bio - 6.0) / 82.0


def gm_loss(bio: float) -> float:
    """Fraction of grey matter lost by biological age ``bio`` (years): pruning then ~30 % by 88 y."""
    return 0.06 * np.tanh((bio - 6.0) / 8.0) + 0.24 * ageing_t(bio)


@dataclass(frozen=True)
class SubjectScalars:
    bio_age: float
    head_scale: float


def subject_scalars(age: float, sex: str, index: int, seed: int) -> SubjectScalars:
    """Biological age and head-size factor of plan row ``index``."""
    rng, _, _ = _subject_rngs(seed, index)
    sd = 3.0 * float(np.clip(age / 30.0, 0.35, 1.5))
    bio = float(age + rng.normal(0.0, sd))
    head = float(np.exp(rng.normal(0.0, 0.07)) * (0.95 if str(sex) == "female" else 1.05))
    return SubjectScalars(bio, head)


def nominal_volumes(scalars: SubjectScalars) -> dict[str, float]:
    """Nominal tissue volumes (ml) for the participants table: TIV scales with head size, the grey-matter
    share falls with biological age as the model's GM loss, white matter peaks in mid-life."""
    t = ageing_t(scalars.bio_age)
    tiv = 1450.0 * scalars.head_scale
    gmv = tiv * 0.50 * (1.0 - gm_loss(scalars.bio_age))
    wmv = tiv * (0.33 + 0.04 * np.tanh((scalars.bio_age - 6.0) / 15.0) - 0.06 * max(t - 0.4, 0.0))
    return {"tiv": tiv, "csfv": tiv - gmv - wmv, "gmv": gmv, "wmv": wmv}


def _row_value(plan_row: object, key: str) -> object:
    return plan_row[key]  # type: ignore[index]


def make_subject(plan_row: pd.Series | dict, grid: str, strength: float, seed: int) -> np.ndarray:
    """Generate one subject's grey-matter map, float32 (D, H, W) on ``grid``, values ≥ 0 (≈ 0…1.25).

    ``plan_row`` needs ``index``, ``age``, ``sex`` and ``siteXacq`` (a row of :func:`plan_cohort`).
    Pure function of (plan_row, grid, strength, seed).
    """
    check_grid(grid)
    anat = load_anatomy(grid)
    index, age = int(_row_value(plan_row, "index")), float(_row_value(plan_row, "age"))
    sex, sx = str(_row_value(plan_row, "sex")), int(_row_value(plan_row, "siteXacq"))
    s = float(strength)
    site = site_effects(sx, int(seed))
    scalars = subject_scalars(age, sex, index, seed)
    _, rng, noise_rng = _subject_rngs(seed, index)
    voxel, factor = anat.voxel_mm, GRID_FACTORS[grid]

    # 2. One displacement (voxels) and one linear resampling of the GM template.
    t = ageing_t(scalars.bio_age)
    ventricle_mm = 0.5 + 7.0 * max(t, 0.0) ** 2.5
    shift = (s * site.shift_mm + rng.normal(0.0, SUBJECT_SHIFT_MM, 3)) / voxel
    coords = anat.coords.copy()
    for axis in range(3):
        field = smooth_field(_field_coefficients(rng, ANATOMY_SMOOTH_MM), grid)
        coords[axis] -= (ANATOMY_SD_MM / voxel) * field + ventricle_mm * anat.ventricle_push[axis] + shift[axis]
    gm = ndimage.map_coordinates(anat.gm, coords, order=1, mode="constant", cval=0.0, output=np.float32)
    del coords

    # 3. Grey-matter ageing (tissue loss in the subject's own space), *before* the site's segmentation:
    # the scanner segments the aged brain, so its contrast decides how the loss shows in the GM map.
    loss = gm_loss(scalars.bio_age)
    modulation = smooth_field(_field_coefficients(rng, MODULATION_SMOOTH_MM), grid)
    gm *= 1.0 - loss * (0.6 * anat.regional + 0.4 * anat.csf_closeness)

    # 4. Site segmentation, regionally varying: p' = sigmoid(k_s(x)·logit(p) + b_s(x)).
    if s != 0.0:
        inside = gm > 1e-4
        bias = s * (site.seg_bias + SEG_BIAS_FIELD_SD * smooth_field(site.seg_bias_coefficients, grid)[inside])
        log_slope = s * (
            site.seg_log_slope + SEG_SLOPE_FIELD_SD * smooth_field(site.seg_slope_coefficients, grid)[inside]
        )
        p = np.clip(gm[inside], 1e-4, 1.0 - 1e-4)
        gm[inside] = 1.0 / (1.0 + np.exp(-(np.exp(log_slope) * np.log(p / (1.0 - p)) + bias)))

    # 5. Jacobian-like modulation: head size and a smooth subject field.
    gm *= scalars.head_scale * (1.0 + 0.04 * modulation)

    # 6. Site acquisition.
    native = np.full(3, 1.1 + s * (site.inplane_mm - 1.1))
    native[site.slice_axis] = np.mean(SLICE_CHOICES_MM) + s * (site.slice_mm - np.mean(SLICE_CHOICES_MM))
    zoom = np.minimum(1.0, voxel / np.maximum(native, 1e-3))
    if np.any(zoom < 0.999):
        low = ndimage.zoom(gm, zoom, order=1, mode="nearest", grid_mode=True)
        gm = ndimage.zoom(low, np.array(gm.shape) / np.array(low.shape), order=1, mode="nearest", grid_mode=True)
        gm = np.ascontiguousarray(gm[: anat.shape[0], : anat.shape[1], : anat.shape[2]], dtype=np.float32)
    fwhm = max(0.0, np.mean(FWHM_RANGE_MM) + s * (site.fwhm_mm - np.mean(FWHM_RANGE_MM)))
    sigma = fwhm / 2.3548 / voxel
    if sigma > 0.05:
        gm = ndimage.gaussian_filter(gm, sigma, truncate=3.0)
    if s != 0.0:
        bias = smooth_field(site.bias_coefficients, grid)
        gm *= 1.0 + s * site.bias_amplitude * rng.uniform(0.7, 1.3) * bias
        gm *= 1.0 + s * site.gain
        gm += s * site.offset
    noise_sd = max(0.002, NOISE_FLOOR + np.mean(NOISE_RANGE) + s * (site.noise - np.mean(NOISE_RANGE)))
    noise = ndimage.gaussian_filter(noise_rng.standard_normal(anat.shape, dtype=np.float32), NOISE_SMOOTH_VOXELS)
    noise *= noise_sd * factor**-1.5 / max(float(noise.std()), 1e-12)
    gm += noise
    np.clip(gm, 0.0, None, out=gm)
    gm *= anat.output_mask
    return gm.astype(np.float32, copy=False)


def participants_table(plan: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The participants table (:data:`TABLE_COLUMNS`) of a plan, volume figures included (no volumes needed)."""
    table = plan.copy()
    vols = [
        nominal_volumes(subject_scalars(float(r.age), str(r.sex), int(r.index), seed)) for r in plan.itertuples()
    ]
    for key in ("tiv", "csfv", "gmv", "wmv"):
        table[key] = np.round([v[key] for v in vols], 2)
    return table[list(TABLE_COLUMNS)]


def _write_subject(task: tuple[dict, str, float, int, str, str]) -> int:
    """Generate and write one subject atomically (tmp file + rename); returns its plan index."""
    from threadpoolctl import threadpool_limits

    row, grid, strength, seed, fmt, out = task
    with threadpool_limits(1):  # identical float results whatever the worker's BLAS threading
        volume = make_subject(row, grid, strength, seed)
    path = Path(out) / subject_relpath(row["participant_id"], row["split"], fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # keeps the suffix nibabel reads the format from
    if fmt == "openbhb":
        with tmp.open("wb") as fh:
            np.save(fh, volume[None, None])
    else:
        import nibabel as nib

        from brainage_core.grids import grid_affine

        img = nib.Nifti1Image(volume, grid_affine(grid))
        img.header.set_data_dtype(np.float32)
        nib.save(img, str(tmp))
    os.replace(tmp, path)
    return int(row["index"])


def _warm_worker(grid: str) -> None:
    load_anatomy(grid)


def generate_cohort(
    out: str | Path,
    *,
    subjects: int | None = None,
    full: bool = False,
    sites: int | None = None,
    grid: str = "6mm",
    strength: float = 1.5,
    age_confound: float = 1.0,
    seed: int = 0,
    fmt: str = "openbhb",
    workers: int = 1,
    progress: bool = True,
    plan_only: bool = False,
) -> pd.DataFrame:
    """Write the synthetic cohort to ``out`` and return its participants table.

    Volumes are written first, ``participants.tsv`` last (a folder without it is incomplete).
    ``plan_only`` writes only the table (same content). Same arguments → byte-identical files.
    """
    if grid not in GRID_NAMES:
        raise ConfigError(f"synthetic.grid={grid!r}: expected one of {', '.join(GRID_NAMES)}")
    if fmt not in FORMATS:
        raise ConfigError(f"synthetic format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not np.isfinite(strength) or strength < 0:
        raise ConfigError(f"synthetic.strength={strength!r}: expected a finite number ≥ 0")
    if int(workers) < 1:
        raise ConfigError(f"synthetic workers={workers!r}: expected an integer ≥ 1")
    plan = plan_cohort(subjects=subjects, full=full, sites=sites, age_confound=age_confound, seed=seed)
    table = participants_table(plan, seed)
    if fmt == "nifti":
        table["path"] = [subject_relpath(p, s, fmt) for p, s in zip(table["participant_id"], table["split"])]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not plan_only:
        rows = plan.to_dict("records")
        tasks = [(r, grid, float(strength), int(seed), fmt, str(out)) for r in rows]
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc=f"synth {grid}", unit="subj", disable=not progress, file=sys.stderr)
        if int(workers) == 1:
            for task in tasks:
                _write_subject(task)
                bar.update()
        else:
            ctx = multiprocessing.get_context("spawn")  # safe even when torch is loaded in the parent
            with ProcessPoolExecutor(int(workers), mp_context=ctx, initializer=_warm_worker, initargs=(grid,)) as pool:
                chunk = max(1, min(16, len(tasks) // (4 * int(workers))))
                for _ in pool.map(_write_subject, tasks, chunksize=chunk):
                    bar.update()
        bar.close()
    tmp = out / "participants.tsv.tmp"
    table.to_csv(tmp, sep="\t", index=False, lineterminator="\n")
    os.replace(tmp, out / "participants.tsv")
    return table


def describe(table: pd.DataFrame) -> str:
    """One line: how many subjects, per split, over how many sites."""
    per_split = " / ".join(f"{s} {int((table['split'] == s).sum())}" for s in SPLITS)
    return f"{len(table)} subjects ({per_split}) over {table['siteXacq'].nunique()} sites"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="cohort folder to write")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--subjects", type=int, help="approximate number of subjects (real counts scaled down)")
    size.add_argument("--full", action="store_true", help="the real OpenBHB counts (3,227 / 362 / 395)")
    parser.add_argument("--sites", type=int, default=None, help="keep K sites: K-1 largest internal + 1 external")
    parser.add_argument("--grid", choices=GRID_NAMES, default="full", help="output grid (default: full)")
    parser.add_argument("--strength", type=float, default=1.5, help="site-effect strength (0 = none)")
    parser.add_argument("--age-confound", type=float, default=1.0, help="1 = real per-site ages, 0 = pooled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="openbhb")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--qc", type=Path, default=None, help="also write a PNG mosaic of a few subjects")
    parser.add_argument("--plan-only", action="store_true", help="write participants.tsv only (no volumes)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    table = generate_cohort(
        args.out,
        subjects=args.subjects,
        full=args.full,
        sites=args.sites,
        grid=args.grid,
        strength=args.strength,
        age_confound=args.age_confound,
        seed=args.seed,
        fmt=args.fmt,
        workers=args.workers,
        progress=not args.quiet,
        plan_only=args.plan_only,
    )
    verb = "planned" if args.plan_only else "wrote"
    print(f"{verb} {describe(table)} on grid {args.grid} to {args.out}")
    if args.qc is not None:
        if args.plan_only:
            raise ConfigError("--qc needs the volumes; drop --plan-only")
        from brainage_core.data.qc import write_qc_mosaic

        write_qc_mosaic(args.out, table, args.qc, fmt=args.fmt)
        print(f"QC mosaic: {args.qc}")
    return 0
