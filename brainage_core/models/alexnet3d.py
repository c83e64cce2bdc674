"""3D AlexNet encoder of Abrol et al. (Nature Communications 12:353, 2021) for one-channel volumes.

Self-contained: this file imports nothing but torch, because the challenge export inlines it into a
submission whose server has torch but not this project (keep it that way, and keep the RAMP
sanitizer's forbidden words out of it, comments included).

Five convolutions, each followed by BatchNorm3d and ReLU (w = ``base_width``, 64 in the reference):

    Conv3d(1, w, 5, stride 2, padding 0)        MaxPool3d(3, stride 3)
    Conv3d(w, 2w, 3, padding 0)                 MaxPool3d(3, stride 3)
    Conv3d(2w, 3w, 3, padding 1)
    Conv3d(3w, 3w, 3, padding 1)
    Conv3d(3w, 2w, 3, padding 1)                MaxPool3d(3, stride 3)

then global average pooling (the reference flattens a 1x1x1 map; on the full grid the last map is
1x2x1, which adaptive pooling averages). Convolutions keep their bias as in the reference.
Output: ``(B, 2 * base_width)`` = 128 at width 64. Encoder parameters at width 64: 2,553,728.

Smallest input grid: 69 voxels on every axis (69 -> 33 -> 11 -> 9 -> 3 -> 3 -> 1). The full grid
121x145x121 and the 128^3 padded input work; the 3 mm grid 61x73x61 and the 6 mm grid 31x37x31 are
too small and must be padded to at least 69^3 first; a smaller input raises a ValueError naming
its shape.
"""

from __future__ import annotations

import torch
from torch import nn

ALEXNET_MIN_SIZE = 69


class AlexNet3D(nn.Module):
    """3D AlexNet encoder: ``forward(x (B, 1, D, H, W)) -> (B, 2 * base_width)``; every axis >= 69."""

    def __init__(self, base_width: int = 64) -> None:
        super().__init__()
        w = int(base_width)
        if w < 1:
            raise ValueError(f"base_width must be a positive integer; got {base_width!r}")
        self.features = nn.Sequential(
            nn.Conv3d(1, w, 5, stride=2, padding=0),
            nn.BatchNorm3d(w),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(3, stride=3),
            nn.Conv3d(w, 2 * w, 3, stride=1, padding=0),
            nn.BatchNorm3d(2 * w),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(3, stride=3),
            nn.Conv3d(2 * w, 3 * w, 3, padding=1),
            nn.BatchNorm3d(3 * w),
            nn.ReLU(inplace=True),
            nn.Conv3d(3 * w, 3 * w, 3, padding=1),
            nn.BatchNorm3d(3 * w),
            nn.ReLU(inplace=True),
            nn.Conv3d(3 * w, 2 * w, 3, padding=1),
            nn.BatchNorm3d(2 * w),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(3, stride=3),
        )
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.out_features = 2 * w
        self.min_size = ALEXNET_MIN_SIZE
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(
                f"AlexNet3D expects a batch of one-channel volumes of shape (B, 1, D, H, W); "
                f"got input shape {tuple(x.shape)}"
            )
        if min(x.shape[2:]) < self.min_size:
            raise ValueError(
                f"alexnet3d needs at least {self.min_size} voxels on every spatial axis; got input shape "
                f"{tuple(x.shape)} (the 3 mm and 6 mm grids are too small: pad to >= {self.min_size}^3 "
                f"or use the full grid)"
            )
        return torch.flatten(self.pool(self.features(x)), 1)


def alexnet3d(base_width: int = 64) -> AlexNet3D:
    """3D AlexNet (Abrol et al. 2021): 128-d output and 2,553,728 parameters at width 64."""
    return AlexNet3D(base_width)
