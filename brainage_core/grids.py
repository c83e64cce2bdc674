"""The exact voxel grids shared by every part of the project.

``full`` is the OpenBHB VBM grid (CAT12, 121×145×121 voxels of 1.5 mm, MNI space). The coarser
grids are defined by zero-padding the full grid at the high end of each axis to a multiple of
the block size and averaging over non-overlapping blocks:

========  =============  ===========  ===========
name      shape          voxel (mm)   block
========  =============  ===========  ===========
``full``  121×145×121    1.5          1
``3mm``   61×73×61       3.0          2×2×2
``6mm``   31×37×31       6.0          4×4×4
========  =============  ===========  ===========

Because every block of a coarser grid is the union of equal-sized blocks of a finer grid,
``3mm → 6mm`` by 2×2×2 averaging equals ``full → 6mm`` by 4×4×4 averaging (up to rounding).
"""

from __future__ import annotations

import numpy as np

GRID_NAMES: tuple[str, ...] = ("full", "3mm", "6mm")

#: Block size of each grid relative to the full grid.
GRID_FACTORS: dict[str, int] = {"full": 1, "3mm": 2, "6mm": 4}

FULL_SHAPE: tuple[int, int, int] = (121, 145, 121)

#: Affine of the full OpenBHB VBM grid (CAT12 1.5 mm template; x axis flipped, RAS+ world).
FULL_AFFINE: np.ndarray = np.array(
    [
        [-1.5, 0.0, 0.0, 90.0],
        [0.0, 1.5, 0.0, -126.0],
        [0.0, 0.0, 1.5, -72.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _coarse_len(n: int, factor: int) -> int:
    return -(-n // factor)


GRID_SHAPES: dict[str, tuple[int, int, int]] = {
    name: tuple(_coarse_len(n, f) for n in FULL_SHAPE)  # type: ignore[misc]
    for name, f in GRID_FACTORS.items()
}


def check_grid(name: str) -> str:
    """Return ``name`` if it is a known grid, else raise ``ValueError`` listing the valid names."""
    if name not in GRID_FACTORS:
        raise ValueError(f"unknown grid {name!r}; expected one of {', '.join(GRID_NAMES)}")
    return name


def grid_shape(name: str) -> tuple[int, int, int]:
    """Spatial shape (D, H, W) of grid ``name``."""
    return GRID_SHAPES[check_grid(name)]


def grid_affine(name: str) -> np.ndarray:
    """4×4 voxel-to-world affine of grid ``name`` (the centre of each block of full voxels)."""
    f = GRID_FACTORS[check_grid(name)]
    aff = FULL_AFFINE.copy()
    aff[:3, :3] = FULL_AFFINE[:3, :3] * f
    aff[:3, 3] = FULL_AFFINE[:3, 3] + FULL_AFFINE[:3, :3] @ np.full(3, (f - 1) / 2.0)
    return aff


def grid_of_shape(shape: tuple[int, ...]) -> str | None:
    """Name of the grid whose spatial shape is the last three axes of ``shape``, or ``None``."""
    spatial = tuple(int(s) for s in shape[-3:])
    for name, s in GRID_SHAPES.items():
        if s == spatial:
            return name
    return None


def block_factor(source: str, target: str) -> int:
    """Block size that turns grid ``source`` into grid ``target``.

    Raises ``ValueError`` when ``target`` is finer than ``source`` (no up-sampling).
    """
    fs, ft = GRID_FACTORS[check_grid(source)], GRID_FACTORS[check_grid(target)]
    if ft < fs:
        raise ValueError(
            f"cannot go from grid {source!r} {grid_shape(source)} to the finer grid {target!r} "
            f"{grid_shape(target)}: only block averaging to a coarser grid is supported"
        )
    return ft // fs


def block_average(volume: np.ndarray, factor: int) -> np.ndarray:
    """Zero-pad the last three axes to multiples of ``factor`` and average ``factor³`` blocks.

    Works on any leading axes; computes in float32 (float64 stays float64) and returns that dtype.
    ``factor == 1`` returns the input unchanged (no copy).
    """
    if factor == 1:
        return volume
    dtype = np.float64 if volume.dtype == np.float64 else np.float32
    *lead, d, h, w = volume.shape
    pd, ph, pw = (_coarse_len(n, factor) * factor - n for n in (d, h, w))
    x = np.asarray(volume, dtype=dtype)
    if pd or ph or pw:
        x = np.pad(x, [(0, 0)] * len(lead) + [(0, pd), (0, ph), (0, pw)])
    D, H, W = (s // factor for s in x.shape[-3:])
    x = x.reshape(*lead, D, factor, H, factor, W, factor)
    return x.mean(axis=(-5, -3, -1), dtype=dtype)


def to_grid(volume: np.ndarray, source: str, target: str) -> np.ndarray:
    """Bring ``volume`` (…, D, H, W on grid ``source``) to grid ``target`` by block averaging."""
    return block_average(volume, block_factor(source, target))
