"""Contrastive regression losses and supervised baselines (``docs/losses.md``).

``build_loss(method, ...)`` returns an ``nn.Module``. Contrastive methods are called as
``loss(features (B, V, d), ages (B,) years)``, with features L2-normalised except for ``rnc``;
supervised methods as ``loss(predictions (B,), ages (B,))``.

The methods, their modules and the parameters each takes (kernel, form, margin, reduction,
temperature) are declared once in :mod:`brainage_core.loss_registry`; ``build_loss`` checks its
arguments against it. In short: ``yaware`` (:mod:`.yaware`, kernel), ``supcon`` (:mod:`.yaware`),
``threshold`` (:mod:`.threshold`, kernel, form, margin with form paper, delta_reduction with form
reference), ``expw`` (:mod:`.expw`, kernel, form), ``rnc`` (:mod:`.rnc`), ``l1``/``mse``
(:mod:`.supervised`).
"""

from __future__ import annotations

from torch import nn

from brainage_core import loss_registry
from brainage_core.errors import LossError
from brainage_core.loss_registry import (
    CONTRASTIVE_METHODS,
    DEFAULT_SIGMA,
    DELTA_REDUCTIONS,
    FORM_METHODS,
    FORMS,
    KERNEL_METHODS,
    LOSS_METHODS,
    SUPERVISED_METHODS,
)
from brainage_core.losses.common import check_positive
from brainage_core.losses.expw import ExpWLoss
from brainage_core.losses.kernels import KERNELS, AgeKernel
from brainage_core.losses.rnc import RnCLoss
from brainage_core.losses.supervised import L1Loss, MSELoss
from brainage_core.losses.threshold import ThresholdLoss, check_margin
from brainage_core.losses.yaware import SupConLoss, YAwareLoss

__all__ = [
    "CONTRASTIVE_METHODS",
    "DELTA_REDUCTIONS",
    "FORMS",
    "FORM_METHODS",
    "KERNELS",
    "KERNEL_METHODS",
    "LOSS_METHODS",
    "SUPERVISED_METHODS",
    "AgeKernel",
    "ExpWLoss",
    "L1Loss",
    "MSELoss",
    "RnCLoss",
    "SupConLoss",
    "ThresholdLoss",
    "YAwareLoss",
    "build_loss",
]


def build_loss(
    method: str,
    *,
    kernel: str | None = None,
    sigma: float | None = None,
    temperature: float | None = None,
    base_temperature: float = 0.07,
    form: str | None = None,
    delta_reduction: str = "sum",
    threshold_margin: float = 0.0,
    gather_distributed: bool | None = None,
) -> nn.Module:
    """Build the loss ``method`` (one of CONTRASTIVE_METHODS + SUPERVISED_METHODS).

    ``temperature`` defaults to 0.1 (2.0 for ``rnc``; unused by ``l1``/``mse``), ``sigma`` to 1.0
    (years for ``gaussian``/``rbf``, a precision in 1/years² for ``cauchy``). ``kernel`` is required for
    ``yaware``, ``threshold``, ``expw`` and refused for the others; ``form`` defaults to ``reference``
    for ``threshold``/``expw`` and is refused for the others; ``delta_reduction`` other than ``sum``
    applies to ``threshold`` form ``reference`` only and a non-zero ``threshold_margin`` (years) to
    ``threshold`` form ``paper`` only. ``gather_distributed=None`` gathers across ranks when
    torch.distributed is initialised with world size > 1. Every invalid value raises
    :class:`LossError` naming the parameter and the value received.
    """
    if method not in LOSS_METHODS:
        raise LossError(f"parameter 'method' must be one of {', '.join(LOSS_METHODS)}, got {method!r}")
    info = loss_registry.METHODS[method]
    if kernel is not None and kernel not in KERNELS:
        raise LossError(f"parameter 'kernel' must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if info.kernel and kernel is None:
        raise LossError(f"parameter 'kernel' is required for method {method!r} (one of {', '.join(KERNELS)}), got None")
    if not info.kernel and kernel is not None:
        raise LossError(f"parameter 'kernel' does not apply to method {method!r} (use None), got {kernel!r}")
    if form is not None and form not in FORMS:
        raise LossError(f"parameter 'form' must be one of {', '.join(FORMS)}, got {form!r}")
    if not info.forms and form is not None:
        raise LossError(f"parameter 'form' applies to {' and '.join(FORM_METHODS)} only, got {form!r} for {method!r}")
    if delta_reduction not in DELTA_REDUCTIONS:
        raise LossError(
            f"parameter 'delta_reduction' must be one of {', '.join(DELTA_REDUCTIONS)}, got {delta_reduction!r}"
        )
    margin = check_margin(threshold_margin)
    resolved_form = form if form is not None else loss_registry.DEFAULT_FORM
    if delta_reduction != "sum" and not loss_registry.delta_reduction_applies(method, resolved_form):
        raise LossError(
            f"parameter 'delta_reduction' applies to threshold form 'reference' only, got {delta_reduction!r} "
            f"for method {method!r}" + (f" form {resolved_form!r}" if method in FORM_METHODS else "")
        )
    if margin != 0 and not loss_registry.margin_applies(method, resolved_form):
        raise LossError(
            f"parameter 'threshold_margin' applies to threshold form 'paper' only, got {threshold_margin!r} "
            f"for method {method!r}" + (f" form {resolved_form!r}" if method in FORM_METHODS else "")
        )
    if gather_distributed not in (None, True, False):
        raise LossError(f"parameter 'gather_distributed' must be None, True or False, got {gather_distributed!r}")

    if info.kind == "supervised":
        if gather_distributed:
            raise LossError(f"parameter 'gather_distributed' does not apply to method {method!r}, got True")
        return L1Loss() if method == "l1" else MSELoss()
    tau = info.default_temperature if temperature is None else check_positive("temperature", temperature)
    if method == "rnc":
        return RnCLoss(temperature=tau, gather_distributed=gather_distributed)

    common = {"temperature": tau, "base_temperature": base_temperature, "gather_distributed": gather_distributed}
    if method == "supcon":
        return SupConLoss(**common)
    age_kernel = AgeKernel(kernel, DEFAULT_SIGMA if sigma is None else sigma)
    if method == "yaware":
        return YAwareLoss(age_kernel, **common)
    if method == "threshold":
        return ThresholdLoss(
            age_kernel,
            form=resolved_form,
            delta_reduction=delta_reduction,
            threshold_margin=margin,
            **common,
        )
    return ExpWLoss(age_kernel, form=resolved_form, **common)
