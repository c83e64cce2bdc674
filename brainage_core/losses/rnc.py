"""Rank-N-Contrast (Zha et al., "Rank-N-Contrast: learning continuous representations for
regression", NeurIPS 2023) — beyond the seed paper.

Applied to unnormalised features (no unit-norm check). Similarity is the negative L2 distance and
d_ab = |y_a − y_b| the label distance (``docs/losses.md``)::

    s_ab = −‖z_a − z_b‖₂ / τ        (τ = 2 by default)
    L = −(1/(N(N−1))) · Σ_a Σ_{k≠a} log [ exp(s_ak) / Σ_{j≠a, d_aj ≥ d_ak} exp(s_aj) ]

k is in its own denominator; no τ/τ₀ factor. Computed in O(N² log N) time and O(N²) memory: each
anchor's row is sorted by label distance, a reversed cumulative logsumexp gives every tail sum, and a
binary search finds each k's first tied position. Distances come from the Gram matrix; the squared
distance is clamped away from 0 (at the rounding error of ‖z_a‖² + ‖z_b‖² for the largest norm of the
batch) before the square root, so identical views give a finite, zero gradient.
"""

from __future__ import annotations

import torch

from brainage_core.losses.common import ContrastiveBatch, ContrastiveLoss
from brainage_core.losses.ranking import ranked_log_denominators


def pairwise_distances(anchors: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """(n, N) Euclidean distances between the rows of ``anchors`` (n, d) and ``others`` (N, d)."""
    anchor_sq = anchors.square().sum(dim=1, keepdim=True)
    other_sq = others.square().sum(dim=1).unsqueeze(0)
    squared = torch.addmm(anchor_sq + other_sq, anchors, others.T, alpha=-2.0)
    # rounding of the Gram form is ~eps·(‖z_a‖² + ‖z_b‖²): below that a distance is 0 (no gradient)
    floor = 8.0 * torch.finfo(squared.dtype).eps * 2.0 * float(other_sq.detach().max().clamp_min(1e-30))
    return torch.sqrt(squared.clamp_min(floor))


class RnCLoss(ContrastiveLoss):
    """Rank-N-Contrast: ``loss(features (B, V, d), ages (B,) years) -> scalar``."""

    requires_unit_norm = False

    def __init__(self, *, temperature: float = 2.0, gather_distributed: bool | None = None) -> None:
        super().__init__(temperature=temperature, gather_distributed=gather_distributed)

    def anchor_losses(self, batch: ContrastiveBatch) -> tuple[torch.Tensor, torch.Tensor]:
        distances = pairwise_distances(batch.embeddings[batch.anchors], batch.embeddings)
        similarities = distances * (-1.0 / self.temperature)
        log_denominators = ranked_log_denominators(
            similarities, batch.subject_ages(), batch.anchors, batch.views, inclusive=True
        )
        rows = torch.arange(batch.anchors.shape[0], device=batch.anchors.device)
        own = similarities[rows, batch.anchors] - log_denominators[rows, batch.anchors]
        # Σ_{k≠a} (s_ak − log D_ak): the full row sums less the anchor's own column
        total = similarities.sum(dim=1) - log_denominators.sum(dim=1) - own
        losses = -total / (batch.size - 1)
        return losses, torch.ones_like(losses, dtype=torch.bool)
