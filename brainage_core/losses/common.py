"""What every contrastive loss shares: input validation, upcasting, view-major stacking, the DDP
gather, the mean over anchors that have positives, and the common kernel-weighted form.

Conventions (``docs/losses.md``): ``features`` (B, V, d), ``ages`` (B,) in years. The
N = V·B embeddings are stacked view-major (all subjects of view 0, then view 1, ...); embedding a
belongs to subject a mod B. Half-precision inputs are upcast to float32 (float64 stays float64) and
the loss is computed with autocast disabled, so it is stable for τ down to 0.01 under bf16 autocast.

The common kernel-weighted form, with s_ab = z_a·z_b/τ and W_ab = K(y_a − y_b):

    L = (1/N) · Σ_a −(τ/τ₀) · Σ_{k≠a} [W_ak / Σ_{t≠a} W_at] · (s_ak − log D_ak)

An anchor whose positives all have weight 0 is left out of the mean; when none has one, the loss
raises :class:`LossError`.

Under DDP (``gather_distributed``), every rank gathers the embeddings and ages of all ranks and
computes the loss of its LOCAL anchors against all of them. The per-rank loss is the sum over its
local anchors divided by (number of anchors with positives over all ranks) / world size: when every
anchor has positives (the usual case) that is the mean over the local anchors, and in every case the
mean of the per-rank losses equals the single-process loss and DDP's averaged gradients equal the
single-process gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from brainage_core.errors import LossError
from brainage_core.losses import distributed
from brainage_core.losses.kernels import AgeKernel, check_positive

HALF_DTYPES = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, bf16, fp16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit_norm_tolerance(dtype: torch.dtype) -> float:
    """Allowed | ‖z‖ − 1 |: 1e-2 for half-precision inputs, 1e-3 otherwise."""
    return 1e-2 if dtype in HALF_DTYPES else 1e-3


def check_features_shape(features: object) -> torch.Tensor:
    """Raise :class:`LossError` unless ``features`` is a floating tensor (B, V, d) with V·B ≥ 2."""
    if not isinstance(features, torch.Tensor):
        raise LossError(f"parameter 'features' must be a torch.Tensor (B, V, d), got {type(features).__name__}")
    if features.ndim != 3:
        raise LossError(f"parameter 'features' must have shape (B, V, d), got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise LossError(f"parameter 'features' must be a floating-point tensor, got dtype {features.dtype}")
    batch, views, dim = features.shape
    if batch < 1 or views < 1 or dim < 1 or batch * views < 2:
        raise LossError(
            f"parameter 'features' needs at least 2 embeddings (B·V ≥ 2, d ≥ 1), got shape {tuple(features.shape)}"
        )
    return features


def check_ages_shape(ages: object, batch: int, device: torch.device) -> torch.Tensor:
    """Raise :class:`LossError` unless ``ages`` is a 1-D sequence of ``batch`` numbers; return a tensor."""
    if not isinstance(ages, torch.Tensor):
        try:
            ages = torch.as_tensor(ages)
        except (TypeError, ValueError, RuntimeError):
            found = type(ages).__name__
            raise LossError(f"parameter 'ages' must be a tensor of shape ({batch},), got {found}") from None
    if ages.ndim != 1 or ages.shape[0] != batch:
        raise LossError(
            f"parameter 'ages' must have shape ({batch},) to match features (B={batch}), got shape {tuple(ages.shape)}"
        )
    if ages.dtype == torch.bool or ages.is_complex():
        raise LossError(f"parameter 'ages' must hold real numbers (years), got dtype {ages.dtype}")
    return ages.to(device)


def check_ages_finite(ages: torch.Tensor) -> None:
    """Raise :class:`LossError` naming the first NaN/inf age (index in the (gathered) batch)."""
    finite = torch.isfinite(ages)
    if not bool(finite.all()):
        index = int((~finite).nonzero()[0, 0])
        raise LossError(f"parameter 'ages' must be finite (years), got ages[{index}] = {float(ages[index])}")


def check_unit_norm(features: torch.Tensor, input_dtype: torch.dtype) -> None:
    """Raise :class:`LossError` unless every embedding has ‖z‖ within the tolerance of 1."""
    tolerance = unit_norm_tolerance(input_dtype)
    deviation = (torch.linalg.vector_norm(features.detach(), dim=-1) - 1.0).abs()
    good = deviation <= tolerance  # NaN compares False, so non-finite embeddings fail too
    if not bool(good.all()):
        subject, view = (int(i) for i in (~good).nonzero()[0])
        norm = float(torch.linalg.vector_norm(features[subject, view].detach()))
        raise LossError(
            f"parameter 'features' must be L2-normalised (|‖z‖ − 1| ≤ {tolerance:g} for {input_dtype}), "
            f"got ‖features[{subject}, {view}]‖ = {norm:.6g}"
        )


@dataclass(frozen=True)
class ContrastiveBatch:
    """The stacked batch one process computes its loss on.

    ``embeddings`` (N, d) and ``ages`` (N,) hold ALL embeddings (gathered over ranks under DDP),
    view-major; ``anchors`` (n,) are the indices (into 0..N−1) of the anchors of this process;
    ``subjects`` is the (global) B, so embedding a belongs to subject a mod B.
    """

    embeddings: torch.Tensor
    ages: torch.Tensor | None
    anchors: torch.Tensor
    subjects: int
    views: int

    @property
    def size(self) -> int:
        """N = V·B, the number of embeddings."""
        return self.embeddings.shape[0]

    def anchor_subjects(self) -> torch.Tensor:
        """(n,) subject of each anchor (anchor index mod B)."""
        return self.anchors % self.subjects

    def subject_ages(self) -> torch.Tensor:
        """(B,) age of each subject (the ages of view 0)."""
        return self.ages[: self.subjects]

    def similarities(self, temperature: float) -> torch.Tensor:
        """(n, N) s_ab = z_a·z_b / τ for the anchors a against all embeddings b (self included)."""
        return self.embeddings[self.anchors] @ self.embeddings.T / temperature

    def self_mask(self) -> torch.Tensor:
        """(n, N) bool, True at each anchor's own column (the sums over b exclude b = a)."""
        columns = torch.arange(self.size, device=self.anchors.device)
        return columns.unsqueeze(0) == self.anchors.unsqueeze(1)


