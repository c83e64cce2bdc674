"""Study overhead: study wall time against the trials' training compute, per-trial overhead in seconds.

``python bench/study_overhead.py [--trials 3] [--epochs 2] [--subjects 40] [--modes intrial,ddp] [--repeat 1]``
runs small real studies (search_spaces/smoke.yaml: 6 mm grid, ResNet-18 width 4, sequential trials) in
this process through :func:`study.run.run_study`, each on a fresh local Ray, and writes
``bench/results/study_overhead.json`` with the machine it ran on.

Per study (trials run one after another, ``max_concurrent_trials = 1``):

- ``study_wall_s``: the whole ``run_study`` call (Ray start-up included; the data store is prepared
  beforehand, outside the timing);
- ``ray_init_s``: a bare ``ray.init`` + ``ray.shutdown`` of the same size, measured separately;
- ``train_s``: the sum over trials of the training loop's own wall time (``wall_s`` of the last
  evaluation: epochs, evaluations and checkpoint writes inside ``brainage_core.training.train``);
- ``overhead_per_trial_s`` = (study_wall_s - ray_init_s - train_s) / trials: everything Ray and the
  runner add per trial (trial process or actor start, imports, Train controller/worker group and
  placement group creation, reporting and checkpoint registration, trial teardown, driver callbacks);
- from Tune's ``result.json`` of each trial: ``startup_s`` (Tune's ``time_total_s`` at the first report
  minus the training wall time at that report: process start, imports, worker group, model and data
  set-up) and ``report_s`` (per later report: Tune time minus training time: reporting and checkpoint
  registration).

Variants: ``before`` = the settings of the issue-6 runner, ``after`` = the current ones. In-trial:
``study.run.REUSE_ACTORS`` (the next trial reuses the trial actor: no new process, no re-import).
DDP: ``before`` = Ray's default Train settings, a new trial process per trial and Ray's plain
``TorchTrainer`` (``BRAINAGE_DDP_REUSE=0``); ``after`` = ``study.ray_runtime.DEFAULT_ENV``'s Train
settings (controller polling every 0.1 s instead of 2 s, no structured Train logs) and
``study.train_run`` (the trial process reused, stoppable by Tune; no dataset-manager actor). Both DDP
variants import scikit-learn only on the rank that fits the probes (not switchable).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SMOKE = ROOT / "search_spaces" / "smoke.yaml"
OUT = ROOT / "bench" / "results" / "study_overhead.json"


def machine() -> dict:
    import ray
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "ray": ray.__version__, "torch_threads": torch.get_num_threads(),
            "load_avg_1min": os.getloadavg()[0]}


def space_file(folder: Path, *, trials: int, epochs: int, subjects: int, num_workers: int) -> Path:
    d = yaml.safe_load(SMOKE.read_text())
    d["data"]["synthetic"]["subjects"] = subjects
    d["training"]["epochs"] = epochs
    d["study"].update(num_samples=trials, max_concurrent_trials=1, asha=None,
                      resources={"num_workers": num_workers, "use_gpu": False, "cpus_per_worker": 1})
    path = folder / f"bench_w{num_workers}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def ray_init_time(num_cpus: int) -> float:
    import logging

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", logging_level=logging.WARNING)
    ray.shutdown()
    return time.perf_counter() - t0


def trial_timings(study_dir: Path) -> list[dict]:
    out = []
    for result_file in sorted((study_dir / "tune").glob("*/result.json")):
        rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "epoch" in r and "wall_s" in r]
        if not rows:
            continue
        first, last = rows[0], rows[-1]
        startup = float(first["time_total_s"]) - float(first["wall_s"])
        later = [(float(b["time_total_s"]) - float(a["time_total_s"])) - (float(b["wall_s"]) - float(a["wall_s"]))
                 for a, b in zip(rows, rows[1:])]
        out.append({"trial_id": first.get("trial_id"), "reports": len(rows), "train_s": float(last["wall_s"]),
                    "tune_total_s": float(last["time_total_s"]), "startup_s": startup,
                    "report_s": sum(later) / len(later) if later else None})
    return out


#: Ray's own defaults for the Train settings study.ray_runtime.DEFAULT_ENV changes (the DDP "before")
RAY_TRAIN_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0", "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING": "1",
                      "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "1"}


def run_variant(name: str, space: Path, storage: Path, *, reuse: bool, num_cpus: int,
                env: dict[str, str] | None = None) -> dict:
    import study.run as runner
    from study.ray_runtime import DEFAULT_ENV
    from study.train_run import REUSE_ENV

    runner.REUSE_ACTORS = reuse
    for key in RAY_TRAIN_DEFAULTS:  # the local Ray started by run_study inherits this environment
        os.environ[key] = (env or {}).get(key, DEFAULT_ENV[key])
    os.environ[REUSE_ENV] = "1" if reuse else "0"
    init_s = ray_init_time(num_cpus)
    t0 = time.perf_counter()
    study_dir = runner.run_study(space, name=name, storage=storage)
    wall = time.perf_counter() - t0
    trials = trial_timings(study_dir)
    train_s = sum(t["train_s"] for t in trials)
    n = max(len(trials), 1)
    return {"variant": name, "reuse_actors": reuse,
            "train_env": {k: os.environ[k] for k in (*RAY_TRAIN_DEFAULTS, REUSE_ENV)},
            "trials": len(trials), "study_wall_s": wall, "ray_init_s": init_s,
            "train_s": train_s, "overhead_per_trial_s": (wall - init_s - train_s) / n,
            "startup_per_trial_s": sum(t["startup_s"] for t in trials) / n,
            "report_s": [t["report_s"] for t in trials], "per_trial": trials}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--subjects", type=int, default=40)
    p.add_argument("--modes", default="intrial,ddp", help="comma list of intrial, ddp")
    p.add_argument("--repeat", type=int, default=1, help="run every variant this many times (mean/min/max)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                       "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "OMP_NUM_THREADS": "1"}.items():
        os.environ.setdefault(key, value)
    os.environ.pop("RAY_ADDRESS", None)
    tmp = Path(tempfile.mkdtemp(prefix="study-overhead-"))
    os.environ["BRAINAGE_CACHE"] = str(tmp / "cache")
    report = {"machine": machine(), "settings": vars(args) | {"out": str(args.out)}, "studies": []}
    from brainage_core.data.sources import resolve_store
    from study.space import load_search_space

    for mode in args.modes.split(","):
        workers = 2 if mode == "ddp" else 1
        space = space_file(tmp, trials=args.trials, epochs=args.epochs, subjects=args.subjects, num_workers=workers)
        resolve_store(load_search_space(space).config.data, progress=False)  # outside the timings
        num_cpus = max(os.cpu_count() or 1, 1 + 2 * workers if workers > 1 else 1)
        if mode == "intrial":
            variants = [("before", False, None), ("after", True, None)]
        else:
            variants = [("before", False, RAY_TRAIN_DEFAULTS), ("after", True, None)]
        for repeat in range(args.repeat):
            for label, reuse, env in variants:
                result = run_variant(f"{mode}_{label}_{repeat}", space, tmp / "studies", reuse=reuse,
                                     num_cpus=num_cpus, env=env)
                result.update(mode=mode, num_workers=workers, label=label, repeat=repeat)
                report["studies"].append(result)
                print(f"[bench] {mode} {label} #{repeat}: wall {result['study_wall_s']:.1f} s, train "
                      f"{result['train_s']:.1f} s, ray init {result['ray_init_s']:.1f} s, overhead "
                      f"{result['overhead_per_trial_s']:.1f} s/trial (start-up {result['startup_per_trial_s']:.1f} s)",
                      flush=True)
    summary = {}
    for study in report["studies"]:
        summary.setdefault(f"{study['mode']}_{study['label']}", []).append(study["overhead_per_trial_s"])
    report["overhead_per_trial_s"] = {k: {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "runs": v}
                                      for k, v in summary.items()}
    for key, value in report["overhead_per_trial_s"].items():
        print(f"[bench] {key}: overhead per trial {value['mean']:.1f} s (min {value['min']:.1f}, max "
              f"{value['max']:.1f}, {len(value['runs'])} run(s))", flush=True)
    report["machine"]["load_avg_1min_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
