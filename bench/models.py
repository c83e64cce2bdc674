"""Training-step throughput of every backbone: volume-passes per second (forward + backward + Adam).

One step is what a contrastive training step costs: a batch of ``batch`` subjects x ``views`` views
(32 x 2 in the reference recipe) through the encoder + contrastive head, a SimCLR-style stand-in
loss over the views (negligible next to the network), backward, Adam step. The figure is
``batch * views / median step time``, i.e. volumes passed forward and backward per second; the
process CPU time per step is recorded beside it (on a shared CPU, wall >> CPU time means contention).

Modes: ``fp32``; ``bf16`` (torch.autocast bf16); ``bf16_channels_last`` (bf16 + channels_last_3d
weights and inputs); ``bf16_compile`` (bf16 + torch.compile, compile time reported apart).

Defaults: on a GPU the full grid 121x145x121, batch 32 x 2 views, base_width 64; on the CPU a reduced
setting (6 mm grid, batch 4 x 2 views, base_width 8; torch.compile for resnet18 only) so the whole run
takes a few minutes. alexnet3d cannot run below 69 voxels per axis: where the grid is smaller its
random input is enlarged to 69 per axis (the input shape used is recorded). A configuration that runs
out of memory or fails is recorded as such, and the others go on.

Usage: ``python bench/models.py [--device cpu|cuda] [--grid 6mm] [--batch 4] [--base-width 8]
[--backbones resnet18,densenet121] [--modes fp32,bf16] [--compile-backbones resnet18] [--budget-s 600]
[--out bench/results/models.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brainage_core.grids import GRID_NAMES, grid_shape  # noqa: E402
from brainage_core.models import BACKBONES, build_model  # noqa: E402

MODES = ("fp32", "bf16", "bf16_channels_last", "bf16_compile")


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def stand_in_loss(z: torch.Tensor, batch: int, views: int, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent over the views of each subject: z (batch * views, d) unit-norm, view-major order."""
    n = batch * views
    logits = (z @ z.T) / temperature
    logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
    subject = torch.arange(n, device=z.device) % batch
    positive = (subject[:, None] == subject[None, :]) & ~torch.eye(n, dtype=torch.bool, device=z.device)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -(log_prob.masked_fill(~positive, 0.0).sum(1) / positive.sum(1)).mean()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(
    backbone: str,
    mode: str,
    *,
    device: torch.device,
    shape: tuple[int, int, int],
    batch: int,
    views: int,
    base_width: int,
    warmup: int,
    steps: int,
) -> dict:
    torch.manual_seed(0)
    model = build_model(backbone, "contrastive", base_width=base_width).to(device).train()
    min_size = getattr(model.encoder, "min_size", 1)
    shape = tuple(max(n, min_size) for n in shape)
    x = torch.randn(batch * views, 1, *shape, device=device)
    channels_last = mode == "bf16_channels_last"
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    step_model = torch.compile(model) if mode == "bf16_compile" else model
    use_bf16 = mode != "fp32"

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            z = step_model(x)
        loss = stand_in_loss(F.normalize(z.float(), dim=1), batch, views)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    times, cpu_times = [], []
    for _ in range(steps):
        synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    median = statistics.median(times)
    result = {
        "backbone": backbone,
        "mode": mode,
        "input_shape": [batch * views, 1, *shape],
        "parameters": sum(p.numel() for p in model.parameters()),
        "warmup_steps": warmup,
        "warmup_s": round(warmup_s, 3),
        "steps": steps,
        "step_s_median": round(median, 5),
        "step_s_min": round(min(times), 5),
        "volume_passes_per_s": round(batch * views / median, 3),
        # CPU seconds of this process per step: on a shared CPU it tells contention (wall >> cpu) apart.
        "cpu_s_per_step_median": round(statistics.median(cpu_times), 5),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--grid", choices=GRID_NAMES, default=None, help="default: full on GPU, 6mm on CPU")
    parser.add_argument("--batch", type=int, default=None, help="subjects per step; default 32 GPU, 4 CPU")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--base-width", type=int, default=None, help="default 64 GPU, 8 CPU")
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--warmup", type=int, default=None, help="default 3 GPU, 1 CPU (compile: +2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps; default 10 GPU, 5 CPU")
    parser.add_argument(
        "--compile-backbones",
        default=None,
        help="backbones run in bf16_compile mode; default all on GPU, resnet18 on CPU (compiling takes ~2 min each)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=None, help="start no new configuration after this; default 1200 GPU, 240 CPU"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "models.json"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    grid = args.grid or ("full" if on_gpu else "6mm")
    batch = args.batch or (32 if on_gpu else 4)
    base_width = args.base_width or (64 if on_gpu else 8)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    steps = args.steps or (10 if on_gpu else 5)
    budget_s = args.budget_s if args.budget_s is not None else (1200.0 if on_gpu else 240.0)
    backbones = [b for b in args.backbones.split(",") if b]
    modes = [m for m in args.modes.split(",") if m]
    if args.compile_backbones is None:
        compiled = backbones if on_gpu else [b for b in backbones if b == "resnet18"]
    else:
        compiled = [b for b in args.compile_backbones.split(",") if b]
    for name, valid in (("backbone", BACKBONES), ("mode", MODES)):
        chosen = backbones if name == "backbone" else modes
        bad = [c for c in chosen if c not in valid]
        if bad:
            parser.error(f"unknown {name}(s) {bad}; expected some of {', '.join(valid)}")

    report = {
        "benchmark": "models: training-step volume-passes/s (forward + backward + Adam, contrastive head)",
        "machine": machine_info(device),
        "settings": {
            "grid": grid,
            "grid_shape": list(grid_shape(grid)),
            "batch": batch,
            "views": args.views,
            "base_width": base_width,
            "warmup": warmup,
            "steps": steps,
            "compiled_backbones": compiled,
            "budget_s": budget_s,
        },
        "results": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for mode in modes:
        for backbone in backbones:
            if mode == "bf16_compile" and backbone not in compiled:
                continue
            if time.perf_counter() - started > budget_s:
                row = {"backbone": backbone, "mode": mode, "skipped": f"time budget {budget_s:.0f} s spent"}
            else:
                try:
                    row = bench_one(
                        backbone,
                        mode,
                        device=device,
                        shape=grid_shape(grid),
                        batch=batch,
                        views=args.views,
                        base_width=base_width,
                        warmup=warmup + (2 if mode == "bf16_compile" else 0),
                        steps=steps,
                    )
                except torch.OutOfMemoryError as error:
                    row = {"backbone": backbone, "mode": mode, "error": f"out of memory: {str(error)[:200]}"}
                except Exception as error:  # a failed configuration must not lose the others' figures
                    row = {"backbone": backbone, "mode": mode, "error": f"{type(error).__name__}: {error}"[:500]}
                if on_gpu:
                    torch.cuda.empty_cache()
            report["results"].append(row)
            report["total_s"] = round(time.perf_counter() - started, 1)
            report["machine"]["load_average_now"] = [round(v, 2) for v in os.getloadavg()]
            out.write_text(json.dumps(report, indent=2) + "\n")
            figure = row.get("volume_passes_per_s", row.get("error", row.get("skipped")))
            print(f"{backbone:12s} {mode:20s} {figure}", flush=True)
    return report


if __name__ == "__main__":
    main()
