"""3D DenseNet-BC encoder (Huang et al., 2017) for one-channel brain volumes.

Self-contained: this file imports nothing but torch, because the challenge export inlines it into a
submission whose server has torch but not this project (keep it that way, and keep the RAMP
sanitizer's forbidden words out of it, comments included).

DenseNet-121 layout with ``base_width`` w (64 in the reference): growth rate k = w / 2 (32), stem
Conv3d(1, 2k, 7, stride 2, padding 3) - BatchNorm3d - ReLU - MaxPool3d(3, stride 2, padding 1); dense
blocks of 6, 12, 24, 16 layers, each layer BN-ReLU-Conv1x1x1(4k)-BN-ReLU-Conv3x3x3(k) concatenated to
its input; a transition after each of the first three blocks (BN-ReLU-Conv1x1x1 halving the channels,
AvgPool3d(2, stride 2)); a final BN-ReLU and global average pooling. Convolutions have no bias.
Output: ``(B, 16 * base_width)`` = 1024 at width 64. Encoder parameters at width 64: 11,242,624.

Smallest input: 29 voxels on every axis (the stem and max-pool leave >= 8, which the three
transitions reduce to >= 1). The full grid 121x145x121, 128^3, the 3 mm grid 61x73x61 and the
6 mm grid 31x37x31 all work; a smaller input raises a ValueError naming its shape.
"""

from __future__ import annotations

import torch
from torch import nn

DENSENET121_BLOCKS: tuple[int, int, int, int] = (6, 12, 24, 16)
DENSENET_MIN_SIZE = 29


class DenseLayer3d(nn.Module):
    """BN-ReLU-Conv1x1x1(4k)-BN-ReLU-Conv3x3x3(k); returns the input with k new channels appended."""

    def __init__(self, in_channels: int, growth: int, bottleneck_factor: int = 4) -> None:
        super().__init__()
        inner = bottleneck_factor * growth
        self.norm1 = nn.BatchNorm3d(in_channels)
        self.conv1 = nn.Conv3d(in_channels, inner, 1, bias=False)
        self.norm2 = nn.BatchNorm3d(inner)
        self.conv2 = nn.Conv3d(inner, growth, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.norm1(x)))
        out = self.conv2(self.relu(self.norm2(out)))
        return torch.cat([x, out], dim=1)


class Transition3d(nn.Sequential):
    """BN-ReLU-Conv1x1x1 (``in_channels`` -> ``out_channels``) then AvgPool3d(2, stride 2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.BatchNorm3d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(in_channels, out_channels, 1, bias=False),
            nn.AvgPool3d(2, stride=2),
        )


class DenseNet3D(nn.Module):
    """3D DenseNet-BC encoder: ``forward(x (B, 1, D, H, W)) -> (B, out_features)``.

    ``growth`` k, ``blocks`` the layers per dense block, ``init_features`` the stem width
    (2k in DenseNet-121); transitions halve the channels (compression 0.5).
    """

    def __init__(
        self,
        growth: int = 32,
        blocks: tuple[int, ...] = DENSENET121_BLOCKS,
        init_features: int = 64,
        bottleneck_factor: int = 4,
    ) -> None:
        super().__init__()
        if int(growth) < 1 or int(init_features) < 1 or not blocks or any(int(n) < 1 for n in blocks):
            raise ValueError(
                f"DenseNet3D needs positive growth, init_features and block sizes; got growth={growth!r}, "
                f"init_features={init_features!r}, blocks={blocks!r}"
            )
        self.stem = nn.Sequential(
            nn.Conv3d(1, init_features, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm3d(init_features),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(3, stride=2, padding=1),
        )
        stages: list[nn.Module] = []
        channels = int(init_features)
        for index, n_layers in enumerate(blocks):
            layers = []
            for _ in range(int(n_layers)):
                layers.append(DenseLayer3d(channels, int(growth), bottleneck_factor))
                channels += int(growth)
            stages.append(nn.Sequential(*layers))
            if index < len(blocks) - 1:
                stages.append(Transition3d(channels, channels // 2))
                channels //= 2
        self.blocks = nn.Sequential(*stages)
        self.final_norm = nn.BatchNorm3d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.out_features = channels
        self.min_size = _min_input_size(len(blocks) - 1)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(
                f"DenseNet3D expects a batch of one-channel volumes of shape (B, 1, D, H, W); "
                f"got input shape {tuple(x.shape)}"
            )
        if min(x.shape[2:]) < self.min_size:
            raise ValueError(
                f"DenseNet3D needs at least {self.min_size} voxels on every spatial axis; got input shape "
                f"{tuple(x.shape)} (pad the volume, e.g. to the 6 mm grid 31x37x31 or larger)"
            )
        x = self.blocks(self.stem(x))
        x = self.relu(self.final_norm(x))
        return torch.flatten(self.pool(x), 1)


def _min_input_size(n_transitions: int) -> int:
    """Smallest axis length that stays >= 1 voxel through the stem, max-pool and the transitions."""
    size = 2**n_transitions  # needed after the max-pool
    size = 2 * size - 1  # max-pool (3, stride 2, padding 1): out = floor((n - 1) / 2) + 1
    return 2 * size - 1  # stem conv (7, stride 2, padding 3): same formula


def densenet121(base_width: int = 64) -> DenseNet3D:
    """3D DenseNet-121 (BC): growth base_width / 2, blocks (6, 12, 24, 16), 16 * base_width outputs.

    At the reference width 64: growth 32, 1024-d output, 11,242,624 parameters. ``base_width``
    must be even (growth = base_width / 2).
    """
    if int(base_width) < 2 or int(base_width) % 2:
        raise ValueError(f"densenet121 needs an even base_width >= 2 (growth = base_width / 2); got {base_width!r}")
    growth = int(base_width) // 2
    return DenseNet3D(growth=growth, blocks=DENSENET121_BLOCKS, init_features=2 * growth)
