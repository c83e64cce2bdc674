"""Plain-torch 3D encoders and heads for brain-age models, and the ``build_model`` factory.

Backbones (encoder output d at ``base_width`` w; parameter counts at w = 64, encoder only):

=============  =================================  ========  ============  ========================
name           family file                        d         params (w=64) smallest input per axis
=============  =================================  ========  ============  ========================
resnet18       resnet3d.py (basic, 2-2-2-2)       8w = 512  33,160,000    1
resnet34       resnet3d.py (basic, 3-4-6-3)       8w = 512  63,469,632    1
resnet50       resnet3d.py (bottleneck, 3-4-6-3)  32w=2048  46,155,072    1
densenet121    densenet3d.py (growth w/2)         16w=1024  11,242,624    29
alexnet3d      alexnet3d.py (Abrol et al. 2021)   2w = 128  2,553,728     69 (full grid, 128^3)
=============  =================================  ========  ============  ========================

Heads (``heads.py``): ``contrastive`` (Linear(d, d) - ReLU - Linear(d, proj_dim), L2-normalised in
``forward`` unless ``normalize=False``) and ``regression`` (Linear(d, 1), ``forward`` -> (B,) ages).

Each family file and ``heads.py`` imports nothing but torch, so ``study/export.py`` can inline
``family_source_files(backbone)`` into a RAMP ``estimator.py``; this ``__init__`` is not inlined
(it uses the project's error classes).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from brainage_core.errors import ConfigError
from brainage_core.models.alexnet3d import alexnet3d
from brainage_core.models.densenet3d import densenet121
from brainage_core.models.heads import FEATURE_CHOICES, ContrastiveModel, RegressionModel
from brainage_core.models.resnet3d import resnet18, resnet34, resnet50

BACKBONES: dict[str, Callable[[int], nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "densenet121": densenet121,
    "alexnet3d": alexnet3d,
}
BACKBONE_FAMILIES: dict[str, str] = {
    "resnet18": "resnet3d",
    "resnet34": "resnet3d",
    "resnet50": "resnet3d",
    "densenet121": "densenet3d",
    "alexnet3d": "alexnet3d",
}
HEADS: dict[str, type[nn.Module]] = {"contrastive": ContrastiveModel, "regression": RegressionModel}
MODEL_OPTIONS: dict[str, Any] = {
    "base_width": 64,
    "sync_batchnorm": False,
    "feature": "projection",
    "normalize": True,
    "proj_dim": 128,
}

__all__ = [
    "BACKBONES",
    "BACKBONE_FAMILIES",
    "HEADS",
    "MODEL_OPTIONS",
    "ContrastiveModel",
    "RegressionModel",
    "build_model",
    "family_source_files",
]


def build_model(backbone: str, head: str = "contrastive", **options: Any) -> nn.Module:
    """Build an encoder + head model.

    ``backbone`` is a key of ``BACKBONES``, ``head`` of ``HEADS``. Options (defaults in
    ``MODEL_OPTIONS``):

    - ``base_width`` (int >= 1, 64): width of the first stage; cost scales ~ base_width^2
      (16 is ~16x cheaper than 64); densenet121 needs it even (growth = base_width / 2).
    - ``sync_batchnorm`` (bool, False): convert every BatchNorm3d to SyncBatchNorm for DDP. Under
      DDP each rank normalises with the mean/variance of its own b samples, not of the k*b batch a
      single process would see, so plain BatchNorm gives different activations, gradients and
      running statistics than one process on the whole batch (and lets a contrastive loss exploit
      per-rank statistics); SyncBatchNorm all-reduces the statistics across ranks. Outside an
      initialised process group it behaves like BatchNorm.
    - ``feature`` ("projection" | "encoder", "projection"): what ``features(x)`` returns for the
      contrastive head (regression models always return the encoder output).
    - ``normalize`` (bool, True): L2-normalise the contrastive ``forward`` output (False for rnc).
    - ``proj_dim`` (int >= 1, 128): contrastive projection size.

    Returns ``ContrastiveModel`` (``model(x) -> (B, proj_dim)``) or ``RegressionModel``
    (``model(x) -> (B,)``); both have ``features(x) -> (B, model.feature_dim)``, ``.encoder`` and
    ``.head``. Inputs are float (B, 1, D, H, W) volumes. Unknown names or bad values raise
    ``ConfigError`` listing the valid choices.
    """
    if backbone not in BACKBONES:
        raise ConfigError(f"model.backbone: unknown backbone {backbone!r}; expected one of {', '.join(BACKBONES)}")
    if head not in HEADS:
        raise ConfigError(f"model.head: unknown head {head!r}; expected one of {', '.join(HEADS)}")
    unknown = sorted(set(options) - set(MODEL_OPTIONS))
    if unknown:
        raise ConfigError(
            f"model: unknown option(s) {', '.join(map(repr, unknown))}; expected some of {', '.join(MODEL_OPTIONS)}"
        )
    opts = {**MODEL_OPTIONS, **options}
    for key in ("base_width", "proj_dim"):
        value = opts[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.{key}: expected a positive integer; got {value!r}")
    if backbone == "densenet121" and opts["base_width"] % 2:
        raise ConfigError(
            f"model.base_width: densenet121 needs an even base_width (growth = base_width / 2); "
            f"got {opts['base_width']!r}"
        )
    for key in ("sync_batchnorm", "normalize"):
        if not isinstance(opts[key], bool):
            raise ConfigError(f"model.{key}: expected true or false; got {opts[key]!r}")
    if opts["feature"] not in FEATURE_CHOICES:
        raise ConfigError(
            f"model.feature: unknown feature {opts['feature']!r}; expected one of {', '.join(FEATURE_CHOICES)}"
        )

    encoder = BACKBONES[backbone](opts["base_width"])
    if head == "contrastive":
        model: nn.Module = ContrastiveModel(
            encoder, proj_dim=opts["proj_dim"], normalize=opts["normalize"], feature=opts["feature"]
        )
    else:
        model = RegressionModel(encoder)
    if opts["sync_batchnorm"]:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def family_source_files(backbone: str) -> list[Path]:
    """The self-contained source files that define ``backbone`` and the heads (for the RAMP export).

    Returns ``[<family>.py, heads.py]``; each imports only torch and ``__future__``.
    """
    if backbone not in BACKBONE_FAMILIES:
        raise ConfigError(
            f"model.backbone: unknown backbone {backbone!r}; expected one of {', '.join(BACKBONE_FAMILIES)}"
        )
    here = Path(__file__).resolve().parent
    return [here / f"{BACKBONE_FAMILIES[backbone]}.py", here / "heads.py"]
