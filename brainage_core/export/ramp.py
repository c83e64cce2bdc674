"""Write a trained model as a RAMP submission for the brain-age challenge (``docs/evaluation.md``).

A submission folder holds:

- ``estimator.py``: self-contained (torch, numpy, nibabel, scikit-learn; not this project). It inlines
  the model's family file and ``heads.py`` (``brainage_core.models.family_source_files``) and a small
  estimator that replays the prepared store's preprocessing exactly: a flat VBM row's first
  ``count(VBM_MASK > 0.05)`` values are placed into the mask's voxels in C order on the 121×145×121
  grid (zeros elsewhere), the volume is block-averaged to the model's grid in float32 (the code of
  ``brainage_core.grids.block_average``, copied) and cast to float16, as ``prepare`` does for the
  ``ramp`` layout. The network then sees the training's deterministic input transform
  (``brainage_core.data.augment.DeviceAugment.center`` for the trial's ``training.augment``: per-volume
  z-scoring and/or the centred crop + zero-padding), replicated in plain torch. The file contains
  none of the RAMP sanitizer's forbidden substrings (checked here with the project's strict list, any
  case, and with ramp-workflow's own sanitizer when installed).
- ``weights.pth``: ``{"model": state_dict}`` (loadable with ``torch.load(weights_only=True)``).
- ``metadata.pkl``: a plain dict (read with ``pandas.read_pickle``) written by the caller.

The workflow's calling contract: env ``VBM_MASK``/``QUASIRAW_MASK`` set, ``get_estimator()``,
``fit(None, None)`` (restores ``weights.pth`` next to ``estimator.py``, returns the pipeline), the
``indices`` attribute set on the step (rows to use; None means all), ``predict(X)`` on the whole
memory-mapped flat array, processed in batches of ``batch_size`` rows -> float32 (rows, p), p ≤ 10,000.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from brainage_core.data.augment import CROP_LENGTH_FULL, PAD_TO_FULL
from brainage_core.errors import BrainageError, ConfigError
from brainage_core.grids import GRID_FACTORS, GRID_SHAPES

ESTIMATOR_FILE = "estimator.py"
WEIGHTS_FILE = "weights.pth"
METADATA_FILE = "metadata.pkl"

#: Substrings the RAMP platform's sanitizer rejects anywhere in estimator.py (matched here in any case,
#: stricter than ramp-workflow's own patterns).
SANITIZER_WORDS: tuple[str, ...] = (
    "subprocess",
    "Popen",
    "shutil",
    "rmtree",
    "copytree",
    "fdopen",
    "fchmod",
    "fchown",
    "ftruncate",
    "open",
    "listdir",
    "scandir",
    "removedirs",
)

#: The challenge's limit on the feature dimension.
MAX_FEATURES = 10_000


class ExportError(BrainageError):
    """A model or a generated submission cannot be exported (names the file, key or word at fault)."""


@dataclass(frozen=True)
class ModelSpec:
    """What ``estimator.py`` needs to rebuild the network and its input.

    ``backbone``: key of ``brainage_core.models.BACKBONES``; ``head``: ``contrastive`` | ``regression``;
    ``proj_dim``/``normalize``/``feature``: contrastive head options (ignored for regression);
    ``grid``: the model's input grid (``full``/``3mm``/``6mm``); ``feature_dim``: p;
    ``batch_size``: rows per forward pass in ``predict``; ``zscore``/``crop``: the trial's
    ``training.augment`` options, i.e. which deterministic input transform the network expects
    (``DeviceAugment.center``; both False for submissions exported before these fields existed).
    """

    backbone: str
    head: str
    base_width: int
    proj_dim: int
    normalize: bool
    feature: str
    grid: str
    feature_dim: int
    batch_size: int = 8
    zscore: bool = False
    crop: bool = False


def model_spec(model: nn.Module, config: dict[str, Any], *, grid: str, batch_size: int = 8) -> ModelSpec:
    """The :class:`ModelSpec` of a model built by ``brainage_core.models.build_model`` from ``config``.

    Head options are read from the model itself (``out_dim``, ``normalize``, ``feature``), so they are
    the ones the weights were trained with; ``zscore``/``crop`` from ``config["training"]["augment"]``.
    ``ExportError`` for an unknown grid or p > 10,000.
    """
    from brainage_core.models import HEADS, ContrastiveModel

    mcfg = config.get("model", {})
    augment = (config.get("training") or {}).get("augment") or {}
    backbone, head = str(mcfg.get("backbone")), str(mcfg.get("head"))
    if head not in HEADS:
        raise ExportError(f"config model.head = {head!r}; expected one of {', '.join(HEADS)}")
    if grid not in GRID_FACTORS:
        raise ExportError(f"model grid {grid!r}; expected one of {', '.join(GRID_FACTORS)} (VBM grids only)")
    contrastive = isinstance(model, ContrastiveModel)
    spec = ModelSpec(
        backbone=backbone,
        head=head,
        base_width=int(mcfg.get("base_width")),
        proj_dim=int(getattr(model, "out_dim", 128)) if contrastive else 128,
        normalize=bool(getattr(model, "normalize", True)) if contrastive else True,
        feature=str(getattr(model, "feature", "projection")) if contrastive else "encoder",
        grid=grid,
        feature_dim=int(model.feature_dim),
        batch_size=int(batch_size),
        zscore=bool(augment.get("zscore", False)),
        crop=bool(augment.get("crop", False)),
    )
    if spec.feature_dim > MAX_FEATURES:
        raise ExportError(
            f"the model hands out {spec.feature_dim} features; the challenge accepts at most {MAX_FEATURES}"
        )
    if spec.batch_size < 1:
        raise ExportError(f"batch_size = {batch_size}; expected an integer >= 1")
    return spec


def centered_view(model: nn.Module, spec: ModelSpec | Mapping[str, Any]) -> nn.Module:
    """``model`` behind the deterministic input transform it was trained with, for feature extraction.

    ``spec``: a :class:`ModelSpec` or its dict (``metadata.pkl``'s ``model_spec``; missing ``zscore``/``crop``
    read as False). Returns the training loop's ``EvaluationView`` in float32 (no bf16, contiguous
    memory): ``features(x)`` maps a float batch (B, 1, D, H, W) on the spec's grid to
    ``model.features(DeviceAugment(grid, crop=..., zscore=...).center(x))``, as the evaluator does.
    """
    from brainage_core.data.augment import DeviceAugment
    from brainage_core.training.loop import EvaluationView

    values = asdict(spec) if isinstance(spec, ModelSpec) else dict(spec)
    augment = DeviceAugment(
        str(values["grid"]), crop=bool(values.get("crop", False)), zscore=bool(values.get("zscore", False))
    )
    return EvaluationView(model, augment, bf16=False, memory_format=torch.contiguous_format)


def forbidden_words(text: str) -> list[str]:
    """The sanitizer words found in ``text`` (case-insensitive substrings), in :data:`SANITIZER_WORDS` order."""
    lower = text.lower()
    return [w for w in SANITIZER_WORDS if w.lower() in lower]


def check_sanitizer(text: str, where: str = ESTIMATOR_FILE) -> None:
    """Raise ``ExportError`` naming the word and its first line if ``text`` would be rejected.

    Runs the project's strict check (any case, anywhere) and then ramp-workflow's own sanitizer
    (``rampwf.utils.sanitize._sanitize_input``) when the package is installed.
    """
    for word in forbidden_words(text):
        line_no = next(i for i, line in enumerate(text.splitlines(), 1) if word.lower() in line.lower())
        raise ExportError(f"{where}: line {line_no} contains the forbidden substring {word!r} (RAMP sanitizer)")
    try:
        from rampwf.utils.sanitize import _sanitize_input
    except ImportError:  # the test extra installs it; the strict check above is a superset
        return
    try:
        _sanitize_input(text)
    except RuntimeError as exc:
        raise ExportError(f"{where}: rejected by ramp-workflow's sanitizer: {exc}") from exc


_FUTURE = re.compile(r"^from __future__ import annotations\s*$", re.MULTILINE)


def _inline(path: Path) -> str:
    text = path.read_text()
    return _FUTURE.sub("", text).strip() + "\n"


_TEMPLATE = '''"""Brain-age features for the RAMP brain-age challenge with site removal.

