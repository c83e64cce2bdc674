"""The exponential loss L^exp of the seed paper (its proposed loss), in its two forms.

Seed paper: Barbano et al., "Contrastive learning for regression in multi-site brain age prediction",
IEEE ISBI 2023. The common kernel-weighted form (``docs/losses.md``), s_ab = z_a·z_b/τ,
W_ab = K(y_a − y_b)::

    L = (1/N) · Σ_a −(τ/τ₀) · Σ_{k≠a} [W_ak / Σ_{t≠a} W_at] · (num_ak − log D_a)

``form="paper"``:     num_ak = s_ak,  D_a = Σ_{j≠a} exp(s_aj · (1 − W_aj))

``form="reference"`` (the released code, default): the similarities are shifted by the row maximum
m_a = max_b s_ab (self included; a constant without gradient, = 1/τ for unit vectors) BEFORE the
weighting, so the shift does not cancel::

    ℓ_ab = s_ab − m_a,   num_ak = ℓ_ak,   D_a = Σ_{j≠a} exp(ℓ_aj · (1 − W_aj))

W must not exceed 1 (1 − W < 0 would turn repulsion into attraction): the ``gaussian`` kernel with
σ < 1/√(2π) (K(0) > 1) is refused.
"""

from __future__ import annotations

import torch

from brainage_core.errors import LossError
from brainage_core.loss_registry import METHODS, MIN_EXPW_GAUSSIAN_SIGMA
from brainage_core.losses.common import ContrastiveBatch, KernelWeightedLoss
from brainage_core.losses.kernels import AgeKernel

EXPW_FORMS: tuple[str, ...] = METHODS["expw"].forms


class ExpWLoss(KernelWeightedLoss):
    """L^exp: ``loss(features (B, V, d) unit-norm, ages (B,) years) -> scalar``."""

    def __init__(
        self,
        kernel: AgeKernel,
        *,
        form: str = "reference",
        temperature: float = 0.1,
        base_temperature: float = 0.07,
        gather_distributed: bool | None = None,
    ) -> None:
        super().__init__(
            kernel=kernel,
            temperature=temperature,
            base_temperature=base_temperature,
            gather_distributed=gather_distributed,
        )
        if form not in EXPW_FORMS:
            raise LossError(f"parameter 'form' of expw must be one of {', '.join(EXPW_FORMS)}, got {form!r}")
        if kernel.value_at_zero > 1.0:
            raise LossError(
                f"parameter 'sigma' of the gaussian kernel must be ≥ 1/√(2π) ≈ {MIN_EXPW_GAUSSIAN_SIGMA:.4f} "
                f"for expw (K(0) ≤ 1, else 1 − W < 0 turns repulsion into attraction), got {kernel.sigma!r}"
            )
        self.form = form

    def log_denominators(
        self, batch: ContrastiveBatch, similarities: torch.Tensor, weights: torch.Tensor, self_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.form == "reference":
            similarities = similarities - similarities.detach().max(dim=1, keepdim=True).values
        weighted = (similarities * (1.0 - weights)).masked_fill(self_mask, float("-inf"))
        return similarities, torch.logsumexp(weighted, dim=1, keepdim=True)
