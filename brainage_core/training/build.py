"""What one training run is made of, built in a fixed order: device, seeds, data, model, loss, optimizer.

:func:`build_run_parts` is the set-up half of :func:`brainage_core.training.train` (the loop itself is
in :mod:`.loop`): it checks the batch against the ranks and the training subjects, seeds every generator
(identical model initialisation on every rank, then per-rank offsets), and returns a
:class:`RunParts`. The order of the steps is part of the contract: the global torch / NumPy / Python
generators are seeded before the model is built and offset per rank after, so changing the order
changes the trajectory of every run.

Also here: the model an experiment config trains (:func:`build_training_model`, used again to rebuild
a checkpoint's model), the training device (:func:`resolve_device`) and what the evaluator sees of the
model (:class:`EvaluationView`, with the CPU bf16 guard).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from brainage_core.errors import ConfigError
from brainage_core.loss_registry import SUPERVISED_METHODS
from brainage_core.training.distributed import local_rank
from brainage_core.training.schedules import build_optimizer, build_scheduler

log = logging.getLogger("brainage_core.training")

__all__ = [
    "EvaluationView",
    "RunParts",
    "as_config",
    "build_run_parts",
    "build_training_model",
    "cpu_bf16_guard",
    "resolve_device",
]


def as_config(config: Any):
    """``config`` as an ``ExperimentConfig`` (a dict is validated); anything else is a ConfigError."""
    from brainage_core.config import ExperimentConfig, config_from_dict

    if isinstance(config, ExperimentConfig):
        return config
    if isinstance(config, Mapping):
        return config_from_dict(config)
    raise ConfigError(f"train(config=...): found {type(config).__name__}: expected an ExperimentConfig or a dict")


def resolve_device(name: str | torch.device | None, *, world_size: int = 1) -> torch.device:
    """The training device: ``auto`` -> CUDA if available else CPU; CUDA under DDP -> ``cuda:LOCAL_RANK``."""
    if isinstance(name, torch.device):
        return name
    name = name or "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("training.device = 'cuda': no CUDA device is available; expected 'auto' or 'cpu'")
        return torch.device("cuda", local_rank() if world_size > 1 else torch.cuda.current_device())
    if name == "cpu":
        return torch.device("cpu")
    return torch.device(name)


def build_training_model(cfg, *, sync_batchnorm: bool = False) -> torch.nn.Module:
    """The bare model an experiment config trains (contrastive head unnormalised for ``rnc``).

    ``sync_batchnorm`` is only meaningful under DDP (the loop passes ``model.sync_batchnorm`` when
    ``world_size > 1``); the state dict is the same either way.
    """
    from brainage_core.models import build_model

    return build_model(
        cfg.model.backbone,
        cfg.model.head,
        base_width=cfg.model.base_width,
        feature=cfg.model.feature,
        normalize=cfg.loss.method != "rnc",
        sync_batchnorm=bool(sync_batchnorm),
    )


def cpu_bf16_guard(device: torch.device, bf16: bool):
    """oneDNN off for bf16 autocast on the CPU, a no-op otherwise.

    With torch 2.13's CPU build, oneDNN's bf16 3D-convolution weight gradients were found to be
    non-deterministic and sometimes garbage (values ~1e29, then NaN losses) for small ResNet stages;
    the native kernels are exact and deterministic (about 3x slower, which only matters for CPU bf16
    — a debugging configuration; on CUDA nothing changes).
    """
    if bf16 and device.type == "cpu":
        return _onednn_disabled()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _onednn_disabled():
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


class EvaluationView(torch.nn.Module):
    """What the evaluator sees: the bare model behind the training's deterministic preprocessing.

    ``features(x)`` and ``forward(x)`` apply ``augment.center`` (z-scoring and the centred crop + pad when
    those augmentations are on, so that probes read the representation of inputs like the training
    ones), the memory format, and bf16 autocast when training uses it; outputs are float32.
    """

    def __init__(self, model: torch.nn.Module, augment: Any, *, bf16: bool, memory_format: torch.memory_format):
        super().__init__()
        self.model = model
        self.augment = augment
        self.bf16 = bf16
        self.memory_format = memory_format

    def _run(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        x = self.augment.center(x.float()).contiguous(memory_format=self.memory_format)
        with cpu_bf16_guard(x.device, self.bf16):
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                return fn(x).float()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.model.features, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.model, x)


@dataclass
class RunParts:
    """Everything a training run holds, built by :func:`build_run_parts` (``cfg`` an ``ExperimentConfig``)."""

    cfg: Any
    out_dir: Path
    rank: int
    world_size: int
    device: torch.device
    local_batch: int  # training.batch_size / world_size
    store: Any
    evaluator: Any  # owns the validation split (on every rank); only rank 0 evaluates
    dataset: Dataset
    supervised: bool  # a supervised loss (l1, mse): the regression head on one view
    views: int  # views per subject and step (1 for a supervised loss)
    model: torch.nn.Module  # the bare model (not compiled, not wrapped)
    memory_format: torch.memory_format
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: Callable[..., torch.Tensor]
    augment: Any
    generators: dict[str, torch.Generator]  # "loader" (CPU) and "augment" (on the device), per rank


def build_run_parts(cfg, out_dir: Path, *, rank: int, world_size: int,
                    device: str | torch.device | None) -> RunParts:
    """Check, seed and build one run on this rank (``device`` overrides ``training.device``); rank 0
    creates ``out_dir``. ConfigError when the global batch does not divide by the ranks or a rank has
    fewer training subjects than its batch."""
    tcfg = cfg.training
    device = resolve_device(device if device is not None else tcfg.device, world_size=world_size)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if tcfg.batch_size % world_size:
        raise ConfigError(
            f"training.batch_size = {tcfg.batch_size}: the global batch must divide by the {world_size} ranks"
        )
    local_batch = tcfg.batch_size // world_size
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    _seed_global(tcfg.seed)  # before building anything: identical model initialisation on every rank
    store, evaluator, dataset = _build_data(cfg, rank=rank, world_size=world_size, local_batch=local_batch)
    model, memory_format = _build_model(cfg, device, world_size=world_size)
    supervised = cfg.loss.method in SUPERVISED_METHODS
    parts = RunParts(
        cfg=cfg, out_dir=out_dir, rank=rank, world_size=world_size, device=device, local_batch=local_batch,
        store=store, evaluator=evaluator, dataset=dataset, supervised=supervised,
        views=1 if supervised else tcfg.views, model=model, memory_format=memory_format,
        **_build_optimisation(cfg, model, store, world_size=world_size),
        generators=_rank_generators(tcfg.seed, rank, device),
    )
    if rank:  # global generators: a per-rank offset once the model is built
        _seed_global(tcfg.seed * 1000 + rank)
    return parts


def _seed_global(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _build_data(cfg, *, rank: int, world_size: int, local_batch: int) -> tuple[Any, Any, Dataset]:
    """The store, the evaluator (built on every rank: it owns the validation split and hence the training
    rows, per ``training.train_on``) and the training dataset."""
    from brainage_core.data.sources import resolve_store
    from brainage_core.evaluation import Evaluator
    from brainage_core.evaluation.probes import load_estimators

    tcfg = cfg.training
    store = resolve_store(cfg.data)
    evaluator = Evaluator(store, cfg.evaluation, train_on=tcfg.train_on, seed=tcfg.seed)
    if rank == 0 and "exact" in (cfg.evaluation.protocol, cfg.evaluation.final_protocol):
        load_estimators()  # only the evaluating rank needs scikit-learn, and only for the exact protocol
    dataset = _training_dataset(store, evaluator.training_rows)
    per_rank = len(dataset) // world_size
    if per_rank < local_batch:
        raise ConfigError(
            f"training.batch_size = {tcfg.batch_size}: only {len(dataset)} training subjects "
            f"({per_rank} per rank) for a per-rank batch of {local_batch} (training.train_on = {tcfg.train_on!r}, "
            f"store {store.path}); expected a smaller batch or more subjects"
        )
    return store, evaluator, dataset


def _training_dataset(store, training_rows: Mapping[str, Any]) -> Dataset:
    """The training subjects: ``training_rows`` (split -> rows of that split, ``Evaluator.training_rows``)."""
    from brainage_core.data.dataset import StoreDataset

    parts = [StoreDataset(store, name, rows=[int(r) for r in rows]) for name, rows in training_rows.items()]
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def _build_model(cfg, device: torch.device, *, world_size: int) -> tuple[torch.nn.Module, torch.memory_format]:
    """The bare model on ``device`` in its memory format (SyncBatchNorm only for DDP on CUDA)."""
    sync_bn = bool(cfg.model.sync_batchnorm) and world_size > 1
    if sync_bn and device.type != "cuda":
        log.warning("model.sync_batchnorm ignored on %s: DistributedDataParallel supports SyncBatchNorm on CUDA "
                    "only; each rank normalises with its own batch statistics", device)
        sync_bn = False
    model = build_training_model(cfg, sync_batchnorm=sync_bn).to(device)
    memory_format = torch.channels_last_3d if cfg.model.channels_last else torch.contiguous_format
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    return model, memory_format


def _build_optimisation(cfg, model: torch.nn.Module, store, *, world_size: int) -> dict[str, Any]:
    """The optimizer, the per-epoch LR schedule, the loss and the device-side augmentations."""
    from brainage_core.data.augment import DeviceAugment
    from brainage_core.losses import build_loss

    optimizer = build_optimizer(model.parameters(), cfg.optimizer)
    return {
        "optimizer": optimizer,
        "scheduler": build_scheduler(optimizer, cfg.schedule, cfg.training.epochs),
        "loss_fn": build_loss(cfg.loss.method, **cfg.loss.build_kwargs(), gather_distributed=world_size > 1),
        "augment": DeviceAugment(grid=store.grid, **_augment_kwargs(cfg.training.augment)),
    }


def _augment_kwargs(augment_cfg: Any) -> dict[str, bool]:
    return {key: bool(getattr(augment_cfg, key)) for key in ("crop", "cutout", "zscore")}


def _rank_generators(seed: int, rank: int, device: torch.device) -> dict[str, torch.Generator]:
    """This rank's random streams: the DataLoader's draws its workers' base seed, the augmentation's is on
    the device."""
    return {
        "loader": torch.Generator().manual_seed(seed * 1000 + rank),
        "augment": torch.Generator(device=device).manual_seed(seed * 1000 + 500 + rank),
    }
