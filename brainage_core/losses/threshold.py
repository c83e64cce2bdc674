"""The threshold loss L^thr of the seed paper, in its two forms.

Seed paper: Barbano et al., "Contrastive learning for regression in multi-site brain age prediction",
IEEE ISBI 2023 (losses L^thr and L^exp). The common kernel-weighted form
(``docs/losses.md``), s_ab = z_a·z_b/τ, W_ab = K(y_a − y_b)::

    L = (1/N) · Σ_a −(τ/τ₀) · Σ_{k≠a} [W_ak / Σ_{t≠a} W_at] · (s_ak − log D_ak)

``form="paper"`` — for anchor a and positive k, push away only the samples farther in age from a than k
is, by more than the margin δ ≥ 0 (years)::

    D_ak = exp(s_ak) + Σ_{j≠a, j≠k} 1[|y_a − y_j| > |y_a − y_k| + δ] · exp(s_aj)

computed in O(N² log N) time and O(N²) memory (sort by age distance, reversed cumulative logsumexp,
binary search for each k's cut-off).

``form="reference"`` — what the paper's released code computes (one denominator per anchor)::

    c_aj = #{k ∈ 1..N : W_jk < W_ja}           (kernel values as computed, ties not counted)
    D_a  = Σ_{j≠a} c_aj · exp(s_aj − m_a),     numerator s_ak − m_a  (m_a = max_b s_ab cancels)

``delta_reduction="mean"`` divides c by N (the loss shifts by −(τ/τ₀)·log N, same gradients). An anchor
with positives and D_a = 0 (all ages equal, or V = 1 and an anchor at the extreme age for every j)
raises :class:`LossError` naming the anchor index and its age.
"""

from __future__ import annotations

import math

import torch

from brainage_core.errors import LossError
from brainage_core.loss_registry import DELTA_REDUCTIONS, METHODS
from brainage_core.losses.common import ContrastiveBatch, KernelWeightedLoss
from brainage_core.losses.kernels import AgeKernel
from brainage_core.losses.ranking import ranked_log_denominators, tie_group_bounds

THRESHOLD_FORMS: tuple[str, ...] = METHODS["threshold"].forms


class ThresholdLoss(KernelWeightedLoss):
    """L^thr: ``loss(features (B, V, d) unit-norm, ages (B,) years) -> scalar``."""

    def __init__(
        self,
        kernel: AgeKernel,
        *,
        form: str = "reference",
        temperature: float = 0.1,
        base_temperature: float = 0.07,
        delta_reduction: str = "sum",
        threshold_margin: float = 0.0,
        gather_distributed: bool | None = None,
    ) -> None:
        super().__init__(
            kernel=kernel,
            temperature=temperature,
            base_temperature=base_temperature,
            gather_distributed=gather_distributed,
        )
        if form not in THRESHOLD_FORMS:
            raise LossError(f"parameter 'form' of threshold must be one of {', '.join(THRESHOLD_FORMS)}, got {form!r}")
        if delta_reduction not in DELTA_REDUCTIONS:
            raise LossError(
                f"parameter 'delta_reduction' must be one of {', '.join(DELTA_REDUCTIONS)}, got {delta_reduction!r}"
            )
        margin = check_margin(threshold_margin)
        if form == "paper" and delta_reduction != "sum":
            raise LossError(
                f"parameter 'delta_reduction' applies to threshold form 'reference' only, got {delta_reduction!r} "
                "with form 'paper'"
            )
        if form == "reference" and margin != 0:
            raise LossError(
                f"parameter 'threshold_margin' applies to threshold form 'paper' only, got {threshold_margin!r} "
                "with form 'reference'"
            )
        self.form = form
        self.delta_reduction = delta_reduction
        self.threshold_margin = float(margin)

    def log_denominators(
        self, batch: ContrastiveBatch, similarities: torch.Tensor, weights: torch.Tensor, self_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.form == "paper":
            log_denominators = ranked_log_denominators(
                similarities,
                batch.subject_ages(),
                batch.anchors,
                batch.views,
                margin=self.threshold_margin,
                add_positive=True,
            )
            return similarities, log_denominators
        return similarities, self._reference_log_denominators(batch, similarities, self_mask)

    def _reference_log_denominators(
        self, batch: ContrastiveBatch, similarities: torch.Tensor, self_mask: torch.Tensor
    ) -> torch.Tensor:
        with torch.no_grad():
            log_counts = self._reference_log_counts(batch)[batch.anchor_subjects()].repeat(1, batch.views)
            log_counts = log_counts.masked_fill(self_mask, float("-inf"))
            # anchors without positives are left out of the mean; keep their (unused) terms finite
            no_count = torch.isneginf(log_counts).all(dim=1, keepdim=True)
            log_counts = torch.where(no_count, torch.zeros_like(log_counts), log_counts)
        return torch.logsumexp(similarities + log_counts, dim=1, keepdim=True)

    def _reference_log_counts(self, batch: ContrastiveBatch) -> torch.Tensor:
        """(B, B) log c between subjects: c_aj = #{k ∈ 1..N : W_jk < W_ja} (/ N for 'mean').

        W is the B×B subject kernel matrix tiled V×V, so c_aj = V·#{subjects m : W_jm < W_ja} depends
        on the subjects of a and j only. Raises :class:`LossError` on an anchor with positives and D_a = 0.
        """
        subject_ages = batch.subject_ages()
        weights = self.kernel(subject_ages.unsqueeze(1) - subject_ages.unsqueeze(0))  # (B, B)
        ascending, order = torch.sort(weights, dim=1, stable=True)
        # row l, column i: #{m : W_lm < W_li} (a binary search of W_li in its sorted row), the kernel
        # values compared exactly as computed, ties not counted
        counts = batch.views * tie_group_bounds(ascending, order, after=False).T.to(weights.dtype)
        if self.delta_reduction == "mean":
            counts = counts / batch.size
        # Σ_{j≠a}: the other subjects' V views, and the V − 1 other views of the anchor's own subject
        own = torch.eye(batch.subjects, dtype=torch.bool, device=weights.device)
        others_views = float(batch.views - 1)
        denominator_mass = counts.masked_fill(own, 0.0).sum(dim=1) + others_views * counts.diagonal()
        positive_mass = weights.masked_fill(own, 0.0).sum(dim=1) + others_views * weights.diagonal()
        empty = (denominator_mass == 0) & (positive_mass > 0)
        if bool(empty.any()):
            anchor = int(empty.nonzero()[0, 0])  # view 0 of the first such subject
            raise LossError(
                f"parameter 'ages': threshold (form 'reference') has an empty denominator D_a = 0 for anchor "
                f"{anchor} (subject {anchor}, view 0, age {float(subject_ages[anchor]):g}): no sample j has a "
                "sample farther from it than the anchor (all ages equal, or V = 1 with an extreme age); use "
                "varied ages or form 'paper'"
            )
        return torch.log(counts)


def check_margin(value: float) -> float:
    """Return the margin δ (years) as a float, or raise :class:`LossError` unless finite and ≥ 0."""
    try:
        margin = float(value)
    except (TypeError, ValueError):
        raise LossError(f"parameter 'threshold_margin' must be a number ≥ 0 (years), got {value!r}") from None
    if not math.isfinite(margin) or margin < 0:
        raise LossError(f"parameter 'threshold_margin' must be finite and ≥ 0 (years), got {value!r}")
    return margin
