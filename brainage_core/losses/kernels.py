"""Age kernels K(d) of the kernel-weighted contrastive losses (``docs/losses.md``).

``d`` is an age difference in years; every kernel is symmetric and decreasing in ``|d|``:

================  ==============================  ===================
name              K(d)                            K(0)
================  ==============================  ===================
``gaussian``      exp(-d²/2σ²) / (√(2π)·σ)        1/(√(2π)σ)
``rbf``           exp(-d²/2σ²)                    1
``cauchy``        1 / (σ·d² + 1)                  1
================  ==============================  ===================

For ``cauchy`` the parameter called σ (as in the seed paper's released code) is a precision γ in
1/years²: larger means narrower, so a search space needs a separate range for it.
"""

from __future__ import annotations

import math

import torch

from brainage_core.errors import LossError
from brainage_core.loss_registry import KERNELS


def check_positive(name: str, value: float) -> float:
    """Return ``value`` as a float, or raise :class:`LossError` naming parameter ``name`` unless it is
    finite and > 0 (σ, τ, τ₀ of every loss)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LossError(f"parameter {name!r} must be a number > 0, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise LossError(f"parameter {name!r} must be finite and > 0, got {value!r}")
    return number


def check_sigma(sigma: float) -> float:
    """Return ``sigma`` as a float, or raise :class:`LossError` unless it is finite and > 0."""
    return check_positive("sigma", sigma)


class AgeKernel:
    """A kernel K applied elementwise to age differences (years) in the dtype of its input.

    The values are computed in the input's dtype on purpose: the reference form of ``threshold``
    compares kernel values exactly as computed (ties, including underflowed zeros, matter).
    """

    def __init__(self, name: str, sigma: float) -> None:
        if name not in KERNELS:
            raise LossError(f"parameter 'kernel' must be one of {', '.join(KERNELS)}, got {name!r}")
        self.name = name
        self.sigma = check_sigma(sigma)

    @property
    def value_at_zero(self) -> float:
        """K(0), the largest value the kernel takes."""
        if self.name == "gaussian":
            return 1.0 / (math.sqrt(2.0 * math.pi) * self.sigma)
        return 1.0

    def __call__(self, difference: torch.Tensor) -> torch.Tensor:
        """K(difference), same shape and dtype as ``difference`` (years)."""
        sigma = self.sigma
        if self.name == "cauchy":
            return 1.0 / (sigma * difference.square() + 1.0)
        rbf = torch.exp(-difference.square() / (2.0 * sigma * sigma))
        if self.name == "gaussian":
            return rbf / (math.sqrt(2.0 * math.pi) * sigma)
        return rbf

    def __repr__(self) -> str:
        return f"AgeKernel({self.name!r}, sigma={self.sigma!r})"
