"""y-Aware InfoNCE and its binned special case, supervised contrastive (SupCon).

y-Aware InfoNCE (Dufumier et al., "Contrastive learning with continuous proxy meta-data for 3D MRI
classification", MICCAI 2021), in the common kernel-weighted form of ``docs/losses.md``::

    L = (1/N) · Σ_a −(τ/τ₀) · Σ_{k≠a} [W_ak / Σ_{t≠a} W_at] · (s_ak − log D_a),
    D_a = Σ_{j≠a} exp(s_aj),   s_ab = z_a·z_b/τ,   W_ab = K(y_a − y_b)

SupCon (Khosla et al., "Supervised contrastive learning", NeurIPS 2020) is the same with
W_ab = 1[bin(y_a) = bin(y_b)], bin(y) the smallest even number ≥ y in 4, 6, …, 90 (2-year bins; ages
below 4 go to 4, above 90 to 90), and no kernel. With no ages at all (``ages=None``) W_ab =
1[a mod B = b mod B]: positives are the other views of the same subject, i.e. SimCLR (Chen et al.,
ICML 2020), which needs V ≥ 2.
"""

from __future__ import annotations

import torch

from brainage_core.losses.common import ContrastiveBatch, KernelWeightedLoss
from brainage_core.losses.kernels import AgeKernel

SUPCON_FIRST_BIN = 4.0
SUPCON_LAST_BIN = 90.0


def supcon_age_bin(ages: torch.Tensor) -> torch.Tensor:
    """The 2-year bin of each age: the smallest even number ≥ age, clamped to [4, 90] (years)."""
    return (2.0 * torch.ceil(ages / 2.0)).clamp(SUPCON_FIRST_BIN, SUPCON_LAST_BIN)


class YAwareLoss(KernelWeightedLoss):
    """y-Aware InfoNCE: ``loss(features (B, V, d) unit-norm, ages (B,) years) -> scalar``."""

    def __init__(
        self,
        kernel: AgeKernel,
        *,
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

    def log_denominators(
        self, batch: ContrastiveBatch, similarities: torch.Tensor, weights: torch.Tensor, self_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        others = similarities.masked_fill(self_mask, float("-inf"))
        return similarities, torch.logsumexp(others, dim=1, keepdim=True)


class SupConLoss(YAwareLoss):
    """SupCon with 2-year age bins (SimCLR when ``ages`` is None): ``loss(features, ages=None)``."""

    ages_optional = True

    def __init__(
        self,
        *,
        temperature: float = 0.1,
        base_temperature: float = 0.07,
        gather_distributed: bool | None = None,
    ) -> None:
        super().__init__(
            kernel=None,  # type: ignore[arg-type]
            temperature=temperature,
            base_temperature=base_temperature,
            gather_distributed=gather_distributed,
        )

    def positive_weights(self, batch: ContrastiveBatch) -> torch.Tensor:
        dtype = batch.embeddings.dtype
        if batch.ages is None:
            subject = torch.arange(batch.size, device=batch.embeddings.device) % batch.subjects
            return (subject[batch.anchors].unsqueeze(1) == subject.unsqueeze(0)).to(dtype)
        bins = supcon_age_bin(batch.ages)
        return (bins[batch.anchors].unsqueeze(1) == bins.unsqueeze(0)).to(dtype)
