"""``python study/predict.py SUBMISSION_DIR COHORT --layout {openbhb,nifti} --out predictions.csv``.

Brain age of a new cohort from an exported submission (``study/export.py``): the cohort is prepared on
the model's grid (``brainage_core.data.prepare``, the same checks and preprocessing as training), the
network in ``weights.pth`` gives the features of the inputs it was trained on (``model_spec``'s ``zscore``
/ ``crop``: the training's deterministic transform, ``brainage_core.export.ramp.centered_view``), and
the age probe in ``metadata.pkl`` the brain age.

Output CSV, one row per subject: ``participant_id``, ``split``, ``site``, ``age`` (years, as given),
``brain_age``, ``brain_age_gap`` (brain_age − age) and the usual linear bias correction fitted at export
on the study's validation data (brain_age ≈ slope · age + intercept):
``brain_age_gap_corrected`` = brain_age − (slope · age + intercept) and ``brain_age_corrected`` = age +
corrected gap. Beside it, ``<out stem>_by_age.csv`` and ``<out stem>_by_site.csv``: n, MAE, mean gap and
mean corrected gap per age bin (``--age-bins`` edges, years) and per site; both are printed.
True ages are optional (the normal case for a new cohort): the participants table may lack the ``age``
column or leave cells empty (``prepare(..., require_age=False)``; ages that are given are still checked).
Every subject gets ``brain_age``; ``age`` and the gap / corrected columns are NaN where the age is
unknown (the correction needs the true age). The summaries cover the subjects with a known age only;
when none has one they are not written and a note is printed instead.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainage_core.errors import BrainageError, DataError
from study.storage import fetch_tree, is_uri

DEFAULT_AGE_BINS = (0, 10, 20, 30, 40, 50, 60, 70, 80, 120)
LAYOUTS = ("openbhb", "nifti")


def load_submission(submission: str | Path):
    """(model in eval mode on the CPU, metadata dict) of an exported submission folder: a local path, or
    a URI (``s3://...``, ``gs://...``) downloaded into ``$BRAINAGE_CACHE/submissions/<sha1 of the URI>``.

    ``DataError`` naming the file when ``metadata.pkl`` or ``weights.pth`` is missing or lacks a key.
    """
    import torch

    from brainage_core.export import METADATA_FILE, WEIGHTS_FILE
    from brainage_core.models import build_model

    if is_uri(submission):
        import hashlib

        from brainage_core.data.sources import cache_dir_of

        digest = hashlib.sha1(str(submission).encode()).hexdigest()[:16]
        submission = fetch_tree(str(submission), cache_dir_of() / "submissions" / digest)
    submission = Path(submission)
    meta_path, weights_path = submission / METADATA_FILE, submission / WEIGHTS_FILE
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise DataError(f"{path} not found; expected a submission folder written by study/export.py")
    try:
        meta = pd.read_pickle(meta_path)
    except Exception as exc:  # pickle raises many types on a truncated or foreign file
        raise DataError(f"{meta_path}: unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); "
                        "expected the metadata written by study/export.py") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: holds a {type(meta).__name__}; expected the metadata dict of study/export.py")
    missing = [k for k in ("model_spec", "age_probe") if k not in meta]
    if missing:
        raise DataError(f"{meta_path} lacks {', '.join(missing)}; expected the metadata written by study/export.py")
    spec = meta["model_spec"]
    options: dict[str, Any] = {"base_width": int(spec["base_width"])}
    if spec["head"] == "contrastive":
        options.update(proj_dim=int(spec["proj_dim"]), normalize=bool(spec["normalize"]), feature=spec["feature"])
    model = build_model(spec["backbone"], spec["head"], **options)
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated / corrupt file: zip, pickle or runtime errors
        raise DataError(f"{weights_path}: unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); "
                        "expected the weights written by study/export.py") from None
    if not isinstance(state, dict) or "model" not in state:
        raise DataError(f"{weights_path} holds no 'model' state dict; expected {{'model': state_dict}}")
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError) as exc:
        raise DataError(f"{weights_path}: weights do not fit the model of metadata.pkl "
                        f"({' '.join(str(exc).split())[:160]}); expected the files of one export") from None
    return model.eval(), meta


def bias_corrected(brain_age: np.ndarray, age: np.ndarray, bias: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """(corrected gap, corrected brain age) with brain_age ≈ slope · age + intercept; NaN without a correction."""
    if not bias:
        nan = np.full_like(brain_age, np.nan, dtype=float)
        return nan, nan.copy()
    expected = bias["slope"] * age + bias["intercept"]
    gap = brain_age - expected
    return gap, age + gap


def summarise(predictions: pd.DataFrame, by: str) -> pd.DataFrame:
    """n, MAE, mean gap and mean corrected gap per value of column ``by`` (rows with a known age only)."""
    known = predictions[predictions["age"].notna()]
    grouped = known.groupby(by, observed=True, sort=True)
    return pd.DataFrame(
        {
            "n": grouped.size(),
            "mae": grouped.apply(lambda g: float(np.mean(np.abs(g["brain_age"] - g["age"]))), include_groups=False),
            "mean_gap": grouped["brain_age_gap"].mean(),
            "mean_gap_corrected": grouped["brain_age_gap_corrected"].mean(),
        }
    ).reset_index()


def predict_cohort(
    submission: str | Path,
    cohort: str | Path,
    *,
    layout: str,
    out: str | Path,
    store: str | Path | None = None,
    resample: bool = False,
    on_error: str = "raise",
    device: str = "cpu",
    batch_size: int = 8,
    age_bins: tuple[float, ...] = DEFAULT_AGE_BINS,
) -> dict[str, Path]:
    """Write the predictions CSV and the per-age-bin / per-site summaries; return their paths.

    Returns ``{"predictions": csv}`` plus ``"by_age"`` and ``"by_site"`` when at least one subject has
    a known age (otherwise no summary is written and stale ones at those paths are removed).
    ``store``: where to keep the prepared cohort (default: a temporary folder, deleted afterwards).
    Errors: ``DataError``/``ConfigError`` from the submission or ``prepare``.
    """
    from brainage_core.data.prepare import prepare
    from brainage_core.evaluation import extract_features
    from brainage_core.export.ramp import centered_view

    if layout not in LAYOUTS:
        raise DataError(f"--layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    model, meta = load_submission(submission)
    model = centered_view(model.to(device), meta["model_spec"])
    grid = meta["model_spec"]["grid"]
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="brainage-predict-") as scratch:
        prepared = prepare(cohort, layout=layout, out=store or Path(scratch) / "store", grid=grid,
                           resample=resample, on_error=on_error, progress=False, require_age=False,
                           allow_missing_site=True)  # prediction has no site probe
        parts = []
        for split in prepared.splits:
            table = prepared.table(split)
            features = extract_features(model, prepared.array(split), table["row"].to_numpy(),
                                        batch_size=batch_size, device=device)
            part = table[["participant_id", "split", "site", "age"]].copy()
            part["brain_age"] = np.asarray(meta["age_probe"].predict(features.astype(np.float32)), dtype=float)
            parts.append(part)
    predictions = pd.concat(parts, ignore_index=True)
    age = predictions["age"].to_numpy(dtype=float)
    predictions["brain_age_gap"] = predictions["brain_age"] - age
    gap, corrected = bias_corrected(predictions["brain_age"].to_numpy(), age, meta.get("bias_correction"))
    predictions["brain_age_gap_corrected"] = gap
    predictions["brain_age_corrected"] = corrected
    out.parent.mkdir(parents=True, exist_ok=True)
    predictions.to_csv(out, index=False)
    summaries = {"by_age": out.with_name(f"{out.stem}_by_age.csv"), "by_site": out.with_name(f"{out.stem}_by_site.csv")}
    if predictions["age"].notna().sum() == 0:
        for path in summaries.values():  # a summary left by an earlier run would describe another cohort
            path.unlink(missing_ok=True)
        return {"predictions": out}
    predictions["age_bin"] = pd.cut(predictions["age"], bins=list(age_bins), right=False)
    by_age = summarise(predictions, "age_bin")
    by_age["age_bin"] = by_age["age_bin"].astype(str)
    by_age.to_csv(summaries["by_age"], index=False)
    summarise(predictions, "site").to_csv(summaries["by_site"], index=False)
    return {"predictions": out, **summaries}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python study/predict.py", description=__doc__.splitlines()[0],
        allow_abbrev=False)
    parser.add_argument("submission", metavar="SUBMISSION_DIR",
                        help="folder written by study/export.py (or its copy at s3://... / gs://...)")
    parser.add_argument("cohort", metavar="COHORT", help="cohort folder (nifti layout: or its participants table)")
    parser.add_argument("--layout", choices=LAYOUTS, required=True)
    parser.add_argument("--out", default="predictions.csv", help="CSV to write (default predictions.csv)")
    parser.add_argument("--store", default=None, help="keep the prepared cohort here (default: temporary)")
    parser.add_argument("--resample", action="store_true", help="nifti: resample other grids by their affine")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--age-bins", default=",".join(map(str, DEFAULT_AGE_BINS)),
                        help="comma-separated bin edges in years (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        bins = tuple(float(b) for b in args.age_bins.split(","))
    except ValueError:
        print(f"predict: error: --age-bins {args.age_bins!r}; expected comma-separated numbers", file=sys.stderr)
        return 2
    try:
        paths = predict_cohort(args.submission, args.cohort, layout=args.layout, out=args.out, store=args.store,
                               resample=args.resample, on_error=args.on_error, device=args.device,
                               batch_size=args.batch_size, age_bins=bins)
    except BrainageError as exc:
        print(f"predict: error: {exc}", file=sys.stderr)
        return 2
    if "by_age" not in paths:
        print("no subject has a known age: MAE per age bin and per site skipped (brain ages only)\n")
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        for name in ("by_age", "by_site"):
            if name in paths:
                print(f"MAE {name.replace('_', ' ')}:\n{pd.read_csv(paths[name]).to_string(index=False)}\n")
    print(f"predictions written: {paths['predictions'].resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