Exported by brainage-study: __SUMMARY__.
Network: __BACKBONE__ (base width __BASE_WIDTH__) with the __HEAD__ head, input grid __GRID__
(__GRID_SHAPE__), __FEATURE_DIM__ features per subject. Weights: weights.pth next to this file (state
dict under 'model'). The network code below is inlined from the project (torch only).

How the challenge workflow drives it: VBM_MASK names the grey-matter mask NIfTI; get_estimator() returns
a Pipeline whose one step has an `indices` attribute; fit(None, None) restores the weights and returns
the pipeline; predict(X) reads only the rows in `indices` (all rows when None) of the whole flat array X,
__BATCH__ rows at a time, and returns float32 features (rows, __FEATURE_DIM__).

Preprocessing, exactly as the project's prepared store: the first count(mask > 0.05) values of a row go
into the mask voxels in C order on the 121x145x121 grid (zeros elsewhere); the volume is block-averaged
__BLOCK__x__BLOCK__x__BLOCK__ in float32 (zero-padded at the high end of each axis) and cast to float16.
The network then sees the training's deterministic input transform (center_input): __TRANSFORM__.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel
import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.pipeline import Pipeline

__INLINED__

# ---- the estimator ---------------------------------------------------------------------------------
FULL_SHAPE = (121, 145, 121)
MASK_THRESHOLD = 0.05
BLOCK = __BLOCK__
GRID_SHAPE = __GRID_SHAPE_TUPLE__
HEAD = "__HEAD__"
BASE_WIDTH = __BASE_WIDTH__
PROJ_DIM = __PROJ_DIM__
NORMALIZE = __NORMALIZE__
FEATURE = "__FEATURE__"
FEATURE_DIM = __FEATURE_DIM__
ZSCORE = __ZSCORE__
CROP = __CROP__
CROP_LENGTH = __CROP_LENGTH__
PAD_TO = __PAD_TO__
WEIGHTS = Path(__file__).resolve().parent / "weights.pth"


