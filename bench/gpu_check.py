"""GPU check: training throughput, loss costs and one end-to-end run of the training loop, in < 5 minutes.

Made for a lent GPU machine that has Python, torch, numpy, pandas, pyarrow, scipy, scikit-learn and
pyyaml but not ray, optuna, nibabel or nilearn, and no network; run from the repository root with
``PYTHONPATH=.`` (no install): ``bench/gpu_check.sh`` or ``PYTHONPATH=. python bench/gpu_check.py``.
``--quick`` runs the same code on the CPU at the 6 mm grid with tiny models (a smoke test).

Sections (each one's figures are written as soon as it ends, so a timeout keeps the earlier ones):

- ``train``: random-but-structured full-grid volumes made in memory on the device (a brain-shaped mask,
  smooth tissue, age-dependent atrophy and ventricles, per-site bias fields, noise; at most 256),
  then training steps of resnet18 and alexnet3d (Adam, yaware loss, V = 2 views, bf16 autocast or
  fp32) at batch 8-32: steps/s and volume-passes/s (forward + backward of one view of one subject),
  peak memory;
- ``features``: inference throughput of the encoder (what each evaluation costs);
- ``losses``: forward + backward time of every loss at B = 32 and 256 subjects, V = 2, d = 128;
- ``loop``: a small prepared store written with ``StoreWriter`` and two epochs of
  ``brainage_core.training.train`` on the device (data loader, device augmentations, evaluation,
  checkpoint), then a resume from epoch 1 compared with the uninterrupted epoch 2.

Output: JSON (``--out``, default ``$OUT/gpu_check.json`` or ``bench/results/gpu_check.json``) with the
figures and the machine (platform, CPU count, torch/CUDA versions, GPU name).

Long (over 400 lines) for a reason: it runs from this one file on a lent GPU machine that has no Ray,
Optuna or install of the project, so its sections (each a short measurement) live side by side here.
"""

from __future__ import annotations

import argparse
import importlib.abc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

#: packages the GPU machine lacks; --quick blocks them locally so the check matches that machine
ABSENT_ON_GPU_MACHINE = ("ray", "optuna", "nibabel", "nilearn")


