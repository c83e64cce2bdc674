"""Where OpenBHB keeps its files, and the RAMP kit's mask convention: the one definition.

The per-subject OpenBHB distribution (``docs/evaluation.md``, "The data set")::

    participants.tsv
    <folder>/derivatives/sub-<id>/ses-1/sub-<id>_preproc-cat12vbm_desc-gm_T1w.npy   (VBM)
    <folder>/derivatives/sub-<id>/ses-1/sub-<id>_preproc-quasiraw_T1w.npy           (quasi-raw)

``<folder>`` is ``train`` for the train split and ``val`` for both test splits. The reader
(``readers.OpenBHBReader``) finds files with :data:`OPENBHB_GLOB`; the synthetic cohort
(``synthetic.generate_cohort``) and its QC mosaic (``qc.py``) write and read them with
:func:`subject_relpath`. The synthetic cohort's NIfTI output uses ``sub-<id>/ses-1/anat/sub-<id>_desc-gm_T1w.nii``.

RAMP flat rows hold the VBM voxels where the CAT12 grey-matter probability map exceeds
:data:`MASK_THRESHOLD`, in C order of the mask array (``readers``, ``ramp_rows``, and the exported
``estimator.py``).
"""

from __future__ import annotations

__all__ = ["MASK_THRESHOLD", "OPENBHB_SUFFIX", "PARTICIPANTS_COLUMNS", "SESSION", "SPLIT_FOLDERS", "VOLUME_COLUMNS",
           "openbhb_glob", "split_folder", "subject_relpath"]

#: the columns of the distribution's ``participants.tsv``, in its order
PARTICIPANTS_COLUMNS: tuple[str, ...] = (
    "participant_id", "study", "sex", "age", "site", "diagnosis", "tiv", "csfv", "gmv", "wmv",
    "magnetic_field_strength", "acquisition_setting", "siteXacq", "split",
)
#: the volume figures among them (millilitres; computed from each subject's maps)
VOLUME_COLUMNS: tuple[str, ...] = ("tiv", "csfv", "gmv", "wmv")

#: per-subject file name suffix, by modality
OPENBHB_SUFFIX: dict[str, str] = {
    "vbm": "_preproc-cat12vbm_desc-gm_T1w.npy",
    "quasiraw": "_preproc-quasiraw_T1w.npy",
}
#: the session folder the distribution (and the synthetic cohort) writes
SESSION = "ses-1"
#: the folder each split lives in
SPLIT_FOLDERS: dict[str, str] = {"train": "train", "internal_test": "val", "external_test": "val"}
#: a VBM voxel belongs to the RAMP rows where the CAT12 GM probability exceeds this
MASK_THRESHOLD = 0.05


def split_folder(split: str) -> str:
    """``train`` for the train split, ``val`` for any other (the test splits)."""
    return "train" if split == "train" else "val"


def openbhb_glob(modality: str = "vbm") -> str:
    """The glob pattern, relative to the cohort root, matching every subject file of ``modality``."""
    return f"*/derivatives/sub-*/ses-*/sub-*{OPENBHB_SUFFIX[modality]}"


def subject_relpath(participant_id: str, split: str, fmt: str = "openbhb", modality: str = "vbm") -> str:
    """A subject's file relative to the cohort folder (POSIX separators). ``participant_id`` without the
    ``sub-`` prefix; ``fmt``: ``openbhb`` (the distribution's layout) or ``nifti`` (the synthetic cohort's
    NIfTI output, split-independent)."""
    pid = str(participant_id)
    if fmt == "openbhb":
        return f"{split_folder(split)}/derivatives/sub-{pid}/{SESSION}/sub-{pid}{OPENBHB_SUFFIX[modality]}"
    return f"sub-{pid}/{SESSION}/anat/sub-{pid}_desc-gm_T1w.nii"