def build_network():
    """The network of the exported trial, with untrained weights."""
    encoder = __BACKBONE__(BASE_WIDTH)
    if HEAD == "contrastive":
        return ContrastiveModel(encoder, proj_dim=PROJ_DIM, normalize=NORMALIZE, feature=FEATURE)
    return RegressionModel(encoder)


def grey_matter_mask():
    """Boolean (121, 145, 121) array: the voxels of VBM_MASK above 0.05."""
    where = os.environ.get("VBM_MASK")
    if not where:
        raise RuntimeError("the environment variable VBM_MASK is not set; expected the path of the VBM mask NIfTI")
    data = np.asarray(nibabel.load(where).get_fdata(dtype=np.float32))
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.shape != FULL_SHAPE:
        raise RuntimeError(f"VBM_MASK {where} has shape {data.shape}; expected {FULL_SHAPE}")
    return data > MASK_THRESHOLD


def block_average(volume, factor):
    """Zero-pad the last three axes to multiples of factor and average factor**3 blocks (float32)."""
    if factor == 1:
        return volume
    dtype = np.float64 if volume.dtype == np.float64 else np.float32
    *lead, d, h, w = volume.shape
    pad_d, pad_h, pad_w = ((-(-n // factor)) * factor - n for n in (d, h, w))
    x = np.asarray(volume, dtype=dtype)
    if pad_d or pad_h or pad_w:
        x = np.pad(x, [(0, 0)] * len(lead) + [(0, pad_d), (0, pad_h), (0, pad_w)])
    D, H, W = (s // factor for s in x.shape[-3:])
    x = x.reshape(*lead, D, factor, H, factor, W, factor)
    return x.mean(axis=(-5, -3, -1), dtype=dtype)


def preprocess_rows(flat, mask):
    """Flat float rows (b, >= count(mask)) -> float16 volumes (b, 1, *GRID_SHAPE), as the prepared store."""
    n_vbm = int(mask.sum())
    out = np.empty((flat.shape[0], 1, *GRID_SHAPE), dtype=np.float16)
    for i in range(flat.shape[0]):
        volume = np.zeros(FULL_SHAPE, dtype=np.float32)
        volume[mask] = np.asarray(flat[i, :n_vbm], dtype=np.float32)
        out[i, 0] = block_average(volume, BLOCK).astype(np.float16)
    return out


def center_input(x):
    """What the network was trained on: float32 (b, 1, *GRID_SHAPE) -> (b, 1, D', H', W').

    ZSCORE: per volume (x - mean) / (std + 1e-6), unbiased std over all non-batch axes. CROP: the centred
    CROP_LENGTH voxels of axis 3 (H), then centred zero-padding of every spatial axis to PAD_TO.
    """
    if ZSCORE:
        dims = tuple(range(1, x.ndim))
        x = (x - x.mean(dim=dims, keepdim=True)) / (x.std(dim=dims, keepdim=True) + 1e-6)
    if CROP:
        start = (x.shape[3] - CROP_LENGTH) // 2
        x = x[:, :, :, start:start + CROP_LENGTH]
        pads = []
        for n in reversed(x.shape[2:]):  # pad lists the last axis first
            total = max(PAD_TO - n, 0)
            pads += [total // 2, total - total // 2]
        x = torch.nn.functional.pad(x, pads)
    return x


class BrainAgeFeatures(BaseEstimator, TransformerMixin):
    """The network's features of flat VBM rows; `indices` selects the rows of X to use (None: all)."""

    indices = None

    def __init__(self, batch_size=__BATCH__):
        self.batch_size = batch_size

    def fit(self, X=None, y=None):
        """Restore the trained weights (X and y are ignored) and return self."""
        self.device_ = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
        network = build_network()
        network.load_state_dict(state["model"])
        self.network_ = network.to(self.device_).eval()
        self.mask_ = grey_matter_mask()
        return self

    def transform(self, X):
        rows = np.arange(X.shape[0]) if self.indices is None else np.asarray(self.indices, dtype=np.int64)
        n_vbm = int(self.mask_.sum())
        if X.shape[1] < n_vbm:
            raise ValueError(f"rows of {X.shape[1]} values; expected at least {n_vbm} (the VBM mask voxels)")
        out = np.empty((rows.size, FEATURE_DIM), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, rows.size, int(self.batch_size)):
                batch_rows = rows[start:start + int(self.batch_size)]
                flat = np.asarray(X[batch_rows, :n_vbm])
                volumes = torch.from_numpy(preprocess_rows(flat, self.mask_).astype(np.float32))
                features = self.network_.features(center_input(volumes.to(self.device_)))
                out[start:start + batch_rows.size] = features.float().cpu().numpy()
        return out

    def predict(self, X):
        """Features (rows of `indices`, FEATURE_DIM) as float32."""
        return self.transform(X)


def get_estimator():
    """The submission's scikit-learn Pipeline (one step with an `indices` attribute)."""
    return Pipeline([("features", BrainAgeFeatures())])
'''


def _transform_summary(spec: ModelSpec) -> str:
    factor = GRID_FACTORS[spec.grid]
    steps = ["per-volume z-scoring"] if spec.zscore else []
    if spec.crop:
        steps.append(f"centred crop of H to {CROP_LENGTH_FULL // factor}, centred zero-padding to "
                     f"{PAD_TO_FULL // factor} per axis")
    return ", then ".join(steps) or "none (identity)"


def estimator_source(spec: ModelSpec, *, summary: str = "") -> str:
    """The text of ``estimator.py`` for ``spec`` (checked against the sanitizer).

    ``summary``: one line saying where the model comes from (study, trial, epoch, metric).
    """
    from brainage_core.models import BACKBONES, family_source_files

    if spec.backbone not in BACKBONES:
        raise ConfigError(f"model.backbone: unknown backbone {spec.backbone!r}; expected one of {', '.join(BACKBONES)}")
    files = family_source_files(spec.backbone)
    root = files[0].parents[2]
    inlined = "\n\n".join(
        f"# ---- inlined from {path.relative_to(root)} " + "-" * 40 + "\n" + _inline(path) for path in files
    )
    shape = GRID_SHAPES[spec.grid]
    values = {
        "__INLINED__": inlined,
        "__SUMMARY__": summary or "a trained brain-age model",
        "__BACKBONE__": BACKBONES[spec.backbone].__name__,
        "__BASE_WIDTH__": str(spec.base_width),
        "__HEAD__": spec.head,
        "__GRID__": spec.grid,
        "__GRID_SHAPE__": "x".join(map(str, shape)),
        "__GRID_SHAPE_TUPLE__": repr(tuple(shape)),
        "__FEATURE_DIM__": str(spec.feature_dim),
        "__BATCH__": str(spec.batch_size),
        "__BLOCK__": str(GRID_FACTORS[spec.grid]),
        "__PROJ_DIM__": str(spec.proj_dim),
        "__NORMALIZE__": repr(bool(spec.normalize)),
        "__FEATURE__": spec.feature,
        "__ZSCORE__": repr(bool(spec.zscore)),
        "__CROP__": repr(bool(spec.crop)),
        "__CROP_LENGTH__": str(CROP_LENGTH_FULL // GRID_FACTORS[spec.grid]),
        "__PAD_TO__": str(PAD_TO_FULL // GRID_FACTORS[spec.grid]),
        "__TRANSFORM__": _transform_summary(spec),
    }
    text = _TEMPLATE
    inlined_text = values.pop("__INLINED__")
    for key, value in values.items():
        text = text.replace(key, value)
    text = text.replace("__INLINED__", inlined_text)  # last: the inlined code is not a template
    check_sanitizer(text)
    return text


def write_submission(
    model: nn.Module, spec: ModelSpec, out: str | Path, *, metadata: dict[str, Any], summary: str = ""
) -> Path:
    """Write ``estimator.py``, ``weights.pth`` and ``metadata.pkl`` (``metadata`` plus ``spec``) into ``out``.

    ``model``'s state dict must load into the network ``estimator.py`` builds (checked here by building it
    from the generated source). Returns the folder.
    """
    out = Path(out)
    source = estimator_source(spec, summary=summary)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    namespace: dict[str, Any] = {"__file__": str(out / ESTIMATOR_FILE), "__name__": "exported_estimator"}
    exec(compile(source, str(out / ESTIMATOR_FILE), "exec"), namespace)  # our own generated code
    try:
        namespace["build_network"]().load_state_dict(state)
    except RuntimeError as exc:
        raise ExportError(f"the weights do not fit the network estimator.py builds ({spec}): {exc}") from exc
    out.mkdir(parents=True, exist_ok=True)
    (out / ESTIMATOR_FILE).write_text(source)
    torch.save({"model": state}, out / WEIGHTS_FILE)
    pd.to_pickle({**metadata, "model_spec": asdict(spec)}, out / METADATA_FILE)
    return out