class _BlockImports(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT_ON_GPU_MACHINE:
            raise ImportError(f"{name} is not installed on the GPU machine (blocked by gpu_check --quick)")
        return None


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# Structured random volumes
# --------------------------------------------------------------------------------------------------


def _smooth_field(n: int, shape: tuple[int, int, int], coarse: int, gen: torch.Generator, device) -> torch.Tensor:
    """(n, 1, D, H, W) smooth random fields: coarse Gaussian noise upsampled trilinearly."""
    low = torch.randn(n, 1, coarse, coarse, coarse, generator=gen, device=device)
    return F.interpolate(low, size=shape, mode="trilinear", align_corners=False)


def make_volumes(n: int, shape: tuple[int, int, int], device: torch.device, *, n_sites: int = 8, seed: int = 0):
    """``n`` float16 volumes (n, 1, D, H, W) on ``device`` with ages (n,) in years and site codes (n,).

    Grey-matter-like values in [0, ~1.2]: an ellipsoidal brain, smooth tissue texture, cortical
    thinning and ventricle growth with age, a per-site multiplicative bias field and gain, noise.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    ages = 6.0 + 82.0 * torch.rand(n, generator=gen, device=device) ** 1.5
    sites = torch.randint(0, n_sites, (n,), generator=gen, device=device)
    site_bias = 0.06 * _smooth_field(n_sites, shape, 4, gen, device)
    site_gain = 1.0 + 0.08 * torch.randn(n_sites, generator=gen, device=device)
    axes = [torch.linspace(-1.0, 1.0, s, device=device) for s in shape]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    radius = ((z / 0.85) ** 2 + (y / 0.9) ** 2 + (x / 0.8) ** 2).sqrt()
    out = torch.empty(n, 1, *shape, dtype=torch.float16, device=device)
    chunk = 16
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        t = ((ages[start:stop] - 6.0) / 82.0).view(-1, 1, 1, 1, 1)
        texture = torch.sigmoid(2.5 * _smooth_field(stop - start, shape, 14, gen, device))
        brain = torch.sigmoid((1.0 - radius) * 25.0)
        ventricle = torch.sigmoid((radius - (0.12 + 0.18 * t)) * 40.0)
        cortex = 1.0 - 0.3 * t * torch.sigmoid((radius - 0.6) * 10.0)
        s = sites[start:stop]
        vol = brain * ventricle * cortex * texture * (1.0 + site_bias[s]) * site_gain[s].view(-1, 1, 1, 1, 1)
        vol = vol + 0.02 * torch.randn(vol.shape, generator=gen, device=device)
        out[start:stop] = vol.clamp_min(0.0).to(torch.float16)
    return out, ages, sites


#: alexnet3d needs at least this many voxels per axis (the coarse grids of --quick are padded up to it)
ALEXNET_MIN_SIZE = 69


def fit_backbone(x: torch.Tensor, backbone: str) -> torch.Tensor:
    """``x`` zero-padded to alexnet3d's minimum size on coarse grids (only --quick needs it)."""
    if backbone != "alexnet3d" or min(x.shape[2:]) >= ALEXNET_MIN_SIZE:
        return x
    pads: list[int] = []
    for n in reversed(x.shape[2:]):
        total = max(ALEXNET_MIN_SIZE - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


def bench_train(volumes, ages, device, *, backbone, base_width, batch, views, bf16, max_steps, seconds, augment):
    from brainage_core.losses import build_loss
    from brainage_core.models import build_model
    from brainage_core.training.loop import _cpu_bf16_guard as cpu_bf16_guard

    torch.manual_seed(0)
    model = build_model(backbone, "contrastive", base_width=base_width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = build_loss("yaware", kernel="rbf", sigma=2.0, temperature=0.1)
    gen = torch.Generator(device=device).manual_seed(1)
    n = volumes.shape[0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        idx = torch.randint(0, n, (batch,), generator=gen, device=device)
        x = volumes[idx].float()
        views_ = [augment(x, generator=gen) if augment is not None else x for _ in range(views)]
        with cpu_bf16_guard(device, bf16):  # the loop's fix for oneDNN's CPU bf16 conv3d gradients
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(fit_backbone(torch.cat(views_, 0), backbone))
            feats = out.float().reshape(views, batch, -1).transpose(0, 1)
            loss = loss_fn(feats, ages[idx].float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        return loss

    t0 = time.perf_counter()
    for _ in range(3):  # warm-up (cudnn autotuning, allocator)
        step()
    sync(device)
    warmup_s = time.perf_counter() - t0
    steps = 0
    t0 = time.perf_counter()
    loss = None
    while steps < max_steps and time.perf_counter() - t0 < seconds:
        loss = step()
        steps += 1
    sync(device)
    elapsed = time.perf_counter() - t0
    result = {
        "backbone": backbone,
        "base_width": base_width,
        "batch": batch,
        "views": views,
        "bf16": bf16,
        "augment": augment is not None,
        "steps": steps,
        "warmup_s": round(warmup_s, 2),
        "steps_per_s": round(steps / elapsed, 3),
        "volume_passes_per_s": round(steps * batch * views / elapsed, 1),
        "ms_per_step": round(1000 * elapsed / steps, 1),
        "final_loss": float(loss) if loss is not None else None,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def bench_features(volumes, device, *, backbone, base_width, batch, bf16, seconds):
    from brainage_core.models import build_model

    model = build_model(backbone, "contrastive", base_width=base_width).to(device).eval()
    n = volumes.shape[0]
    done = 0
    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        model.features(fit_backbone(volumes[:batch].float(), backbone))
        sync(device)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            start = done % max(n - batch, 1)
            model.features(fit_backbone(volumes[start : start + batch].float(), backbone))
            done += batch
        sync(device)
    elapsed = time.perf_counter() - t0
    return {"backbone": backbone, "batch": batch, "bf16": bf16, "volumes_per_s": round(done / elapsed, 1)}


def bench_losses(device, *, sizes, repeats):
    from brainage_core.losses import build_loss

    specs = {
        "yaware": {"kernel": "rbf", "sigma": 2.0},
        "supcon": {},
        "threshold": {"kernel": "rbf", "sigma": 2.0},
        "expw": {"kernel": "rbf", "sigma": 2.0},
        "rnc": {},
    }
    out = []
    gen = torch.Generator(device=device).manual_seed(0)
    for method, kwargs in specs.items():
        loss_fn = build_loss(method, **kwargs)
        for b in sizes:
            z = torch.randn(b, 2, 128, generator=gen, device=device)
            z = z / z.norm(dim=-1, keepdim=True)
            z.requires_grad_(True)
            y = 6.0 + 82.0 * torch.rand(b, generator=gen, device=device)
            loss_fn(z, y).backward()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(repeats):
                z.grad = None
                value = loss_fn(z, y)
                value.backward()
            sync(device)
            ms = 1000 * (time.perf_counter() - t0) / repeats
            out.append({"method": method, "B": b, "V": 2, "d": 128, "ms_fwd_bwd": round(ms, 3),
                        "finite": bool(torch.isfinite(value).item())})
    return out


def bench_loop(device, *, grid, subjects, base_width, batch, epochs, workdir: Path):
    """Two epochs of the real training loop on a store written here, then resume-from-1 vs straight."""
    import pandas as pd

    from brainage_core.data.store import StoreWriter
    from brainage_core.grids import grid_shape
    from brainage_core.training import load_checkpoint, train

    shape = grid_shape(grid)
    rng = np.random.default_rng(0)
    n_sites = 6
    split_of = np.array(["train"] * subjects, dtype=object)
    split_of[-8:-4] = "internal_test"
    split_of[-4:] = "external_test"
    volumes, ages, sites = make_volumes(subjects, shape, torch.device("cpu"), n_sites=n_sites, seed=3)
    rows, store = [], workdir / "store"
    with StoreWriter(store) as writer:
        writer.clear()
        for i in range(subjects):
            split = str(split_of[i])
            site = f"{int(sites[i]) if split != 'external_test' else n_sites + int(rng.integers(2))}"
            row = writer.append(split, volumes[i, 0].numpy())
            rows.append({"participant_id": f"sub-{i:04d}", "age": float(ages[i]), "sex": "F" if i % 2 else "M",
                         "site": site, "site_raw": site, "split": split, "row": row, "source_path": "memory"})
        writer.finish(pd.DataFrame(rows), {"source": "gpu_check", "layout": "memory", "modality": "vbm",
                                           "grid": grid, "fingerprint": "gpu-check"})
    cfg = {
        "data": {"store": str(store), "grid": grid},
        "model": {"backbone": "resnet18", "base_width": base_width},
        "loss": {"method": "yaware", "kernel": "rbf", "sigma": 2.0, "temperature": 0.1},
        "optimizer": {"lr": 1.0e-4},
        "schedule": {"name": "cosine", "rate": 0.5},
        "training": {"epochs": epochs, "batch_size": batch, "bf16": device.type == "cuda", "loader_workers": 2,
                     "device": device.type, "augment": {"crop": True, "cutout": True}},
        "evaluation": {"eval_every": 1, "batch_size": 16},
    }
    t0 = time.perf_counter()
    last = train(cfg, workdir / "straight", device=device)
    straight_s = time.perf_counter() - t0
    log_a = [json.loads(line) for line in (workdir / "straight" / "train_log.jsonl").read_text().splitlines()]
    class Interrupted(Exception):
        pass

    def die_after_first_checkpoint(metrics, checkpoint_dir):
        raise Interrupted

    try:
        train(cfg, workdir / "resumed", device=device, callback=die_after_first_checkpoint)
    except Interrupted:
        pass
    train(cfg, workdir / "resumed", device=device, resume_from=workdir / "resumed")
    log_b = [json.loads(line) for line in (workdir / "resumed" / "train_log.jsonl").read_text().splitlines()]
    state = load_checkpoint(workdir / "straight")
    return {
        "grid": grid,
        "subjects": subjects,
        "batch": batch,
        "epochs": epochs,
        "straight_run_s": round(straight_s, 1),
        "epoch_s": [round(r["epoch_s"], 2) for r in log_a],
        "train_loss_straight": [r["train_loss"] for r in log_a],
        "train_loss_resumed": [r["train_loss"] for r in log_b],
        "resume_abs_diff_last_epoch": abs(log_a[-1]["train_loss"] - log_b[-1]["train_loss"]),
        "metrics": {k: last.get(k) for k in ("val_mae_int", "val_mae_ext", "val_bacc", "test_mae_int", "eval_s")},
        "checkpoint_cuda_rng_states": len(state["rng"][0]["cuda"]),
    }


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: 6 mm grid, tiny models, a few steps")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--seconds", type=float, default=20.0, help="time budget of each training config")
    parser.add_argument("--volumes", type=int, default=256, help="volumes made in memory (at most 256)")
    parser.add_argument("--skip", nargs="*", default=(), choices=("train", "features", "losses", "loop"))
    args = parser.parse_args(argv)

    if args.quick:
        sys.meta_path.insert(0, _BlockImports())
    from brainage_core.grids import grid_shape

    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = args.out
    if out is None:
        base = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("bench/results")
        out = base / ("gpu_check_quick.json" if args.quick else "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": machine_info(device), "quick": args.quick, "errors": {}}
    started = time.perf_counter()

    def save() -> None:
        report["total_s"] = round(time.perf_counter() - started, 1)
        out.write_text(json.dumps(report, indent=2) + "\n")

    def section(name, fn):
        if name in args.skip:
            return
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as exc:  # keep the other sections' figures
            report["errors"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        print(f"[gpu_check] {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        save()

    if args.quick:
        grid, width, n, steps, seconds = "6mm", 4, min(args.volumes, 32), 4, 5.0
        configs = [("resnet18", 8, True), ("alexnet3d", 8, True), ("resnet18", 8, False)]
    else:
        grid, width, n, steps, seconds = "full", 64, min(args.volumes, 256), 300, args.seconds
        configs = [("resnet18", 16, True), ("resnet18", 32, True), ("resnet18", 16, False),
                   ("alexnet3d", 32, True), ("alexnet3d", 8, True)]
    shape = grid_shape(grid)
    t0 = time.perf_counter()
    volumes, ages, _ = make_volumes(n, shape, device)
    sync(device)
    report["volumes"] = {"n": n, "grid": grid, "shape": list(shape), "make_s": round(time.perf_counter() - t0, 2)}
    print(f"[gpu_check] {n} volumes {shape} made in {report['volumes']['make_s']} s on {device}", flush=True)

    augment = None
    try:
        from brainage_core.data.augment import DeviceAugment

        augment = DeviceAugment(grid=grid, crop=True, cutout=True)
    except ImportError as exc:
        report["errors"]["augment"] = f"DeviceAugment unavailable ({exc}): training steps without augmentation"

    def train_section():
        results = []
        for backbone, batch, bf16 in configs:
            budget = seconds if bf16 else seconds / 2
            results.append(bench_train(volumes, ages, device, backbone=backbone, base_width=width, batch=batch,
                                       views=2, bf16=bf16, max_steps=steps, seconds=budget, augment=augment))
            print(f"[gpu_check]   {results[-1]}", flush=True)
            report["train"] = results
            save()
        return results

    section("train", train_section)
    section("features", lambda: [bench_features(volumes, device, backbone=b, base_width=width, batch=32,
                                                bf16=device.type == "cuda", seconds=seconds / 4)
                                 for b in ("resnet18", "alexnet3d")])
    volumes = None  # free the device memory before the loop section
    if device.type == "cuda":
        torch.cuda.empty_cache()
    section("losses", lambda: bench_losses(device, sizes=(32, 256), repeats=3 if args.quick else 20))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        if args.quick:
            loop = {"grid": "6mm", "subjects": 40, "base_width": 4, "batch": 8, "epochs": 2}
        else:
            loop = {"grid": "3mm", "subjects": 160, "base_width": 32, "batch": 16, "epochs": 2}
        section("loop", lambda: bench_loop(device, workdir=Path(tmp), **loop))
    save()
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=1)[:4000])
    print(f"[gpu_check] wrote {out} in {report['total_s']} s", flush=True)
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
