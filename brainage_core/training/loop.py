"""The training loop: one function, :func:`train`, whoever drives it (the CLI, Ray Train, a test).

One epoch on each rank: the rank's shard of the training subjects in batches of
``training.batch_size / world_size``; each float16 batch goes to the device and becomes float32; every
subject is seen in ``training.views`` views, each drawn by the device-side augmentations
(:class:`~brainage_core.data.augment.DeviceAugment`); the views go through the model together and the
outputs are stacked ``(B, V, d)`` for a contrastive loss, while ``l1``/``mse`` train the regression head
on one view. Optional bf16 autocast, gradient clipping, a per-epoch LR schedule
(:mod:`~brainage_core.training.schedules`).

Every ``evaluation.eval_every`` epochs and at the last epoch, rank 0 evaluates
(:class:`~brainage_core.evaluation.Evaluator`), appends the metrics to ``out_dir/metrics.jsonl``,
writes a full checkpoint to ``out_dir/checkpoint/`` (:mod:`~brainage_core.training.checkpoint`), and
calls ``callback(metrics, checkpoint_dir)``. The other ranks wait, receive the same metrics and call
``callback(metrics, None)`` (so a callback can call a collective such as Ray Train's ``report``).
Rank 0 also appends one line per epoch to ``out_dir/train_log.jsonl`` (``epoch``, ``train_loss``,
``lr``, ``epoch_s``, ``steps``).

Random state: everything is seeded from ``training.seed`` (model initialisation identical on every
rank; per-rank offsets for the augmentation and global generators); evaluation runs between a capture
and a restore of the RNG state, so how often one evaluates never changes the training trajectory. A
resumed run restores every RNG state of every rank and reads the same batches, so it continues exactly
as an uninterrupted run would (on the CPU; CUDA kernels are not all deterministic).

Epoch-start hooks: every function in :data:`EPOCH_START_HOOKS` (:func:`add_epoch_start_hook`) is called
as ``hook(epoch, rank)`` at the start of each epoch. The library registers none; the tests supply their
fault injection (a dying worker, slow epochs) this way (``tests/fault_site/fault_hooks.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from brainage_core.errors import ConfigError, NonFiniteLossError
from brainage_core.training.checkpoint import (
    CHECKPOINT_FORMAT,
    LATEST_DIR,
    capture_rng_state,
    json_safe,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from brainage_core.training.distributed import (
    all_gather_objects,
    all_reduce_mean,
    barrier,
    broadcast_object,
    local_rank,
    make_sampler,
    unwrap_model,
    wrap_model,
)
from brainage_core.training.schedules import build_optimizer, build_scheduler

log = logging.getLogger("brainage_core.training")

#: functions called as ``hook(epoch, rank)`` at the start of every epoch (see the module docstring)
EPOCH_START_HOOKS: list[Callable[[int, int], None]] = []

METRICS_FILE = "metrics.jsonl"
TRAIN_LOG_FILE = "train_log.jsonl"
SUPERVISED = ("l1", "mse")

Callback = Callable[[dict[str, Any], "Path | None"], None]

__all__ = ["METRICS_FILE", "TRAIN_LOG_FILE", "build_training_model", "resolve_device", "train"]


# --------------------------------------------------------------------------------------------------
# Set-up helpers
# --------------------------------------------------------------------------------------------------


def _as_config(config: Any):
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


def _training_dataset(store, training_rows: Mapping[str, Any]) -> Dataset:
    """The training subjects: ``training_rows`` (split -> rows of that split, ``Evaluator.training_rows``)."""
    from brainage_core.data.dataset import StoreDataset

    parts = [StoreDataset(store, name, rows=[int(r) for r in rows]) for name, rows in training_rows.items()]
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def _cpu_bf16_guard(device: torch.device, bf16: bool):
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
        with _cpu_bf16_guard(x.device, self.bf16):
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                return fn(x).float()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.model.features, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.model, x)


def add_epoch_start_hook(hook: Callable[[int, int], None]) -> Callable[[], None]:
    """Call ``hook(epoch, rank)`` at the start of every epoch of every later :func:`train` in this
    process (epoch 1-based); returns a function that removes it."""
    EPOCH_START_HOOKS.append(hook)
    return lambda: EPOCH_START_HOOKS.remove(hook) if hook in EPOCH_START_HOOKS else None


def _append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=False) + "\n")


def _truncate_jsonl(path: Path, last_epoch: int) -> None:
    """Keep the lines of ``path`` whose ``epoch`` <= ``last_epoch`` (all lines are dropped when 0)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and json.loads(line).get("epoch", 0) <= last_epoch:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _format_epoch_line(epochs: int, record: Mapping[str, Any], metrics: Mapping[str, Any] | None) -> str:
    width = len(str(epochs))
    line = (
        f"epoch {record['epoch']:>{width}}/{epochs}  loss {record['train_loss']:.4f}  lr {record['lr']:.2e}  "
        f"{record['epoch_s']:.1f} s"
    )
    if metrics:
        shown = []
        for key in ("val_mae_int", "val_mae_ext", "val_bacc", "val_lc", "test_mae_int", "test_mae_ext", "test_bacc"):
            value = metrics.get(key)
            if isinstance(value, (int, float)):
                shown.append(f"{key} {value:.3f}")
        if metrics.get("leaked"):
            shown.append("LEAKED")
        protocol = f", {metrics['protocol']} probes" if metrics.get("protocol") else ""
        line += "  | " + "  ".join(shown) + f"  (eval {metrics.get('eval_s', 0.0):.1f} s{protocol})"
    return line


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def train(
    config: Any,
    out_dir: str | Path,
    *,
    callback: Callback | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device | None = None,
    resume_from: str | Path | None = None,
    keep_checkpoints: int = 1,
) -> dict[str, Any]:
    """Train ``config`` (an ``ExperimentConfig`` or its dict) and return the last evaluation's metrics.

    - ``out_dir``: where rank 0 writes ``metrics.jsonl``, ``train_log.jsonl`` and ``checkpoint/``.
    - ``callback(metrics, checkpoint_dir)``: called at every evaluation epoch on every rank, after the
      checkpoint is written; ``checkpoint_dir`` is the folder on rank 0 and None elsewhere. The folder
      is replaced at the next evaluation: copy it if you keep it (Ray Train's report does).
    - ``rank``/``world_size``: this process in an already-initialised process group (created by the
      caller); with ``world_size > 1`` the model is wrapped in DistributedDataParallel, each rank reads
      its shard, and ``training.batch_size`` is the global batch (must divide by ``world_size``).
    - ``device``: overrides ``training.device``.
    - ``resume_from``: a checkpoint folder (or an output folder holding ``checkpoint/``): restores model,
      optimizer, scheduler, epoch and RNG states and continues at the next epoch. When nothing is left to
      train, the stored metrics are reported again through ``callback`` and returned.
    - ``keep_checkpoints``: how many checkpoint folders to keep in ``out_dir`` (1: only ``checkpoint/``;
      older ones are kept as ``checkpoint-epochNNNN/``).

    Metrics: ``epoch`` (completed epochs), ``train_loss`` (mean loss of that epoch over steps and
    ranks), ``lr`` (of that epoch), the evaluator's ``val_*``/``test_*``, ``leaked`` and ``protocol``
    (``evaluation.protocol``, or ``evaluation.final_protocol`` at the last epoch), ``eval_s``,
    ``epoch_s`` and ``wall_s`` (training + evaluation seconds since the start, resumes included).
    Raises :class:`NonFiniteLossError` naming epoch, step and value when a loss is NaN or infinite.
    """
    from brainage_core.data.augment import DeviceAugment
    from brainage_core.data.dataset import collate
    from brainage_core.data.sources import resolve_store
    from brainage_core.evaluation import Evaluator
    from brainage_core.evaluation.probes import load_estimators
    from brainage_core.losses import build_loss

    cfg = _as_config(config)
    tcfg = cfg.training
    out_dir = Path(out_dir)
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

    # Seed before building anything: identical model initialisation on every rank.
    torch.manual_seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    random.seed(tcfg.seed)

    store = resolve_store(cfg.data)
    # Built on every rank: it owns the validation split and hence the training rows (per train_on);
    # only rank 0 calls evaluate().
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

    method = cfg.loss.method
    supervised = method in SUPERVISED
    views = 1 if supervised else tcfg.views
    sync_bn = bool(cfg.model.sync_batchnorm) and world_size > 1
    if sync_bn and device.type != "cuda":
        log.warning("model.sync_batchnorm ignored on %s: DistributedDataParallel supports SyncBatchNorm on CUDA "
                    "only; each rank normalises with its own batch statistics", device)
        sync_bn = False
    model = build_training_model(cfg, sync_batchnorm=sync_bn).to(device)
    memory_format = torch.channels_last_3d if cfg.model.channels_last else torch.contiguous_format
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = build_optimizer(model.parameters(), cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.schedule, tcfg.epochs)
    loss_fn = build_loss(method, **cfg.loss.build_kwargs(), gather_distributed=world_size > 1)
    augment = DeviceAugment(grid=store.grid, **_augment_kwargs(tcfg.augment))

    # Per-rank random streams (the DataLoader's draws its workers' base seed; the augmentation's is on
    # the device). Global generators get a per-rank offset after the model is built.
    loader_gen = torch.Generator().manual_seed(tcfg.seed * 1000 + rank)
    aug_gen = torch.Generator(device=device).manual_seed(tcfg.seed * 1000 + 500 + rank)
    generators = {"loader": loader_gen, "augment": aug_gen}
    if rank:
        torch.manual_seed(tcfg.seed * 1000 + rank)
        np.random.seed(tcfg.seed * 1000 + rank)
        random.seed(tcfg.seed * 1000 + rank)

    start_epoch = 0
    wall_offset = 0.0
    last_metrics: dict[str, Any] = {}
    resumed_dir: Path | None = None
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        resumed_dir = Path(state["path"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # The stored LR came from the stored schedule; recompute it under this run's schedule, which may
        # differ (e.g. more epochs stretch a cosine), so a resumed run follows the uninterrupted one.
        for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        start_epoch = int(state["epoch"])
        wall_offset = float(state.get("wall_s", 0.0))
        last_metrics = dict(state.get("metrics") or {})
        rng_states = state.get("rng") or []
        if int(state.get("world_size", 1)) == world_size and rank < len(rng_states):
            restore_rng_state(rng_states[rank], generators)
        else:
            log.warning(
                "checkpoint %s was written by %s rank(s), this run has %d: random streams re-seeded, the run "
                "will not replay an uninterrupted one exactly",
                resumed_dir, state.get("world_size"), world_size,
            )
        _warn_config_changes(state.get("config") or {}, cfg.to_dict())
        log.info("resuming from %s at epoch %d", resumed_dir, start_epoch + 1)
    if rank == 0:
        _truncate_jsonl(out_dir / METRICS_FILE, start_epoch)
        _truncate_jsonl(out_dir / TRAIN_LOG_FILE, start_epoch)

    if start_epoch >= tcfg.epochs:
        log.info("nothing left to train (checkpoint at epoch %d of %d): reporting its metrics",
                 start_epoch, tcfg.epochs)
        if callback is not None:
            callback(dict(last_metrics), resumed_dir if rank == 0 else None)
        return last_metrics

    compiled = torch.compile(model) if cfg.model.compile else model
    net = wrap_model(compiled, device, world_size=world_size)
    sampler = make_sampler(dataset, rank=rank, world_size=world_size, seed=tcfg.seed)
    loader = DataLoader(
        dataset,
        batch_size=local_batch,
        sampler=sampler,
        num_workers=tcfg.loader_workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        generator=loader_gen,
        collate_fn=collate,
        persistent_workers=tcfg.loader_workers > 0,  # workers hold no random state: resuming is unaffected
    )
    bf16 = bool(tcfg.bf16)
    non_blocking = device.type == "cuda"
    eval_every = cfg.evaluation.eval_every
    t_start = time.perf_counter()

    for epoch in range(start_epoch + 1, tcfg.epochs + 1):
        for hook in tuple(EPOCH_START_HOOKS):
            hook(epoch, rank)
        t_epoch = time.perf_counter()
        net.train()
        sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        steps = 0
        for step, (volumes, ages, _sites) in enumerate(loader, start=1):
            x = volumes.to(device, non_blocking=non_blocking).float()
            y = ages.to(device, non_blocking=non_blocking).float()
            if views == 1:
                batch = augment(x, generator=aug_gen)
            else:
                batch = torch.cat([augment(x, generator=aug_gen) for _ in range(views)], dim=0)
            batch = batch.contiguous(memory_format=memory_format)
            with _cpu_bf16_guard(device, bf16):
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                    out = net(batch)
                # Diverged weights give NaN/inf or all-zero embeddings (dead units; a normalised zero vector
                # stays zero), which the loss would report as a bad input (not L2-normalised); say what
                # happened instead. The flag is reduced so that every rank stops at the same step.
                healthy = torch.isfinite(out.detach()).all()
                if not supervised:
                    flat = out.detach().float().reshape(out.shape[0], -1)
                    healthy = healthy & (torch.linalg.vector_norm(flat, dim=1) > 1e-12).all()
                if all_reduce_mean(healthy.to(torch.float32)).item() < 1.0:
                    raise NonFiniteLossError(
                        f"non-finite or degenerate model output (NaN/inf or all-zero embeddings) at epoch {epoch}, "
                        f"step {step} on rank {rank}: the weights diverged; loss.method={method!r}, "
                        f"optimizer.lr={cfg.optimizer.lr:g}: expected a finite loss (lower the learning rate, "
                        "enable training.grad_clip or check the data)"
                    )
                if supervised:
                    loss = loss_fn(out.float(), y)
                else:
                    features = out.float().reshape(views, x.shape[0], -1).transpose(0, 1)  # (B, V, d)
                    loss = loss_fn(features, y)
            global_loss = all_reduce_mean(loss.detach())
            if not torch.isfinite(global_loss).item():
                raise NonFiniteLossError(
                    f"non-finite training loss at epoch {epoch}, step {step}: {loss.item()} on rank {rank}"
                    + (f" (mean over ranks {global_loss.item()})" if world_size > 1 else "")
                    + f"; loss.method={method!r}, optimizer.lr={cfg.optimizer.lr:g}: expected a finite value "
                    "(lower the learning rate, enable training.grad_clip or check the data)"
                )
            optimizer.zero_grad(set_to_none=True)
            with _cpu_bf16_guard(device, bf16):
                loss.backward()
            if tcfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), tcfg.grad_clip)
            optimizer.step()
            loss_sum += global_loss.double()
            steps += 1
        scheduler.step()
        train_loss = (loss_sum / max(steps, 1)).item()
        epoch_s = time.perf_counter() - t_epoch
        record = {"epoch": epoch, "train_loss": train_loss, "lr": lr, "epoch_s": epoch_s, "steps": steps}
        if rank == 0:
            _append_jsonl(out_dir / TRAIN_LOG_FILE, json_safe(record))

        if epoch % eval_every and epoch != tcfg.epochs:
            if rank == 0:
                log.info(_format_epoch_line(tcfg.epochs, record, None))
            continue

        # Evaluation epoch: every rank captures its RNG state (evaluation must not move it).
        rng_state = capture_rng_state(generators)
        rng_states = all_gather_objects(rng_state)
        metrics: dict[str, Any] | None = None
        checkpoint_dir: Path | None = None
        if rank == 0:
            t_eval = time.perf_counter()
            view = EvaluationView(unwrap_model(net), augment, bf16=bf16, memory_format=memory_format)
            # the run's last evaluation is its result: scored with evaluation.final_protocol
            protocol = cfg.evaluation.final_protocol if epoch == tcfg.epochs else cfg.evaluation.protocol
            evaluation = evaluator.evaluate(view, device, protocol=protocol)
            net.train()
            eval_s = time.perf_counter() - t_eval
            metrics = json_safe(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "lr": lr,
                    **evaluation,
                    "epoch_s": epoch_s,
                    "eval_s": eval_s,
                    "wall_s": wall_offset + time.perf_counter() - t_start,
                }
            )
            state = {
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch,
                "model": unwrap_model(net).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": None,
                "rng": rng_states,
                "world_size": world_size,
                "config": cfg.to_dict(),
                "metrics": metrics,
                "wall_s": metrics["wall_s"],
            }
            checkpoint_dir = _save_latest(state, out_dir, keep_checkpoints)
            _append_jsonl(out_dir / METRICS_FILE, metrics)
            log.info(_format_epoch_line(tcfg.epochs, record, metrics))
        restore_rng_state(rng_state, generators)
        metrics = broadcast_object(metrics)
        barrier()
        last_metrics = metrics
        if callback is not None:
            callback(dict(metrics), checkpoint_dir)
    return last_metrics


