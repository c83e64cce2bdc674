"""3D ResNet encoders (He et al., 2016) for one-channel brain volumes.

Self-contained: this file imports nothing but torch, because the challenge export inlines it into a
submission whose server has torch but not this project (keep it that way, and keep the RAMP
sanitizer's forbidden words out of it, comments included).

Architecture: stem Conv3d(1, w, 7, stride 2, padding 3) - BatchNorm3d - ReLU - MaxPool3d(3, stride 2,
padding 1); four stages of planes w, 2w, 4w, 8w (w = ``base_width``, 64 in the reference), the first
block of stages 2-4 with stride 2 (on its 3x3x3 convolution; a 1x1x1 convolution + BatchNorm3d on the
shortcut wherever the shape changes); global average pooling. Convolutions have no bias.
Output: ``(B, 8 * base_width)`` for basic blocks (resnet18/34), ``(B, 32 * base_width)`` for
bottleneck blocks (resnet50).

Encoder parameter counts at base_width 64 (no head): resnet18 33,160,000; resnet34 63,469,632;
resnet50 46,155,072. Any spatial size works (padding keeps every axis >= 1 voxel): the full grid
121x145x121, 128^3, the 3 mm grid 61x73x61 and the 6 mm grid 31x37x31 all end in a 1x1x1 average.
The encoders accept ``channels_last_3d`` inputs and weights (``torch.flatten`` after pooling, no
``view``).
"""

from __future__ import annotations

import torch
from torch import nn

RESNET_LAYERS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


def _check_volume_batch(x: torch.Tensor, name: str) -> None:
    if x.dim() != 5 or x.shape[1] != 1:
        raise ValueError(
            f"{name} expects a batch of one-channel volumes of shape (B, 1, D, H, W); got input shape {tuple(x.shape)}"
        )


class BasicBlock3d(nn.Module):
    """Two 3x3x3 convolutions with a residual shortcut; ``planes`` output channels."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_channels, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck3d(nn.Module):
    """1x1x1 reduce, 3x3x3 (strided), 1x1x1 expand to ``4 * planes``, with a residual shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv3d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm3d(out_channels),
    )


class ResNet3D(nn.Module):
    """3D ResNet encoder: ``forward(x (B, 1, D, H, W)) -> (B, out_features)``.

    ``block`` is ``"basic"`` or ``"bottleneck"``, ``layers`` the number of blocks per stage,
    ``base_width`` the stem/first-stage width w (stages w, 2w, 4w, 8w; cost scales ~w^2, so 16
    is ~16x cheaper than the reference 64). ``out_features`` is 8w (basic) or 32w (bottleneck).
    """

    def __init__(self, block: str, layers: tuple[int, int, int, int], base_width: int = 64) -> None:
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"ResNet3D block must be 'basic' or 'bottleneck'; got {block!r}")
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"ResNet3D layers must be four positive block counts; got {layers!r}")
        if int(base_width) < 1:
            raise ValueError(f"base_width must be a positive integer; got {base_width!r}")
        block_cls = BasicBlock3d if block == "basic" else Bottleneck3d
        w = int(base_width)
        self.stem = nn.Sequential(
            nn.Conv3d(1, w, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm3d(w),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(3, stride=2, padding=1),
        )
        stages = []
        in_channels = w
        for index, n_blocks in enumerate(layers):
            planes = w * 2**index
            stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(int(n_blocks)):
                blocks.append(block_cls(in_channels, planes, stride if block_index == 0 else 1))
                in_channels = planes * block_cls.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.out_features = in_channels
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_volume_batch(x, type(self).__name__)
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.pool(x), 1)


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resnet18(base_width: int = 64) -> ResNet3D:
    """3D ResNet-18: basic blocks (2, 2, 2, 2); 512-d output and 33,160,000 parameters at width 64."""
    return ResNet3D("basic", RESNET_LAYERS["resnet18"][1], base_width)


def resnet34(base_width: int = 64) -> ResNet3D:
    """3D ResNet-34: basic blocks (3, 4, 6, 3); 512-d output and 63,469,632 parameters at width 64."""
    return ResNet3D("basic", RESNET_LAYERS["resnet34"][1], base_width)


def resnet50(base_width: int = 64) -> ResNet3D:
    """3D ResNet-50: bottlenecks (3, 4, 6, 3); 2048-d output and 46,155,072 parameters at width 64."""
    return ResNet3D("bottleneck", RESNET_LAYERS["resnet50"][1], base_width)
