"""Contrastive regression losses and supervised baselines (``docs/losses.md``).

``build_loss(method, ...)`` returns an ``nn.Module``. Contrastive methods are called as
``loss(features (B, V, d), ages (B,) years)``, with features L2-normalised except for ``rnc``;
supervised methods as ``loss(predictions (B,), ages (B,))``.

=============  ==============================================  ==================  =====================
method         module                                          kernel              form
=============  ==============================================  ==================  =====================
``yaware``     :mod:`.yaware` (y-Aware InfoNCE)                required            —
``supcon``     :mod:`.yaware` (2-year age bins; SimCLR w/o     refused             —
               ages)
``threshold``  :mod:`.threshold` (L^thr)                       required            reference | paper
``expw``       :mod:`.expw` (L^exp)                            required            reference | paper
``rnc``        :mod:`.rnc` (Rank-N-Contrast)                   refused             —
``l1``/``mse``  :mod:`.supervised`                             refused             —
=============  ==============================================  ==================  =====================
"""

from __future__ import annotations

from torch import nn

from brainage_core.errors import LossError
from brainage_core.losses.common import check_positive
from brainage_core.losses.expw import ExpWLoss
from brainage_core.losses.kernels import KERNELS, AgeKernel
from brainage_core.losses.rnc import RnCLoss
from brainage_core.losses.supervised import L1Loss, MSELoss
from brainage_core.losses.threshold import DELTA_REDUCTIONS, ThresholdLoss, check_margin
from brainage_core.losses.yaware import SupConLoss, YAwareLoss

CONTRASTIVE_METHODS: tuple[str, ...] = ("yaware", "supcon", "threshold", "expw", "rnc")
SUPERVISED_METHODS: tuple[str, ...] = ("l1", "mse")
KERNEL_METHODS: tuple[str, ...] = ("yaware", "threshold", "expw")
FORM_METHODS: tuple[str, ...] = ("threshold", "expw")
FORMS: tuple[str, ...] = ("reference", "paper")
DEFAULT_TEMPERATURE = 0.1
DEFAULT_RNC_TEMPERATURE = 2.0
DEFAULT_SIGMA = 1.0

__all__ = [
    "CONTRASTIVE_METHODS",
    "DELTA_REDUCTIONS",
    "FORMS",
    "KERNELS",
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
    methods = CONTRASTIVE_METHODS + SUPERVISED_METHODS
    if method not in methods:
        raise LossError(f"parameter 'method' must be one of {', '.join(methods)}, got {method!r}")
    if kernel is not None and kernel not in KERNELS:
        raise LossError(f"parameter 'kernel' must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if method in KERNEL_METHODS and kernel is None:
        raise LossError(f"parameter 'kernel' is required for method {method!r} (one of {', '.join(KERNELS)}), got None")
    if method not in KERNEL_METHODS and kernel is not None:
        raise LossError(f"parameter 'kernel' does not apply to method {method!r} (use None), got {kernel!r}")
    if form is not None and form not in FORMS:
        raise LossError(f"parameter 'form' must be one of {', '.join(FORMS)}, got {form!r}")
    if method not in FORM_METHODS and form is not None:
        raise LossError(f"parameter 'form' applies to {' and '.join(FORM_METHODS)} only, got {form!r} for {method!r}")
    if delta_reduction not in DELTA_REDUCTIONS:
        raise LossError(
            f"parameter 'delta_reduction' must be one of {', '.join(DELTA_REDUCTIONS)}, got {delta_reduction!r}"
        )
    margin = check_margin(threshold_margin)
    resolved_form = form if form is not None else "reference"
    if delta_reduction != "sum" and not (method == "threshold" and resolved_form == "reference"):
        raise LossError(
            f"parameter 'delta_reduction' applies to threshold form 'reference' only, got {delta_reduction!r} "
            f"for method {method!r}" + (f" form {resolved_form!r}" if method in FORM_METHODS else "")
        )
    if margin != 0 and not (method == "threshold" and resolved_form == "paper"):
        raise LossError(
            f"parameter 'threshold_margin' applies to threshold form 'paper' only, got {threshold_margin!r} "
            f"for method {method!r}" + (f" form {resolved_form!r}" if method in FORM_METHODS else "")
        )
    if gather_distributed not in (None, True, False):
        raise LossError(f"parameter 'gather_distributed' must be None, True or False, got {gather_distributed!r}")

    if method in SUPERVISED_METHODS:
        if gather_distributed:
            raise LossError(f"parameter 'gather_distributed' does not apply to method {method!r}, got True")
        return L1Loss() if method == "l1" else MSELoss()
    if method == "rnc":
        tau = DEFAULT_RNC_TEMPERATURE if temperature is None else check_positive("temperature", temperature)
        return RnCLoss(temperature=tau, gather_distributed=gather_distributed)

    tau = DEFAULT_TEMPERATURE if temperature is None else check_positive("temperature", temperature)
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
