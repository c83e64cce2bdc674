"""Write a trained model as a RAMP submission for the brain-age challenge (``docs/evaluation.md``).

A submission folder holds:

- ``estimator.py``: self-contained (torch, numpy, nibabel, scikit-learn; not this project), written from
  the template ``estimator.py.tmpl`` beside this module (package data; ``__NAME__`` placeholders). It inlines
  the model's family file and ``heads.py`` (``brainage_core.models.family_source_files``) and a small
  estimator that replays the prepared store's preprocessing exactly: a flat VBM row's first
  ``count(VBM_MASK > MASK_THRESHOLD)`` values (``brainage_core.data.layout``) are placed into the mask's
  voxels in C order on the 121×145×121 grid (zeros elsewhere), the volume is block-averaged to the
  model's grid in float32 (the code of ``brainage_core.grids.block_average``, copied) and cast to
  float16, as ``prepare`` does for the ``ramp`` layout. The network then sees the deterministic input transform
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
from brainage_core.data.layout import MASK_THRESHOLD
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


#: the text of ``estimator.py``, with ``__NAME__`` placeholders (package data beside this module)
TEMPLATE_FILE = Path(__file__).with_name("estimator.py.tmpl")


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
        "__MASK_THRESHOLD__": repr(MASK_THRESHOLD),
    }
    text = TEMPLATE_FILE.read_text()
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
