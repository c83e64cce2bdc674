"""The reference recipe's augmentations as batched tensor operations on the training device.

:class:`DeviceAugment` takes a float batch (B, 1, D, H, W) already on the device and applies, per
sample and all in a few batched kernels (no per-sample numpy):

1. ``zscore``: per-volume standardisation, (x − mean) / (std + 1e-6) over the whole volume;
2. ``crop``: a random window of the 145-voxel axis (H) of length 128, then zero-padding of every
   axis to 128 (centred), giving 128³; on coarser grids the sizes are divided by the grid's block
   factor (3mm: 73 → 64, padded to 64³; 6mm: 37 → 32, padded to 32³);
3. ``cutout``: with probability 0.5 per sample, one cube of side 32 (full grid; 16 at 3mm, 8 at
   6mm) at a uniformly random position entirely inside the volume is set to zero.

z-scoring comes first so that padding and cutout are true zeros. :meth:`DeviceAugment.center` is the
deterministic counterpart for evaluation (centred crop + pad, z-scoring) when the model must see
the same shape as in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from brainage_core.errors import DataError
from brainage_core.grids import GRID_FACTORS, grid_shape

#: Full-grid sizes of the reference recipe.
CROP_LENGTH_FULL = 128
PAD_TO_FULL = 128
CUTOUT_SIZE_FULL = 32
CROP_AXIS = 3  # H, the 145-voxel axis of (B, 1, D, H, W)


class DeviceAugment:
    """Batched augmentations for grid ``grid``; ``aug(x, generator=None) -> x`` (see module doc).

    ``x``: float batch (B, C, D, H, W) with (D, H, W) the grid's shape, on any device. Output:
    same dtype and device; shape (B, C, P, P, P) with P = 128 / block factor when ``crop`` else
    unchanged. ``generator``: optional ``torch.Generator`` (on CPU or on x's device) for
    reproducible draws. With every option off the call returns ``x`` itself.
    """

    def __init__(
        self,
        grid: str = "full",
        crop: bool = False,
        cutout: bool = False,
        zscore: bool = False,
        cutout_p: float = 0.5,
    ):
        factor = GRID_FACTORS[grid] if grid in GRID_FACTORS else None
        if factor is None:
            raise DataError(f"augment grid {grid!r}; expected one of {', '.join(GRID_FACTORS)}")
        if not 0.0 <= cutout_p <= 1.0:
            raise DataError(f"augment cutout_p={cutout_p}; expected a probability in [0, 1]")
        self.grid, self.crop, self.cutout, self.zscore, self.cutout_p = grid, crop, cutout, zscore, cutout_p
        self.shape = grid_shape(grid)
        self.crop_length = CROP_LENGTH_FULL // factor
        self.pad_to = PAD_TO_FULL // factor
        self.cutout_size = CUTOUT_SIZE_FULL // factor

    def __repr__(self) -> str:
        return f"DeviceAugment(grid={self.grid!r}, crop={self.crop}, cutout={self.cutout}, zscore={self.zscore})"

    @property
    def output_spatial_shape(self) -> tuple[int, int, int]:
        """(D, H, W) of the augmented batch."""
        return (self.pad_to,) * 3 if self.crop else self.shape

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or tuple(x.shape[2:]) != self.shape or not x.is_floating_point():
            raise DataError(
                f"augment input {x.dtype} {tuple(x.shape)}; expected a float batch (B, C, "
                f"{', '.join(map(str, self.shape))}) on grid {self.grid}"
            )

    @staticmethod
    def _randint(high: torch.Tensor | int, size: int, x: torch.Tensor, generator: torch.Generator | None):
        device = generator.device if generator is not None else x.device
        return torch.randint(0, int(high), (size,), generator=generator, device=device).to(x.device)

    def _zscore(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x.ndim))
        mean = x.mean(dim=dims, keepdim=True)
        std = x.std(dim=dims, keepdim=True)
        return (x - mean) / (std + 1e-6)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for n in reversed(x.shape[2:]):  # F.pad lists the last axis first
            total = max(self.pad_to - n, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)

    def _crop(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        batch = torch.arange(x.shape[0], device=x.device)[:, None]
        index = offsets[:, None] + torch.arange(self.crop_length, device=x.device)[None, :]
        # advanced indices on axes 0 and 3 separated by slices: result is (B, L, C, D, W)
        cropped = x[batch, :, :, index]
        return cropped.permute(0, 2, 3, 1, 4)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self._check(x)
        b = x.shape[0]
        if self.zscore:
            x = self._zscore(x)
        if self.crop:
            offsets = self._randint(x.shape[CROP_AXIS] - self.crop_length + 1, b, x, generator)
            x = self._pad(self._crop(x, offsets))
        if self.cutout:
            device = generator.device if generator is not None else x.device
            apply = (torch.rand(b, generator=generator, device=device) < self.cutout_p).to(x.device)
            inside = []
            for n in x.shape[2:]:
                start = self._randint(n - self.cutout_size + 1, b, x, generator)
                pos = torch.arange(n, device=x.device)[None, :]
                inside.append((pos >= start[:, None]) & (pos < start[:, None] + self.cutout_size))
            d, h, w = inside
            mask = d[:, :, None, None] & h[:, None, :, None] & w[:, None, None, :] & apply[:, None, None, None]
            x = x.masked_fill(mask[:, None], 0.0)
        return x

    def center(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic version for evaluation: z-scoring if enabled, centred crop + pad if ``crop``."""
        self._check(x)
        if self.zscore:
            x = self._zscore(x)
        if self.crop:
            start = (x.shape[CROP_AXIS] - self.crop_length) // 2
            x = self._pad(x[:, :, :, start : start + self.crop_length])
        return x
