"""All-gather with gradient, for contrastive losses under DistributedDataParallel.

Under DDP each of the k ranks holds b of the k·b samples. A contrastive loss needs every sample as a
negative, so each rank gathers the embeddings (and ages) of all ranks, then computes its loss over its
LOCAL anchors only. The gather's backward sums the incoming gradients across ranks (every rank's loss
depends on every rank's embeddings) and returns each rank the slice of its own samples. DDP then
averages the parameter gradients, which gives exactly the gradients of one process on the k·b batch
(``docs/losses.md``, "Under DDP").

Per-rank batch statistics of BatchNorm still differ from the single-process ones unless the model is
built with ``sync_batchnorm=True``; that is the model's business, not the loss's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from brainage_core.errors import LossError


def distributed_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_gather(gather_distributed: bool | None) -> bool:
    """Whether to gather now: ``None`` means "when torch.distributed runs with world size > 1"."""
    if gather_distributed is None:
        return distributed_world()[1] > 1
    return bool(gather_distributed)


class _AllGatherWithGradient(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; backward: all-reduce (sum), keep own slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, world = dist.get_rank(), dist.get_world_size()
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor)
        ctx.rank = rank
        ctx.local_size = tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.local_size
        return grad[start : start + ctx.local_size]


def all_gather_with_gradient(tensor: torch.Tensor) -> torch.Tensor:
    """Gather ``tensor`` (b, ...) of every rank into (k·b, ...), rank order; differentiable."""
    return _AllGatherWithGradient.apply(tensor)


def all_gather_constant(tensor: torch.Tensor) -> torch.Tensor:
    """Gather ``tensor`` (b, ...) of every rank into (k·b, ...) without gradient (e.g. ages)."""
    tensor = tensor.detach().contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)


def check_equal_local_batches(local_batch: int, device: torch.device) -> None:
    """Raise :class:`LossError` on every rank unless all ranks hold the same number of subjects."""
    size = torch.tensor([local_batch], dtype=torch.int64, device=device)
    sizes = all_gather_constant(size).tolist()
    if len(set(sizes)) != 1:
        raise LossError(
            f"parameter 'features': gather_distributed needs the same batch size on every rank, got "
            f"{sizes} (drop the last incomplete batch in the sampler)"
        )


def sum_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """Sum of a small no-grad tensor over all ranks (a copy; the input is left unchanged)."""
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


@dataclass(frozen=True)
class RankLayout:
    """Where this rank's subjects sit in the gathered batch: rows ``rank·b .. rank·b + b − 1``."""

    rank: int
    world_size: int
    local_batch: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.local_batch
