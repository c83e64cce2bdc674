"""Benchmark: volumes/s through a DataLoader over a prepared store vs the raw memmap read bound.

For each grid (``full`` and ``3mm`` by default) the script writes a temporary store of random
float16 volumes (≈ 270 MB at the full grid, deleted afterwards), then measures with a warm page
cache:

* ``bound``: copying the same batches of rows (same shuffled order) out of the memmap into one
  buffer per batch, in this process (numpy, no DataLoader) — what any loader must at least do;
* ``loader``: ``StoreDataset`` through ``torch.utils.data.DataLoader`` (batch 32, shuffle) with
  ``num_workers`` 0 and 2, with the project's ``collate`` (batched reads, no second copy) and with
  torch's default collate.

Bound and loader passes are interleaved (the load of a shared machine drifts); the reported ratio is
the median over trials of loader/bound. Writes JSON (default ``bench/results/data_loading.json``)
with volumes/s, the ratios and machine info. Run: ``python bench/data_loading.py`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from brainage_core.data.dataset import StoreDataset, collate
from brainage_core.data.store import StoreWriter, open_store
from brainage_core.grids import grid_shape

BATCH = 32


def make_store(path: Path, grid: str, n: int, seed: int = 0):
    """A store of ``n`` random float16 volumes in split ``train``; written with the real StoreWriter."""
    rng = np.random.default_rng(seed)
    shape = grid_shape(grid)
    with StoreWriter(path) as writer:
        writer.clear()
        for _ in range(n):
            writer.append("train", rng.random(shape, dtype=np.float32)[None])
        table = pd.DataFrame(
            {
                "participant_id": [f"b{i:04d}" for i in range(n)],
                "age": rng.uniform(6, 88, n),
                "sex": "F",
                "site": [f"s{i % 8}" for i in range(n)],
                "site_raw": [f"s{i % 8}" for i in range(n)],
                "split": "train",
                "row": np.arange(n),
                "source_path": "",
            }
        )
        writer.finish(
            table,
            {
                "source": "random",
                "layout": "bench",
                "modality": "vbm",
                "grid": grid,
                "fingerprint": f"bench-{grid}-{n}-{seed}",
            },
        )
    return open_store(path)


def batch_orders(n: int, passes: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    orders = []
    for _ in range(passes):
        perm = rng.permutation(n)
        orders += [perm[i : i + BATCH] for i in range(0, n, BATCH)]
    return orders


def time_bound(array: np.ndarray, batches: list[np.ndarray]) -> float:
    """Volumes/s of copying each batch's rows out of the memmap into a fresh buffer."""
    volumes = 0
    start = time.perf_counter()
    for rows in batches:
        out = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
        for j, r in enumerate(rows):
            out[j] = array[r]
        volumes += len(rows)
    return volumes / (time.perf_counter() - start)


def make_loader(store, workers: int, use_collate: bool) -> DataLoader:
    dataset = StoreDataset(store, "train")
    loader = DataLoader(
        dataset,
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=collate if use_collate else None,
        generator=torch.Generator().manual_seed(0),
    )
    for _ in loader:  # warm-up pass: starts the workers, maps the file
        pass
    return loader


def time_loader(loader: DataLoader, passes: int) -> float:
    """Volumes/s of ``passes`` epochs through ``loader`` (the consumer only checks the batch shape)."""
    shape = loader.dataset.volume_shape
    volumes = 0
    start = time.perf_counter()
    for _ in range(passes):
        for x, _age, _site in loader:
            assert x.dtype == torch.float16 and tuple(x.shape[1:]) == shape
            volumes += x.shape[0]
    return volumes / (time.perf_counter() - start)


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out", default="bench/results/data_loading.json")
    parser.add_argument("--grids", nargs="+", default=["full", "3mm"])
    parser.add_argument("--volumes", type=int, default=64, help="volumes at the full grid (8× at 3mm)")
    parser.add_argument("--passes", type=int, default=4, help="timed passes over the store per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved (bound, loader) trials per setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--tmp", default=None, help="folder for the temporary store (default: system temp)")
    args = parser.parse_args(argv)

    results: dict = {"machine": machine_info(), "batch_size": BATCH, "page_cache": "warm", "grids": {}}
    for grid in args.grids:
        n = args.volumes * (8 if grid == "3mm" else 64 if grid == "6mm" else 1)
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-store-{grid}-", dir=args.tmp))
        try:
            store = make_store(tmp / "store", grid, n)
            array = store.array("train")
            batches = batch_orders(n, args.passes, seed=1)
            time_bound(array, batches)  # warm the page cache
            bound = max(time_bound(array, batches) for _ in range(2))
            entry = {
                "volumes": n,
                "volume_mb": float(np.prod(array.shape[1:]) * 2 / 1e6),
                "store_mb": float(array.nbytes / 1e6),
                "bound_volumes_per_s": bound,
                "loader": {},
            }
            for workers in args.workers:
                for name, use_collate in (("collate", True), ("default_collate", False)):
                    loader = make_loader(store, workers, use_collate)
                    # interleave bound and loader passes: the machine's load drifts, the pairs see the same load
                    pairs = [
                        (time_bound(array, batches), time_loader(loader, args.passes)) for _ in range(args.repeats)
                    ]
                    del loader
                    ratios = sorted(r / b for b, r in pairs)
                    rate = max(r for _, r in pairs)
                    entry["loader"][f"workers{workers}_{name}"] = {
                        "volumes_per_s": rate,
                        "bound_volumes_per_s_same_trials": max(b for b, _ in pairs),
                        "ratio_to_bound": float(np.median(ratios)),
                        "ratios": ratios,
                    }
                    print(
                        f"{grid:>4} workers={workers} {name:<15} {rate:8.1f} vol/s  "
                        f"bound {max(b for b, _ in pairs):8.1f}  median ratio {np.median(ratios):.2f}",
                        flush=True,
                    )
            results["grids"][grid] = entry
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    ratios = [
        v["ratio_to_bound"]
        for g in results["grids"].values()
        for k, v in g["loader"].items()
        if "_collate" in k and not k.endswith("default_collate")
    ]
    results["min_ratio_project_collate"] = min(ratios) if ratios else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
