"""The training loop: one function, :func:`train`, whoever drives it (the CLI, Ray Train, a test).

One epoch on each rank: the rank's shard of the training subjects in batches of
``training.batch_size / world_size``; each float16 batch goes to the device and becomes float32; every
subject is seen in ``training.views`` views, each drawn by the device-side augmentations
(:class:`~brainage_core.data.augment.DeviceAugment`); the views go through the model together and the
outputs are stacked ``(B, V, d)`` for a contrastive loss, while ``l1``/``mse`` train the regression head
on one view. Optional bf16 autocast, gradient clipping, a per-epoch LR schedule
(:mod:`~brainage_core.training.schedules`).

Where the pieces are: :func:`train` builds the run's parts in a fixed order (seeds, data, model, loss,
optimizer: :mod:`~brainage_core.training.build`) and hands them to a :class:`TrainingRun` (resume, the
epoch loop, one step, the evaluation epochs and their checkpoints); the log files and the epoch line are
in :mod:`~brainage_core.training.run_log`.

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

import logging
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from brainage_core.errors import NonFiniteLossError
from brainage_core.training.build import (
    EvaluationView,
    RunParts,
    as_config,
    build_run_parts,
    build_training_model,
    cpu_bf16_guard,
    resolve_device,
)
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
    make_sampler,
    unwrap_model,
    wrap_model,
)
from brainage_core.training.run_log import METRICS_FILE, TRAIN_LOG_FILE, append_jsonl, epoch_line, truncate_jsonl

log = logging.getLogger("brainage_core.training")

#: functions called as ``hook(epoch, rank)`` at the start of every epoch (see the module docstring)
EPOCH_START_HOOKS: list[Callable[[int, int], None]] = []

Callback = Callable[[dict[str, Any], "Path | None"], None]

# EvaluationView, build_training_model, resolve_device and the bf16 guard (bench/gpu_check.py) live in
# .build; they are re-exported here, where their users import them
_cpu_bf16_guard = cpu_bf16_guard

__all__ = ["METRICS_FILE", "TRAIN_LOG_FILE", "EvaluationView", "add_epoch_start_hook",
           "build_training_model", "resolve_device", "train"]


def add_epoch_start_hook(hook: Callable[[int, int], None]) -> Callable[[], None]:
    """Call ``hook(epoch, rank)`` at the start of every epoch of every later :func:`train` in this
    process (epoch 1-based); returns a function that removes it."""
    EPOCH_START_HOOKS.append(hook)
    return lambda: EPOCH_START_HOOKS.remove(hook) if hook in EPOCH_START_HOOKS else None


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
    cfg = as_config(config)
    parts = build_run_parts(cfg, Path(out_dir), rank=rank, world_size=world_size, device=device)
    run = TrainingRun(parts, keep_checkpoints=keep_checkpoints)
    if resume_from is not None:
        run.resume(resume_from)
    run.truncate_logs()
    if run.start_epoch >= cfg.training.epochs:
        log.info("nothing left to train (checkpoint at epoch %d of %d): reporting its metrics",
                 run.start_epoch, cfg.training.epochs)
        if callback is not None:
            callback(dict(run.last_metrics), run.resumed_dir if rank == 0 else None)
        return run.last_metrics
    return run.fit(callback)


class TrainingRun:
    """The epoch loop of one run on one rank, over the :class:`~brainage_core.training.build.RunParts`
    built for it: :meth:`resume` from a checkpoint, then :meth:`fit` (one :meth:`epoch` after the other,
    an evaluation and a checkpoint every ``evaluation.eval_every`` epochs and at the last).

    Long for a reason: one short method per step of the loop (resume, epoch, step, output check,
    evaluation epoch, checkpoint state), all reading the same parts and resumed state.
    """

    def __init__(self, parts: RunParts, *, keep_checkpoints: int = 1):
        self.parts = parts
        self.cfg = parts.cfg
        self.keep_checkpoints = keep_checkpoints
        self.start_epoch = 0  # epochs already trained (by the checkpoint resumed from)
        self.wall_offset = 0.0  # the checkpoint's wall_s
        self.last_metrics: dict[str, Any] = {}
        self.resumed_dir: Path | None = None
        self.net: torch.nn.Module | None = None  # compiled and DDP-wrapped, set by fit()
        self.bf16 = bool(self.cfg.training.bf16)

    # -- resuming ------------------------------------------------------------------------------------

    def resume(self, resume_from: str | Path) -> None:
        """Restore model, optimizer, scheduler, epoch, wall time and this rank's random streams."""
        p = self.parts
        state = load_checkpoint(resume_from)
        self.resumed_dir = Path(state["path"])
        p.model.load_state_dict(state["model"])
        p.optimizer.load_state_dict(state["optimizer"])
        p.scheduler.load_state_dict(state["scheduler"])
        # The stored LR came from the stored schedule; recompute it under this run's schedule, which may
        # differ (e.g. more epochs stretch a cosine), so a resumed run follows the uninterrupted one.
        for group, base_lr, factor in zip(p.optimizer.param_groups, p.scheduler.base_lrs, p.scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(p.scheduler.last_epoch)
        p.scheduler._last_lr = [group["lr"] for group in p.optimizer.param_groups]
        self.start_epoch = int(state["epoch"])
        self.wall_offset = float(state.get("wall_s", 0.0))
        self.last_metrics = dict(state.get("metrics") or {})
        rng_states = state.get("rng") or []
        if int(state.get("world_size", 1)) == p.world_size and p.rank < len(rng_states):
            restore_rng_state(rng_states[p.rank], p.generators)
        else:
            log.warning(
                "checkpoint %s was written by %s rank(s), this run has %d: random streams re-seeded, the run "
                "will not replay an uninterrupted one exactly",
                self.resumed_dir, state.get("world_size"), p.world_size,
            )
        _warn_config_changes(state.get("config") or {}, self.cfg.to_dict())
        log.info("resuming from %s at epoch %d", self.resumed_dir, self.start_epoch + 1)

    def truncate_logs(self) -> None:
        """Rank 0: drop the log lines after the epoch this run starts from."""
        if self.parts.rank == 0:
            truncate_jsonl(self.parts.out_dir / METRICS_FILE, self.start_epoch)
            truncate_jsonl(self.parts.out_dir / TRAIN_LOG_FILE, self.start_epoch)

    # -- the loop ------------------------------------------------------------------------------------

    def fit(self, callback: Callback | None) -> dict[str, Any]:
        """Train the remaining epochs; returns the last evaluation's metrics."""
        from brainage_core.data.dataset import collate

        p, tcfg = self.parts, self.cfg.training
        compiled = torch.compile(p.model) if self.cfg.model.compile else p.model
        self.net = wrap_model(compiled, p.device, world_size=p.world_size)
        sampler = make_sampler(p.dataset, rank=p.rank, world_size=p.world_size, seed=tcfg.seed)
        loader = DataLoader(
            p.dataset,
            batch_size=p.local_batch,
            sampler=sampler,
            num_workers=tcfg.loader_workers,
            drop_last=True,
            pin_memory=p.device.type == "cuda",
            generator=p.generators["loader"],
            collate_fn=collate,
            persistent_workers=tcfg.loader_workers > 0,  # workers hold no random state: resuming is unaffected
        )
        t_start = time.perf_counter()
        for epoch in range(self.start_epoch + 1, tcfg.epochs + 1):
            for hook in tuple(EPOCH_START_HOOKS):
                hook(epoch, p.rank)
            record = self.epoch(epoch, loader)
            if p.rank == 0:
                append_jsonl(p.out_dir / TRAIN_LOG_FILE, json_safe(record))
            if epoch % self.cfg.evaluation.eval_every and epoch != tcfg.epochs:
                if p.rank == 0:
                    log.info(epoch_line(tcfg.epochs, record, None))
                continue
            metrics, checkpoint_dir = self.evaluate_and_checkpoint(epoch, record, t_start)
            self.last_metrics = metrics
            if callback is not None:
                callback(dict(metrics), checkpoint_dir)
        return self.last_metrics

    def epoch(self, epoch: int, loader: DataLoader) -> dict[str, Any]:
        """One training epoch over ``loader``; returns its train_log record."""
        p = self.parts
        t_epoch = time.perf_counter()
        self.net.train()
        loader.sampler.set_epoch(epoch)
        lr = p.optimizer.param_groups[0]["lr"]
        loss_sum = torch.zeros((), dtype=torch.float64, device=p.device)
        steps = 0
        for step, (volumes, ages, _sites) in enumerate(loader, start=1):
            loss_sum += self.step(epoch, step, volumes, ages).double()
            steps += 1
        p.scheduler.step()
        train_loss = (loss_sum / max(steps, 1)).item()
        epoch_s = time.perf_counter() - t_epoch
        return {"epoch": epoch, "train_loss": train_loss, "lr": lr, "epoch_s": epoch_s, "steps": steps}

    def step(self, epoch: int, step: int, volumes: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        """One optimisation step on one float16 batch; returns the loss averaged over the ranks."""
        p, tcfg = self.parts, self.cfg.training
        non_blocking = p.device.type == "cuda"
        x = volumes.to(p.device, non_blocking=non_blocking).float()
        y = ages.to(p.device, non_blocking=non_blocking).float()
        aug_gen = p.generators["augment"]
        if p.views == 1:
            batch = p.augment(x, generator=aug_gen)
        else:
            batch = torch.cat([p.augment(x, generator=aug_gen) for _ in range(p.views)], dim=0)
        batch = batch.contiguous(memory_format=p.memory_format)
        with cpu_bf16_guard(p.device, self.bf16):
            with torch.autocast(device_type=p.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out = self.net(batch)
            self._check_output(out, epoch, step)
            if p.supervised:
                loss = p.loss_fn(out.float(), y)
            else:
                features = out.float().reshape(p.views, x.shape[0], -1).transpose(0, 1)  # (B, V, d)
                loss = p.loss_fn(features, y)
        global_loss = all_reduce_mean(loss.detach())
        if not torch.isfinite(global_loss).item():
            raise NonFiniteLossError(
                f"non-finite training loss at epoch {epoch}, step {step}: {loss.item()} on rank {p.rank}"
                + (f" (mean over ranks {global_loss.item()})" if p.world_size > 1 else "")
                + f"; loss.method={self.cfg.loss.method!r}, optimizer.lr={self.cfg.optimizer.lr:g}: expected a "
                "finite value (lower the learning rate, enable training.grad_clip or check the data)"
            )
        p.optimizer.zero_grad(set_to_none=True)
        with cpu_bf16_guard(p.device, self.bf16):
            loss.backward()
        if tcfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), tcfg.grad_clip)
        p.optimizer.step()
        return global_loss

    def _check_output(self, out: torch.Tensor, epoch: int, step: int) -> None:
        """Diverged weights give NaN/inf or all-zero embeddings (dead units; a normalised zero vector stays
        zero), which the loss would report as a bad input (not L2-normalised); say what happened instead.
        The flag is reduced so that every rank stops at the same step."""
        healthy = torch.isfinite(out.detach()).all()
        if not self.parts.supervised:
            flat = out.detach().float().reshape(out.shape[0], -1)
            healthy = healthy & (torch.linalg.vector_norm(flat, dim=1) > 1e-12).all()
        if all_reduce_mean(healthy.to(torch.float32)).item() < 1.0:
            raise NonFiniteLossError(
                f"non-finite or degenerate model output (NaN/inf or all-zero embeddings) at epoch {epoch}, "
                f"step {step} on rank {self.parts.rank}: the weights diverged; loss.method={self.cfg.loss.method!r}, "
                f"optimizer.lr={self.cfg.optimizer.lr:g}: expected a finite loss (lower the learning rate, "
                "enable training.grad_clip or check the data)"
            )

    # -- evaluation epochs ---------------------------------------------------------------------------

    def evaluate_and_checkpoint(self, epoch: int, record: Mapping[str, Any],
                                t_start: float) -> tuple[dict[str, Any], Path | None]:
        """Rank 0 evaluates, checkpoints and logs; every rank gets the metrics (and rank 0 the checkpoint
        folder). The RNG state of every rank is captured before and restored after: evaluating never
        moves the training trajectory."""
        p = self.parts
        rng_state = capture_rng_state(p.generators)
        rng_states = all_gather_objects(rng_state)
        metrics: dict[str, Any] | None = None
        checkpoint_dir: Path | None = None
        if p.rank == 0:
            metrics = self._evaluate(epoch, record, t_start)
            checkpoint_dir = _save_latest(self._checkpoint_state(epoch, rng_states, metrics), p.out_dir,
                                          self.keep_checkpoints)
            append_jsonl(p.out_dir / METRICS_FILE, metrics)
            log.info(epoch_line(self.cfg.training.epochs, record, metrics))
        restore_rng_state(rng_state, p.generators)
        metrics = broadcast_object(metrics)
        barrier()
        return metrics, checkpoint_dir

    def _evaluate(self, epoch: int, record: Mapping[str, Any], t_start: float) -> dict[str, Any]:
        p, ecfg = self.parts, self.cfg.evaluation
        t_eval = time.perf_counter()
        view = EvaluationView(unwrap_model(self.net), p.augment, bf16=self.bf16, memory_format=p.memory_format)
        # the run's last evaluation is its result: scored with evaluation.final_protocol
        protocol = ecfg.final_protocol if epoch == self.cfg.training.epochs else ecfg.protocol
        evaluation = p.evaluator.evaluate(view, p.device, protocol=protocol)
        self.net.train()
        eval_s = time.perf_counter() - t_eval
        return json_safe(
            {
                "epoch": epoch,
                "train_loss": record["train_loss"],
                "lr": record["lr"],
                **evaluation,
                "epoch_s": record["epoch_s"],
                "eval_s": eval_s,
                "wall_s": self.wall_offset + time.perf_counter() - t_start,
            }
        )

    def _checkpoint_state(self, epoch: int, rng_states: list, metrics: dict[str, Any]) -> dict[str, Any]:
        p = self.parts
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "model": unwrap_model(self.net).state_dict(),
            "optimizer": p.optimizer.state_dict(),
            "scheduler": p.scheduler.state_dict(),
            "scaler": None,
            "rng": rng_states,
            "world_size": p.world_size,
            "config": self.cfg.to_dict(),
            "metrics": metrics,
            "wall_s": metrics["wall_s"],
        }


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
