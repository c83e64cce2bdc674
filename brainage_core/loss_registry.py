"""The loss methods and the parameters each one takes: the one list the project reads.

``brainage_core/config/`` validates ``loss.*`` against it (``schema.py``, ``rules.py``),
``brainage_core.losses.build_loss`` and the loss classes check their arguments against it, and the
search spaces (through the config) inherit it.
The math of each method is in ``docs/losses.md`` and its family module under ``brainage_core/losses/``.

This module sits beside the ``losses`` package rather than inside it because it must import without
torch: validating a YAML (``brainage_core.config``, ``study.space``) never loads torch, and importing
``brainage_core.losses.<anything>`` would run the package's ``__init__``, which does.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CONTRASTIVE_METHODS", "DEFAULT_FORM", "DEFAULT_SIGMA", "DELTA_REDUCTIONS", "FORMS", "FORM_METHODS",
           "KERNELS", "KERNEL_METHODS", "LOSS_METHODS", "METHODS", "MIN_EXPW_GAUSSIAN_SIGMA", "SUPERVISED_METHODS",
           "LossMethod", "delta_reduction_applies", "margin_applies", "method_info"]

#: age kernels (``brainage_core/losses/kernels.py``)
KERNELS: tuple[str, ...] = ("gaussian", "rbf", "cauchy")
#: the two forms of ``threshold`` and ``expw``; ``reference`` (the released code) is the default
FORMS: tuple[str, ...] = ("reference", "paper")
DEFAULT_FORM = "reference"
#: ``delta_reduction`` values of ``threshold`` form ``reference``
DELTA_REDUCTIONS: tuple[str, ...] = ("sum", "mean")
DEFAULT_SIGMA = 1.0
#: expw needs W ≤ 1: the gaussian kernel's K(0) = 1/(√(2π)σ) exceeds 1 below this σ
MIN_EXPW_GAUSSIAN_SIGMA = 0.3989422804014327  # 1/√(2π)


@dataclass(frozen=True)
class LossMethod:
    """One loss method.

    ``kind``: ``contrastive`` (called on features (B, V, d) and ages (B,)) or ``supervised`` (on
    predictions (B,) and ages (B,)). ``kernel``: a kernel (and σ) is required, else refused. ``forms``:
    the forms it accepts (empty: ``form`` is refused). ``margin_form`` / ``delta_reduction_form``: the form
    under which a non-zero ``threshold_margin`` / a ``delta_reduction`` other than ``sum`` applies (None:
    never). ``default_temperature``: τ when none is given (None: no temperature). ``scaled``: the loss
    carries the τ/τ₀ factor (takes ``base_temperature``). ``unit_norm``: the embeddings must be
    L2-normalised. ``module``: its file under ``brainage_core/losses/``. ``reference``: the paper.
    """

    name: str
    kind: str
    module: str
    reference: str
    kernel: bool = False
    forms: tuple[str, ...] = ()
    margin_form: str | None = None
    delta_reduction_form: str | None = None
    default_temperature: float | None = None
    scaled: bool = False
    unit_norm: bool = False

    @property
    def parameters(self) -> tuple[str, ...]:
        """The ``build_loss`` keyword arguments (``loss.*`` config keys) this method takes."""
        names: list[str] = []
        if self.default_temperature is not None:
            names.append("temperature")
        if self.scaled:
            names.append("base_temperature")
        if self.kernel:
            names += ["kernel", "sigma"]
        if self.forms:
            names.append("form")
        if self.delta_reduction_form is not None:
            names.append("delta_reduction")
        if self.margin_form is not None:
            names.append("threshold_margin")
        return tuple(names)


_PAPER = "Barbano et al., Contrastive learning for regression in multi-site brain age prediction, ISBI 2023"
_KERNEL_WEIGHTED = {"kind": "contrastive", "default_temperature": 0.1, "scaled": True, "unit_norm": True}

METHODS: dict[str, LossMethod] = {m.name: m for m in (
    LossMethod("yaware", module="yaware.py", kernel=True, **_KERNEL_WEIGHTED,
               reference="Dufumier et al., Contrastive learning with continuous proxy meta-data for 3D MRI "
                         "classification, MICCAI 2021"),
    LossMethod("supcon", module="yaware.py", **_KERNEL_WEIGHTED,
               reference="Khosla et al., Supervised contrastive learning, NeurIPS 2020"),
    LossMethod("threshold", module="threshold.py", kernel=True, forms=FORMS, margin_form="paper",
               delta_reduction_form="reference", **_KERNEL_WEIGHTED, reference=_PAPER),
    LossMethod("expw", module="expw.py", kernel=True, forms=FORMS, **_KERNEL_WEIGHTED, reference=_PAPER),
    LossMethod("rnc", kind="contrastive", module="rnc.py", default_temperature=2.0,
               reference="Zha et al., Rank-N-Contrast: learning continuous representations for regression, "
                         "NeurIPS 2023"),
    LossMethod("l1", kind="supervised", module="supervised.py", reference="mean absolute error"),
    LossMethod("mse", kind="supervised", module="supervised.py", reference="mean squared error"),
)}

LOSS_METHODS: tuple[str, ...] = tuple(METHODS)
CONTRASTIVE_METHODS: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.kind == "contrastive")
SUPERVISED_METHODS: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.kind == "supervised")
KERNEL_METHODS: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.kernel)
FORM_METHODS: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.forms)


def method_info(name: str) -> LossMethod:
    """The :class:`LossMethod` called ``name``; KeyError naming the valid methods otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"loss method {name!r}: expected one of {', '.join(LOSS_METHODS)}") from None


def margin_applies(method: str, form: str | None) -> bool:
    """Whether a non-zero ``threshold_margin`` is meaningful for ``method`` with ``form`` (None: default)."""
    m = METHODS.get(method)
    return m is not None and m.margin_form is not None and (form or DEFAULT_FORM) == m.margin_form


def delta_reduction_applies(method: str, form: str | None) -> bool:
    """Whether a ``delta_reduction`` other than ``sum`` is meaningful for ``method`` with ``form``."""
    m = METHODS.get(method)
    return m is not None and m.delta_reduction_form is not None and (form or DEFAULT_FORM) == m.delta_reduction_form
