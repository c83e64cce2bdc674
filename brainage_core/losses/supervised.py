"""Supervised baselines on a regression head: ``l1`` (mean absolute error, years) and ``mse``
(mean squared error, years²): ``loss(predictions (B,), ages (B,)) -> scalar``.

Half-precision predictions are upcast to float32 (float64 stays float64) and computed with
autocast disabled.
"""

from __future__ import annotations

import torch
from torch import nn

from brainage_core.errors import LossError
from brainage_core.losses.common import check_ages_finite, check_ages_shape, compute_dtype


class SupervisedLoss(nn.Module):
    """Mean of a pointwise error between predicted and true ages."""

    name = "supervised"

    def pointwise(self, errors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, predictions: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        if not isinstance(predictions, torch.Tensor) or predictions.ndim != 1 or not predictions.is_floating_point():
            shape = tuple(predictions.shape) if isinstance(predictions, torch.Tensor) else type(predictions).__name__
            raise LossError(f"parameter 'predictions' of {self.name} must be a floating tensor (B,), got {shape}")
        if predictions.shape[0] < 1:
            raise LossError(f"parameter 'predictions' of {self.name} must hold at least one prediction, got 0")
        ages = check_ages_shape(ages, predictions.shape[0], predictions.device)
        dtype = compute_dtype(predictions.dtype)
        with torch.autocast(device_type=predictions.device.type, enabled=False):
            ages = ages.to(dtype)
            check_ages_finite(ages)
            return self.pointwise(predictions.to(dtype) - ages).mean()


class L1Loss(SupervisedLoss):
    """Mean absolute error (years)."""

    name = "l1"

    def pointwise(self, errors: torch.Tensor) -> torch.Tensor:
        return errors.abs()


class MSELoss(SupervisedLoss):
    """Mean squared error (years²)."""

    name = "mse"

    def pointwise(self, errors: torch.Tensor) -> torch.Tensor:
        return errors.square()
