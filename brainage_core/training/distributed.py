"""Distributed-data-parallel helpers, usable with or without a process group.

The training loop never creates the process group when it is driven by a launcher (Ray Train creates
it on every worker before calling ``train``); the plain command line calls
:func:`init_process_group_from_env`, which reads the variables that ``torchrun`` sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). Backend: ``nccl`` on CUDA, ``gloo``
on the CPU. Every helper here is a no-op (or the identity) when ``world_size == 1``.

Data: each rank reads a disjoint shard through a :class:`~torch.utils.data.DistributedSampler` with
``drop_last=True``, and the DataLoader drops the last incomplete batch too: padding a shard would
duplicate subjects, which contrastive losses would then count as positives of themselves.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

log = logging.getLogger(__name__)

__all__ = [
    "all_gather_objects",
    "all_reduce_mean",
    "backend_for",
    "barrier",
    "broadcast_object",
    "distributed_active",
    "init_process_group_from_env",
    "local_rank",
    "make_sampler",
    "rank_and_world_size",
    "unwrap_model",
    "wrap_model",
]


def distributed_active() -> bool:
    """True when a torch.distributed process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK``, as set by torchrun and Ray Train), 0 if unset."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def backend_for(device: torch.device | str) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_process_group_from_env(device: torch.device | str = "cpu") -> tuple[int, int]:
    """Create the default process group from torchrun's environment variables, if there are several ranks.

    Returns (rank, world size). With ``WORLD_SIZE`` unset or 1, or a group already initialised, nothing
    is created. ``MASTER_ADDR``/``MASTER_PORT`` default to 127.0.0.1:29500.
    """
    if dist.is_available() and dist.is_initialized():
        return rank_and_world_size()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1
    rank = int(os.environ["RANK"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    log.info("process group %s: rank %d of %d", backend, rank, world_size)
    return rank, world_size


def make_sampler(dataset: Dataset, *, rank: int, world_size: int, seed: int) -> DistributedSampler:
    """A shuffling ``DistributedSampler`` with ``drop_last=True`` (also for one rank).

    It needs no process group (rank and world size are given) and its order depends only on
    ``seed`` and the epoch passed to ``set_epoch``, which makes a resumed run read the same batches.
    """
    return DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
    )


def wrap_model(model: nn.Module, device: torch.device, *, world_size: int, sync_batchnorm: bool = False) -> nn.Module:
    """``model`` in DistributedDataParallel when ``world_size > 1`` (``model`` must already be on ``device``).

    ``sync_batchnorm`` converts BatchNorm layers to SyncBatchNorm first, so that batch statistics span
    the global batch (without it each rank normalises with its local statistics, which differs from a
    single process training on the concatenated batch).
    """
    if world_size <= 1:
        return model
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = None
    if device.type == "cuda":
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module under DistributedDataParallel and/or ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if distributed_active():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over ranks (a new tensor; ``value`` itself without a process group).

    A non-finite value on any rank makes the result non-finite on every rank, so all ranks stop
    together instead of leaving the others waiting in a collective.
    """
    if not distributed_active():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects; identity without a process group)."""
    if not distributed_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group)."""
    if not distributed_active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