def local_anchor_indices(layout: distributed.RankLayout, views: int, device: torch.device) -> torch.Tensor:
    """Indices, in the gathered view-major stacking, of this rank's embeddings (all its views)."""
    subjects = torch.arange(layout.local_batch, device=device) + layout.rank * layout.local_batch
    view_offsets = torch.arange(views, device=device) * layout.global_batch
    return (view_offsets.unsqueeze(1) + subjects.unsqueeze(0)).reshape(-1)


class ContrastiveLoss(nn.Module):
    """Base of the contrastive losses: ``loss(features (B, V, d), ages (B,)) -> scalar tensor``.

    Subclasses implement :meth:`anchor_losses`, returning the loss of each anchor (n,) (finite even for
    anchors without positives) and a boolean mask (n,) of the anchors that have positives.
    """

    requires_unit_norm: bool = True
    ages_optional: bool = False

    def __init__(self, *, temperature: float, gather_distributed: bool | None = None) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        if gather_distributed not in (None, True, False):
            raise LossError(f"parameter 'gather_distributed' must be None, True or False, got {gather_distributed!r}")
        self.gather_distributed = gather_distributed

    def anchor_losses(self, batch: ContrastiveBatch) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, features: torch.Tensor, ages: torch.Tensor | None = None) -> torch.Tensor:
        features = check_features_shape(features)
        batch, views, _ = features.shape
        input_dtype = features.dtype
        if ages is None:
            if not self.ages_optional:
                raise LossError(f"parameter 'ages' is required by {type(self).__name__}, got None")
        else:
            ages = check_ages_shape(ages, batch, features.device)

        rank, world_size = distributed.distributed_world()
        gather = distributed.resolve_gather(self.gather_distributed)
        if gather and world_size == 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise LossError("parameter 'gather_distributed' is True but torch.distributed is not initialised")
        if not gather:
            rank, world_size = 0, 1
        layout = distributed.RankLayout(rank=rank, world_size=world_size, local_batch=batch)

        dtype = compute_dtype(input_dtype)
        with torch.autocast(device_type=features.device.type, enabled=False):
            if world_size > 1:
                distributed.check_equal_local_batches(batch, features.device)
                features = distributed.all_gather_with_gradient(features)
                if ages is not None:
                    ages = distributed.all_gather_constant(ages)
            features = features.to(dtype)
            if ages is not None:
                ages = ages.to(dtype)
                check_ages_finite(ages)
            if self.requires_unit_norm:
                check_unit_norm(features, input_dtype)
            else:
                check_finite_features(features)
            stacked = ContrastiveBatch(
                embeddings=features.transpose(0, 1).reshape(views * layout.global_batch, -1),
                ages=None if ages is None else ages.repeat(views),
                anchors=local_anchor_indices(layout, views, features.device),
                subjects=layout.global_batch,
                views=views,
            )
            losses, has_positive = self.anchor_losses(stacked)
            return mean_over_anchors(losses, has_positive, world_size)


