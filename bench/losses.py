"""Forward+backward time of every loss of brainage_core.losses (both forms where there are two).

For N = V·B embeddings (V = 2 views, d = 128, float32, random unit vectors, continuous ages
uniform in 6–90 years) it times ``loss(features, ages).backward()`` — the median of ``--repeats`` (≥ 20) runs after
``--warmup`` runs, all losses interleaved — on the CPU and, when available, on CUDA, and writes
``bench/results/losses.json`` with the figures, the ratio of each loss to ``yaware`` at the same N,
and machine info. The bar: every loss at N = 512 within 3× the time of ``yaware``.

    python bench/losses.py [--sizes 64 256 512] [--repeats 25] [--threads 1] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brainage_core.losses import build_loss  # noqa: E402

LOSSES: list[tuple[str, str, dict]] = [
    ("yaware", "yaware", {"kernel": "rbf"}),
    ("supcon", "supcon", {}),
    ("threshold/reference", "threshold", {"kernel": "rbf", "form": "reference"}),
    ("threshold/paper", "threshold", {"kernel": "rbf", "form": "paper", "threshold_margin": 0.0}),
    ("expw/reference", "expw", {"kernel": "rbf", "form": "reference"}),
    ("expw/paper", "expw", {"kernel": "rbf", "form": "paper"}),
    ("rnc", "rnc", {}),
    ("l1", "l1", {}),
    ("mse", "mse", {}),
]
VIEWS = 2
DIM = 128
BAR = 3.0


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_case(method: str, options: dict, size: int, device: torch.device):
    """The loss and its inputs at N = ``size``: (loss_fn, leaf tensor with requires_grad, ages)."""
    generator = torch.Generator().manual_seed(size)
    batch = size // VIEWS
    ages = (6.0 + 84.0 * torch.rand(batch, generator=generator)).to(device)  # continuous, as in OpenBHB
    loss_fn = build_loss(method, **options)
    if method in ("l1", "mse"):
        leaf = ages + torch.randn(batch, generator=generator).to(device)
    else:
        leaf = F.normalize(torch.randn(batch, VIEWS, DIM, generator=generator), dim=-1).to(device)
    return loss_fn, leaf.requires_grad_(True), ages


def time_size(size: int, device: torch.device, repeats: int, warmup: int) -> dict:
    """Median forward+backward time of every loss at N = ``size``.

    The losses are timed in rounds (one run of each per round, the order rotating), so that the load
    of a shared machine falls on all of them alike and the ratios to ``yaware`` stay meaningful.
    """
    cases = {name: make_case(method, options, size, device) for name, method, options in LOSSES}
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in names}
    for run in range(warmup + repeats):
        shift = run % len(names)
        for name in names[shift:] + names[:shift]:
            loss_fn, leaf, ages = cases[name]
            leaf.grad = None
            synchronise(device)
            start = time.perf_counter()
            loss_fn(leaf, ages).backward()
            synchronise(device)
            if run >= warmup:
                times[name].append(time.perf_counter() - start)
    row = {
        name: {
            "median_ms": 1e3 * statistics.median(values),
            "min_ms": 1e3 * min(values),
            "max_ms": 1e3 * max(values),
            "runs": len(values),
        }
        for name, values in times.items()
    }
    for name in row:
        row[name]["ratio_to_yaware"] = row[name]["median_ms"] / row["yaware"]["median_ms"]
    return row


def machine_info(threads: int) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "cuda": torch.cuda.is_available(),
        "load_average_1_5_15_min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512], help="N = V·B values")
    parser.add_argument("--repeats", type=int, default=25, help="timed runs per figure (≥ 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "losses.json")
    args = parser.parse_args(argv)
    if args.repeats < 20:
        parser.error(f"--repeats must be ≥ 20, got {args.repeats}")
    torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    results: dict = {
        "benchmark": "losses forward+backward",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "views": VIEWS,
        "dim": DIM,
        "dtype": "float32",
        "repeats": args.repeats,
        "warmup": args.warmup,
        "machine": machine_info(args.threads),
        "devices": {},
    }
    for device in devices:
        figures: dict = {}
        for size in args.sizes:
            row = time_size(size, device, args.repeats, args.warmup)
            figures[str(size)] = row
            print(f"[{device.type}] N={size}: " + ", ".join(f"{n} {r['median_ms']:.2f} ms" for n, r in row.items()))
        largest = str(max(args.sizes))
        worst = max(figures[largest].items(), key=lambda item: item[1]["ratio_to_yaware"])
        results["devices"][device.type] = {
            "figures": figures,
            "bar": {
                "n": int(largest),
                "max_ratio_to_yaware": worst[1]["ratio_to_yaware"],
                "slowest": worst[0],
                "within_3x": worst[1]["ratio_to_yaware"] <= BAR,
            },
        }
        print(f"[{device.type}] N={largest}: slowest {worst[0]} at {worst[1]['ratio_to_yaware']:.2f}× yaware")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
