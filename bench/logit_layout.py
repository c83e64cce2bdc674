"""Benchmark: the two GEMMs of one site-probe evaluation in either layout of the logits (docs/probes.md).

An evaluation of a multinomial fit on ``n`` rows of ``q`` whitened features (and a column of ones) and ``K``
classes computes the logits and the gradient's data term. ``rows x classes``: ``Z Θ`` (n, K) and
``Zᵀ P`` (q, K); ``classes x rows`` (what ``fast_logistic.py`` does): ``Θᵀ Zᵀ`` (K, n) and ``Pᵀ Z`` (K, q).
The FLOPs are the same; a CPU BLAS's speed is not (its kernels block the short side). Times the median of
``--repeat`` calls of each pair, one thread, for each K of ``--classes``, in float32 and float64, and writes
JSON with the machine.

Run: ``python bench/logit_layout.py --out docs/measurements/logit_layout.json`` (about 30 s).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from probes import machine_info  # noqa: E402


def median_ms(fn, repeat: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def time_layouts(Z: torch.Tensor, k: int, repeat: int) -> tuple[float, float]:
    """Median ms of the evaluation's two GEMMs, rows x classes and classes x rows, for ``K = k`` on ``Z``."""
    n, q = Z.shape
    ZT = Z.T.contiguous()
    theta, P = torch.randn(q, k, dtype=Z.dtype), torch.randn(n, k, dtype=Z.dtype)
    thetaT, PT = theta.T.contiguous(), P.T.contiguous()
    return (median_ms(lambda: (Z @ theta, ZT @ P), repeat), median_ms(lambda: (thetaT @ Z.T, PT @ Z), repeat))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2582, help="rows of a fold (default: 3,227 x 4/5)")
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--classes", default="2,3,8,11,16,32,58,63,64,100,128")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("docs/measurements/logit_layout.json"))
    args = parser.parse_args(argv)
    try:
        classes = [int(k) for k in args.classes.split(",")]
    except ValueError:
        print(f"bench/logit_layout.py: --classes {args.classes!r}: expected comma-separated integers", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    n, q = args.rows, args.features + 1
    rows = []
    for dtype in (torch.float32, torch.float64):
        Z = torch.randn(n, q, dtype=dtype)
        for k in classes:
            rows_by_classes, classes_by_rows = time_layouts(Z, k, args.repeat)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "classes": k,
                         "rows_x_classes_ms": rows_by_classes, "classes_x_rows_ms": classes_by_rows,
                         "ratio": rows_by_classes / classes_by_rows})
            print(f"{rows[-1]['dtype']} K={k}: rows x classes {rows_by_classes:.3f} ms, "
                  f"classes x rows {classes_by_rows:.3f} ms")
    report = {"machine": machine_info(1), "command": " ".join(["bench/logit_layout.py", *(argv or sys.argv[1:])]),
              "rows": n, "features": args.features, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