def check_finite_features(features: torch.Tensor) -> None:
    """Raise :class:`LossError` naming the first embedding with a NaN/inf entry."""
    finite = torch.isfinite(features.detach()).all(dim=-1)
    if not bool(finite.all()):
        subject, view = (int(i) for i in (~finite).nonzero()[0])
        raise LossError(f"parameter 'features' must be finite, got a NaN/inf in features[{subject}, {view}]")


def mean_over_anchors(losses: torch.Tensor, has_positive: torch.Tensor, world_size: int) -> torch.Tensor:
    """Sum of the losses of the anchors with positives / (their count over all ranks / world size)."""
    count = has_positive.sum()
    if world_size > 1:
        count = distributed.sum_across_ranks(count)
    total = int(count)
    if total == 0:
        raise LossError(
            "parameter 'ages': no anchor has a positive of non-zero weight (all kernel weights are 0, or V = 1 "
            "with every subject alone in its age bin); widen the kernel or use V ≥ 2"
        )
    # where (not indexing) keeps every anchor in the graph, so the DDP gather's backward runs on all ranks
    return torch.where(has_positive, losses, torch.zeros_like(losses)).sum() * (world_size / total)


class KernelWeightedLoss(ContrastiveLoss):
    """The common kernel-weighted form; subclasses give the log-denominators log D_ak.

    ``positive_weights`` gives W_ab for the anchors (n, N) (a kernel of the age difference by default),
    ``log_denominators`` gives log D (n, 1) or (n, N − 1) and the numerator similarity (n, N − 1)
    (s_ak, or a shifted version of it).
    """

    def __init__(
        self,
        *,
        kernel: AgeKernel | None,
        temperature: float,
        base_temperature: float = 0.07,
        gather_distributed: bool | None = None,
    ) -> None:
        super().__init__(temperature=temperature, gather_distributed=gather_distributed)
        self.kernel = kernel
        self.base_temperature = check_positive("base_temperature", base_temperature)

    @property
    def scale(self) -> float:
        """τ/τ₀: the reference code's loss scale (keeps logged values comparable)."""
        return self.temperature / self.base_temperature

    def positive_weights(self, batch: ContrastiveBatch) -> torch.Tensor:
        """(n, N) W_ab = K(y_a − y_b) for the anchors a against all embeddings b.

        Computed on the B×B subject ages and tiled over the views (the same values, V² fewer kernels).
        """
        subject_ages = batch.subject_ages()
        subject_weights = self.kernel(subject_ages.unsqueeze(1) - subject_ages.unsqueeze(0))
        return subject_weights[batch.anchor_subjects()].repeat(1, batch.views)

    def log_denominators(
        self, batch: ContrastiveBatch, similarities: torch.Tensor, weights: torch.Tensor, self_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Given s (n, N), W (n, N) and the self mask (n, N), return (numerator (n, N), log D (n, 1 | N)).

        Both must be finite everywhere, the anchors' own columns included (their weight is 0).
        """
        raise NotImplementedError

    def anchor_losses(self, batch: ContrastiveBatch) -> tuple[torch.Tensor, torch.Tensor]:
        similarities = batch.similarities(self.temperature)
        weights = self.positive_weights(batch)
        self_mask = batch.self_mask()
        numerator, log_denominator = self.log_denominators(batch, similarities, weights, self_mask)
        weights = weights.masked_fill(self_mask, 0.0)
        return kernel_weighted_anchor_losses(numerator, log_denominator, weights, self.scale)


def kernel_weighted_anchor_losses(
    numerator: torch.Tensor, log_denominator: torch.Tensor, weights: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor −scale · Σ_k [W_ak / Σ_t W_at] · (numerator_ak − log D_ak), and the has-positive mask.

    numerator and weights (n, N), log D (n, 1) or (n, N); the weights are 0 on each anchor's own
    column, and every term is finite. Anchors whose weights sum to 0 get loss 0 and mask False.
    """
    weight_sums = weights.sum(dim=1, keepdim=True)
    has_positive = weight_sums.squeeze(1) > 0
    normalised = weights / torch.where(weight_sums > 0, weight_sums, torch.ones_like(weight_sums))
    losses = -scale * (normalised * (numerator - log_denominator)).sum(dim=1)
    return losses, has_positive