def _augment_kwargs(augment_cfg: Any) -> dict[str, bool]:
    return {key: bool(getattr(augment_cfg, key)) for key in ("crop", "cutout", "zscore")}


def _save_latest(state: Mapping[str, Any], out_dir: Path, keep: int) -> Path:
    """Write ``out_dir/checkpoint/``; with ``keep > 1`` the previous one becomes ``checkpoint-epochNNNN/``."""
    latest = out_dir / LATEST_DIR
    keep_as = None
    if keep > 1 and (latest / "checkpoint.pt").is_file():
        previous = load_checkpoint(latest)["epoch"]
        keep_as = out_dir / f"{LATEST_DIR}-epoch{int(previous):04d}"
    folder = save_checkpoint(state, latest, keep_previous_as=keep_as)
    if keep > 1:
        older = sorted(out_dir.glob(f"{LATEST_DIR}-epoch*"))
        for stale in older[: max(len(older) - (keep - 1), 0)]:
            shutil.rmtree(stale)
    return folder


def _warn_config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Log the keys whose value differs between the checkpoint's config and this run's."""
    from brainage_core.config import config_differences

    changed = [f"{key}: {a!r} -> {b!r}" for key, a, b in config_differences(saved, current, close_floats=True)]
    if changed:
        log.warning("resuming with a changed configuration: %s", "; ".join(changed))
