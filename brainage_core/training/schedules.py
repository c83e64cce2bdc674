"""Optimizers and per-epoch learning-rate schedules.

The schedule is a multiplicative factor of the base learning rate, stepped once per epoch (epochs
counted from 0 here; the training loop's 1-based epoch ``e`` trains with ``lr_factor(e - 1)``):

- optional linear warm-up over ``warmup_epochs``: factor ``(e + 1) / warmup_epochs`` for ``e < warmup``;
  the decay below then counts its epochs ``t = e - warmup`` from the end of the warm-up;
- ``step``: ``rate ** (t // step_every)`` (×rate every ``step_every`` epochs, as ``StepLR``);
- ``cosine``: from 1 down to ``rate**3`` over the remaining ``epochs - warmup`` epochs
  (η_min = lr·rate³, as in the SupCon reference code);
- ``none``: 1.

The scheduler is a ``torch.optim.lr_scheduler.LambdaLR`` whose state dict (``last_epoch``,
``base_lrs``…) holds only plain values, so it checkpoints with ``weights_only=True``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from brainage_core.errors import ConfigError

SCHEDULES = ("step", "cosine", "none")
OPTIMIZERS = ("adam", "sgd")

__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "build_scheduler", "lr_factor"]


def lr_factor(
    epoch: int, *, name: str, epochs: int, step_every: int = 10, rate: float = 0.9, warmup_epochs: int = 0
) -> float:
    """The learning-rate multiplier of 0-based ``epoch`` (see the module docstring); in (0, 1]."""
    if name not in SCHEDULES:
        raise ConfigError(f"schedule.name = {name!r}: expected one of {', '.join(SCHEDULES)}")
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    t = epoch - warmup_epochs
    if name == "step":
        return rate ** (t // step_every)
    if name == "cosine":
        span = max(epochs - warmup_epochs, 1)
        floor = rate**3
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(t, span) / span))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, schedule_cfg, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor`; call ``.step()`` once at the end of every epoch.

    ``schedule_cfg`` has ``name``, ``step_every``, ``rate`` and ``warmup_epochs`` (``ScheduleConfig``).
    """
    name = schedule_cfg.name
    step_every = int(schedule_cfg.step_every)
    rate = float(schedule_cfg.rate)
    warmup = int(schedule_cfg.warmup_epochs)
    lr_factor(0, name=name, epochs=epochs)  # validate the name once, here

    def factor(epoch: int) -> float:
        return lr_factor(epoch, name=name, epochs=epochs, step_every=step_every, rate=rate, warmup_epochs=warmup)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(params: Iterable[torch.nn.Parameter], optimizer_cfg) -> torch.optim.Optimizer:
    """Adam or SGD (with momentum) from ``optimizer_cfg`` (``name``, ``lr``, ``weight_decay``, ``momentum``)."""
    name = optimizer_cfg.name
    if name == "adam":
        return torch.optim.Adam(params, lr=optimizer_cfg.lr, weight_decay=optimizer_cfg.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=optimizer_cfg.lr, momentum=optimizer_cfg.momentum, weight_decay=optimizer_cfg.weight_decay
        )
    raise ConfigError(f"optimizer.name = {name!r}: expected one of {', '.join(OPTIMIZERS)}")
