"""Heads and the encoder + head models (contrastive and regression) around any 3D encoder.

Self-contained: this file imports nothing but torch, because the challenge export inlines it (with
one encoder family file) into a submission whose server has torch but not this project (keep it that
way, and keep the RAMP sanitizer's forbidden words out of it, comments included).

An encoder is any module mapping (B, 1, D, H, W) to (B, d) with an ``out_features`` attribute = d.
State-dict keys are ``encoder.*`` and ``head.*`` for both models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_CHOICES: tuple[str, ...] = ("projection", "encoder")


class ProjectionHead(nn.Sequential):
    """Linear(d, d) - ReLU - Linear(d, proj_dim): the contrastive projection (no normalisation here)."""

    def __init__(self, in_features: int, proj_dim: int = 128) -> None:
        super().__init__(
            nn.Linear(in_features, in_features),
            nn.ReLU(inplace=True),
            nn.Linear(in_features, proj_dim),
        )


class ContrastiveModel(nn.Module):
    """Encoder + projection head for contrastive training.

    ``forward(x (B, 1, D, H, W)) -> (B, proj_dim)``: the projection, L2-normalised along dim 1 when
    ``normalize`` is true (y-Aware, SupCon, threshold, expw); ``normalize=False`` gives the raw
    projection that Rank-N-Contrast expects. Normalisation is computed in float32 (the output is
    float32 under bf16 autocast), so unit norms hold to float32 precision.

    ``features(x) -> (B, feature_dim)``: the representation handed to the evaluation probes; with
    ``feature="projection"`` the L2-normalised projection (whatever ``normalize`` says, as the
    brain-age challenge protocol defines it), with ``feature="encoder"`` the encoder output (B, d).
    """

    def __init__(
        self, encoder: nn.Module, proj_dim: int = 128, normalize: bool = True, feature: str = "projection"
    ) -> None:
        super().__init__()
        if feature not in FEATURE_CHOICES:
            raise ValueError(f"feature must be one of {FEATURE_CHOICES}; got {feature!r}")
        if int(proj_dim) < 1:
            raise ValueError(f"proj_dim must be a positive integer; got {proj_dim!r}")
        self.encoder = encoder
        self.head = ProjectionHead(int(encoder.out_features), int(proj_dim))
        self.normalize = bool(normalize)
        self.feature = feature
        self.out_dim = int(proj_dim)
        self.feature_dim = int(proj_dim) if feature == "projection" else int(encoder.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(self.encoder(x))
        return F.normalize(z.float(), dim=1) if self.normalize else z

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        if self.feature == "encoder":
            return h
        return F.normalize(self.head(h).float(), dim=1)


class RegressionModel(nn.Module):
    """Encoder + Linear(d, 1) for supervised age regression (l1, mse).

    ``forward(x (B, 1, D, H, W)) -> (B,)``: predicted ages (years). ``features(x) -> (B, d)``: the
    encoder output (``feature_dim`` = d).
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(int(encoder.out_features), 1)
        self.out_dim = 1
        self.feature_dim = int(encoder.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)).squeeze(-1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)
