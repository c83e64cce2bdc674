"""Benchmark: seconds per synthetic subject per core at each grid (JSON on stdout and in --out).

    python bench/synthetic.py [--subjects 12] [--out bench/results/synthetic.json]

Times :func:`brainage_core.data.synthetic.make_subject` single-threaded in this process after the
template cache is warm (the one-off template build is reported separately), as wall and CPU time.
Target (issue 3): ≤ 0.7 s per subject per core at the full grid.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from threadpoolctl import threadpool_limits

from brainage_core.data.cohort_plan import plan_cohort
from brainage_core.data.synthetic import make_subject
from brainage_core.data.synthetic_anatomy import load_anatomy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--subjects", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    plan = plan_cohort(subjects=300, seed=0).sample(n=args.subjects, random_state=0)
    figures: dict[str, dict] = {}
    with threadpool_limits(1):
        for grid in ("full", "3mm", "6mm"):
            t0 = time.perf_counter()
            load_anatomy(grid)
            build = time.perf_counter() - t0
            wall0, cpu0 = time.perf_counter(), time.process_time()
            for row in plan.to_dict("records"):
                make_subject(row, grid, 1.5, 0)
            figures[grid] = {
                "s_per_subject_wall": round((time.perf_counter() - wall0) / len(plan), 4),
                "s_per_subject_cpu": round((time.process_time() - cpu0) / len(plan), 4),
                "template_build_s": round(build, 3),
                "subjects": len(plan),
            }
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    result = {
        "benchmark": "synthetic make_subject, 1 thread",
        "grids": figures,
        "target_full_s_per_subject": 0.7,
        "meets_target": figures["full"]["s_per_subject_wall"] <= 0.7,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "load_average_1min": load,
            "torch": _torch_version(),
        },
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


def _torch_version() -> str | None:
    try:
        import torch

        return torch.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
