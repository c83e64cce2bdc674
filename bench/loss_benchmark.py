"""Equal-budget loss benchmark: ``python bench/loss_benchmark.py --out docs/measurements/loss_benchmark.json``.

"Which loss, on this kind of data?" For every loss family (one search space each in
``search_spaces/benchmark/``: l1, mse, supcon, yaware, threshold, expw, rnc), on ONE synthetic cohort:

1. a search over that loss's own hyper-parameters (``study/run.py``), the same number of trials and
   epochs for every loss (``--trials``, ``--epochs``; one evaluation at the last epoch);
2. the best configuration (by the study's validation objective) re-run with ``--seeds`` seeds on the
   whole training split by ``study/final.py`` (test metrics, exact probes);
3. per loss: the mean and 95 % Student-t interval over seeds of test MAE int / ext (years), site BAcc and
   Lc, next to the constant baselines (predicting the training median age) and the chance BAcc; per loss
   against a reference loss (``--reference``, default l1): the difference of means with its 95 % Welch
   interval, *significant* when that interval excludes 0 (no correction for the number of comparisons).

Writes the JSON (``--out``: figures, budget, cohort, command, wall times, machine) after every loss, so an
interrupted run keeps what finished, and the markdown table (``--table``, default: the JSON's path with
``.md``). The studies go to ``--storage`` (default ``studies/``), one folder per loss named
``<--name>-<loss>`` (default name ``loss-benchmark-<time>``); an existing study folder is never overwritten.
Not a timed test: the wall times depend on the machine and its load (recorded in the JSON).

``--combine A.json B.json ... --out C.json`` merges runs of disjoint losses made with the same cohort,
model and budget (e.g. losses run as separate processes or on separate machines) into one JSON and table,
with the comparisons recomputed; runs that differ in cohort, model or budget are refused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/loss_benchmark.py` from a clone, without PYTHONPATH
    sys.path.insert(0, str(ROOT))

from brainage_core.errors import BrainageError, ConfigError, DataError  # noqa: E402
from brainage_core.evaluation.intervals import t_interval, welch_difference  # noqa: E402

SPACES = ROOT / "search_spaces" / "benchmark"
LOSSES = ("l1", "mse", "supcon", "yaware", "threshold", "expw", "rnc")
#: the test metrics of the table (all lower is better), then the baselines reported beside them
METRICS = ("test_mae_int", "test_mae_ext", "test_bacc", "test_lc")
BASELINES = ("test_mae_int_const", "test_mae_ext_const", "test_bacc_chance")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/loss_benchmark.py", description=__doc__.splitlines()[0])
    p.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated (default: {','.join(LOSSES)})")
    p.add_argument("--spaces", type=Path, default=SPACES, help="folder of <loss>.yaml search spaces")
    p.add_argument("--trials", type=int, default=3, help="search trials per loss (default 3)")
    p.add_argument("--epochs", type=int, default=20, help="epochs of every trial and seed (default 20)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of each loss's best configuration (default 3)")
    p.add_argument("--subjects", type=int, default=None, help="cohort size (default: the YAMLs')")
    p.add_argument("--sites", type=int, default=None, help="cohort sites (default: the YAMLs')")
    p.add_argument("--concurrent", type=int, default=None, help="concurrent trials (default: the YAMLs')")
    p.add_argument("--reference", default="l1", help="loss the others are compared with (default l1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="more dotted overrides for every loss (e.g. evaluation.protocol=fast); repeatable")
    p.add_argument("--storage", type=Path, default=None, help="folder of the studies (default studies/)")
    p.add_argument("--name", default=None, help="study name prefix (default loss-benchmark-<time>)")
    p.add_argument("--combine", type=Path, nargs="+", default=None, metavar="JSON",
                   help="merge these benchmark JSONs (disjoint losses, same cohort and budget) instead of running")
    p.add_argument("--out", type=Path, required=True, help="JSON to write")
    p.add_argument("--table", type=Path, default=None, help="markdown table (default: --out with .md)")
    return p.parse_args(argv)


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_avg_1min_start": os.getloadavg()[0]}


def interval_summary(values: Sequence[float]) -> dict[str, float | int]:
    """The JSON of one metric over seeds: n, mean, std and the 95 % Student-t interval of the mean
    (``brainage_core.evaluation.intervals.t_interval``; NaN spread when n < 2)."""
    iv = t_interval(values)
    return {"n": iv.n, "mean": iv.mean, "std": iv.std, "ci95_low": iv.low, "ci95_high": iv.high}


def difference_summary(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """The JSON of mean(a) - mean(b) with its 95 % Welch-Satterthwaite interval, p-value and ``significant``
    (``brainage_core.evaluation.intervals.welch_difference``; NaN, not significant, when a side has < 2 values)."""
    w = welch_difference(a, b)
    return {"diff": w.diff, "ci95_low": w.low, "ci95_high": w.high, "p_value": w.p_value,
            "significant": w.significant}


def budget_overrides(args: argparse.Namespace) -> list[str]:
    """The dotted overrides every loss gets: the same trials, epochs, cohort and evaluation schedule."""
    out = [f"study.num_samples={args.trials}", f"training.epochs={args.epochs}",
           f"evaluation.eval_every={args.epochs}"]
    if args.subjects is not None:
        out.append(f"data.synthetic.subjects={args.subjects}")
    if args.sites is not None:
        out.append(f"data.synthetic.sites={args.sites}")
    if args.concurrent is not None:
        out.append(f"study.max_concurrent_trials={args.concurrent}")
    return out + list(args.set)


def check_inputs(args: argparse.Namespace) -> tuple[list[str], dict[str, Path]]:
    losses = [x.strip() for x in args.losses.split(",") if x.strip()]
    if not losses:
        raise ConfigError("--losses: empty: expected comma-separated loss names, e.g. l1,expw")
    unknown = [x for x in losses if x not in LOSSES]
    if unknown:
        raise ConfigError(f"--losses {args.losses}: unknown loss {unknown[0]!r}: expected names from "
                          f"{', '.join(LOSSES)}")
    spaces = {loss: args.spaces / f"{loss}.yaml" for loss in losses}
    missing = [str(p) for p in spaces.values() if not p.is_file()]
    if missing:
        raise ConfigError(f"{missing[0]}: no such search space: expected one YAML per loss in {args.spaces}")
    for name, value in (("--trials", args.trials), ("--epochs", args.epochs), ("--seeds", args.seeds)):
        if value < 1:
            raise ConfigError(f"{name} {value}: expected an integer >= 1")
    if args.seeds < 2:
        print("[bench] warning: --seeds 1 gives no confidence interval", file=sys.stderr, flush=True)
    from study.space import load_search_space

    cohorts = set()
    for loss, path in spaces.items():
        space = load_search_space(path, budget_overrides(args))  # every bad input fails here, before training
        if space.config.loss.method != loss:
            raise ConfigError(f"{path}: loss.method = {space.config.loss.method!r}: expected {loss!r} (the file name)")
        if space.config.data.synthetic is None:
            raise ConfigError(f"{path}: data.synthetic is not set: the benchmark runs on one synthetic cohort")
        cohorts.add((json.dumps(space.config.to_dict()["data"], sort_keys=True), space.config.data.grid))
    if len(cohorts) != 1:
        raise ConfigError(f"{args.spaces}: the search spaces name {len(cohorts)} different data sections: expected "
                          "one cohort for every loss (equal budget, same data)")
    return losses, spaces


def loss_figures(loss: str, study_dir: Path, search_s: float, final_s: float) -> dict[str, Any]:
    """The figures of one loss from its study folder (final.parquet's per-seed rows)."""
    import pandas as pd

    final = pd.read_parquet(study_dir / "final.parquet")
    seeds = final[(final["kind"] == "seed") & (final["status"] == "final")]
    failed = int(((final["kind"] == "seed") & (final["status"] != "final")).sum())
    results = pd.read_parquet(study_dir / "results.parquet")
    search = results[~results.get("final", pd.Series(False, index=results.index)).fillna(False).astype(bool)]
    last = search.sort_values("epoch").groupby("trial_id").tail(1)
    params = {c[len("param."):]: seeds[c].iloc[0] for c in seeds.columns
              if c.startswith("param.") and len(seeds) and pd.notna(seeds[c].iloc[0])}
    out: dict[str, Any] = {
        "loss": loss, "study_dir": str(study_dir), "best_params": {k: _plain(v) for k, v in params.items()},
        "source_trial_id": str(seeds["source_trial_id"].iloc[0]) if len(seeds) else None,
        "n_seeds": int(len(seeds)), "n_failed_seeds": failed, "search_s": round(search_s, 1),
        "final_s": round(final_s, 1),
        "search_trials": [{"trial_id": str(r["trial_id"]), **{k: _plain(r[k]) for k in r.index
                           if k.startswith("param.") or k in ("val_mae_int", "val_mae_ext", "val_bacc", "val_lc",
                                                              "val_mae_int_const", "val_mae_ext_const")}}
                          for _, r in last.iterrows()],
        "seeds": {m: [float(x) for x in seeds[m]] for m in (*METRICS, *BASELINES) if m in seeds.columns},
    }
    out["metrics"] = {m: interval_summary(out["seeds"].get(m, [])) for m in METRICS}
    out["baselines"] = {m: interval_summary(out["seeds"].get(m, []))["mean"] for m in BASELINES}
    beats = [a < c for a, c in zip(out["seeds"].get("test_mae_int", []), out["seeds"].get("test_mae_int_const", []))]
    out["seeds_below_constant_int"] = int(sum(beats))
    return out


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def compare(per_loss: dict[str, dict[str, Any]], reference: str) -> dict[str, dict[str, Any]]:
    """loss -> metric -> Welch difference against ``reference`` (negative: better than the reference)."""
    if reference not in per_loss:
        return {}
    ref = per_loss[reference]["seeds"]
    return {loss: {m: difference_summary(d["seeds"].get(m, []), ref.get(m, [])) for m in METRICS}
            for loss, d in per_loss.items() if loss != reference}


def _cell(s: dict[str, Any]) -> str:
    if not s or s.get("n", 0) == 0:
        return "–"
    if s["n"] < 2:
        return f"{s['mean']:.3f} (1 seed)"
    return f"{s['mean']:.3f} [{s['ci95_low']:.3f}, {s['ci95_high']:.3f}]"


def markdown(report: dict[str, Any]) -> str:
    """The table of ``report`` (see :func:`run`): one row per loss, best test MAE ext first."""
    losses = sorted(report["losses"].values(), key=lambda d: (d["metrics"]["test_mae_ext"]["mean"]
                                                              if math.isfinite(d["metrics"]["test_mae_ext"]["mean"])
                                                              else math.inf))
    b = report["budget"]
    lines = [f"Mean over {b['seeds']} seeds [95 % t-interval of the mean]; lower is better everywhere. "
             f"Budget per loss: {b['trials']} search trials × {b['epochs']} epochs, then {b['seeds']} seeds × "
             f"{b['epochs']} epochs of the best configuration.", "",
             "| loss | test MAE int (y) | test MAE ext (y) | test site BAcc | test Lc | best configuration |",
             "|---|---|---|---|---|---|"]
    for d in losses:
        m = d["metrics"]
        params = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in d["best_params"].items()
                           if k != "training.seed")
        lines.append(f"| {d['loss']} | {_cell(m['test_mae_int'])} | {_cell(m['test_mae_ext'])} | "
                     f"{_cell(m['test_bacc'])} | {_cell(m['test_lc'])} | {params} |")
    base = next(iter(report["losses"].values()))["baselines"] if report["losses"] else {}
    if base:
        lines += ["", f"Constant baselines (predicting the training median age): test MAE int "
                      f"{base['test_mae_int_const']:.3f}, ext {base['test_mae_ext_const']:.3f} years; chance site "
                      f"BAcc {base['test_bacc_chance']:.3f} (1 / the sites of internal_test)."]
    ref = report["reference"]
    if report["comparisons"]:
        lines += ["", f"Difference from {ref} (mean of loss − mean of {ref}, 95 % Welch interval; * = the interval "
                      "excludes 0, uncorrected for the number of comparisons):", "",
                  "| loss | Δ MAE int | Δ MAE ext | Δ BAcc | Δ Lc |", "|---|---|---|---|---|"]
        for loss, c in report["comparisons"].items():
            cells = []
            for metric in METRICS:
                w = c[metric]
                if not math.isfinite(w["diff"]):
                    cells.append("–")
                elif not math.isfinite(w["ci95_low"]):
                    cells.append(f"{w['diff']:+.3f}")
                else:
                    cells.append(f"{w['diff']:+.3f} [{w['ci95_low']:+.3f}, {w['ci95_high']:+.3f}]"
                                 + (" *" if w["significant"] else ""))
            lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    if report.get("missing"):
        lines += ["", f"Not run (the benchmark stopped first): {', '.join(report['missing'])}."]
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path, table: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(markdown(report))


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Search, final seeds and figures of every loss; writes the JSON and the table after each loss."""
    losses, spaces = check_inputs(args)
    storage = args.storage or ROOT / "studies"
    prefix = args.name or f"loss-benchmark-{time.strftime('%Y%m%d-%H%M%S')}"
    taken = [loss for loss in losses if (storage / f"{prefix}-{loss}").exists()]
    if taken:
        raise DataError(f"{storage / f'{prefix}-{taken[0]}'} exists: expected a new --name (studies are never "
                        "overwritten)")
    table = args.table or args.out.with_suffix(".md")
    overrides = budget_overrides(args)

    from study.final import run_final
    from study.ray_runtime import start_ray
    from study.run import _forwarded_env, run_study
    from study.space import load_search_space

    first = load_search_space(spaces[losses[0]], overrides)
    start = time.perf_counter()
    import ray

    info = start_ray(first.study.resources, first.study.max_concurrent_trials, env=_forwarded_env())
    report: dict[str, Any] = {
        "benchmark": "loss_benchmark",
        "command": "python bench/loss_benchmark.py " + " ".join(shlex.quote(a) for a in argv),
        "cohort": first.config.to_dict()["data"],
        "model": first.config.to_dict()["model"],
        "budget": {"trials": args.trials, "epochs": args.epochs, "seeds": args.seeds,
                   "objective": first.study.objective, "searcher": first.study.searcher,
                   "max_concurrent_trials": first.study.max_concurrent_trials,
                   "cpus_per_trial": first.study.resources.cpus_per_worker, "overrides": overrides},
        "reference": args.reference, "machine": machine(), "losses": {}, "comparisons": {},
        "missing": list(losses), "wall_s": None,
    }
    try:
        for loss in losses:
            t0 = time.perf_counter()
            print(f"[bench] {loss}: search ({args.trials} trials × {args.epochs} epochs)", flush=True)
            study_dir = run_study(spaces[loss], overrides, name=f"{prefix}-{loss}", storage=storage)
            t1 = time.perf_counter()
            print(f"[bench] {loss}: best configuration × {args.seeds} seeds", flush=True)
            run_final(study_dir, top_k=1, seeds=args.seeds)
            t2 = time.perf_counter()
            report["losses"][loss] = loss_figures(loss, Path(study_dir), t1 - t0, t2 - t1)
            report["missing"].remove(loss)
            report["comparisons"] = compare(report["losses"], args.reference)
            report["wall_s"] = round(time.perf_counter() - start, 1)
            report["machine"]["load_avg_1min_end"] = os.getloadavg()[0]
            write(report, args.out, table)
            print(f"[bench] {loss}: done in {t2 - t0:.0f} s; {args.out} updated", flush=True)
    finally:
        if info.started_here:
            ray.shutdown()
    return report


def combine(paths: Sequence[Path], reference: str, argv: Sequence[str]) -> dict[str, Any]:
    """One report from several (see the module docstring); ``DataError`` naming the file at fault."""
    parts = []
    for path in paths:
        try:
            parts.append((path, json.loads(Path(path).read_text())))
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable benchmark JSON ({exc}): expected a file written by "
                            "bench/loss_benchmark.py") from None
    first_path, first = parts[0]
    same = ("cohort", "model")
    budget_keys = ("trials", "epochs", "seeds", "objective", "searcher", "overrides")
    merged = {**first, "losses": {}, "parts": [], "command": "python bench/loss_benchmark.py "
              + " ".join(shlex.quote(a) for a in argv)}
    def comparable(report: dict[str, Any], key: str) -> Any:
        value = report.get(key)
        if key == "model" and isinstance(value, dict):  # the head (and its feature) follow the loss
            value = {k: v for k, v in value.items() if k not in ("head", "feature")}
        return value

    for path, part in parts:
        for key in same:
            if comparable(part, key) != comparable(first, key):
                raise DataError(f"{path}: its {key} differs from {first_path}'s: expected runs on one cohort and model")
        for key in budget_keys:
            if part["budget"].get(key) != first["budget"].get(key):
                raise DataError(f"{path}: budget.{key} = {part['budget'].get(key)!r}, {first_path} has "
                                f"{first['budget'].get(key)!r}: expected the same budget for every loss")
        overlap = set(part["losses"]) & set(merged["losses"])
        if overlap:
            raise DataError(f"{path}: loss {sorted(overlap)[0]!r} is in two of the files: expected disjoint losses")
        merged["losses"].update(part["losses"])
        merged["parts"].append({"file": str(path), "command": part["command"], "wall_s": part["wall_s"],
                                "losses": list(part["losses"]), "machine": part["machine"]})
    merged["missing"] = sorted({m for _, p in parts for m in p.get("missing", [])} - set(merged["losses"]))
    merged["reference"] = reference
    merged["comparisons"] = compare(merged["losses"], reference)
    merged["wall_s"] = None  # the parts may have run side by side or one after the other: see "parts"
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        if args.combine:
            report = combine(args.combine, args.reference, argv)
            write(report, args.out, args.table or args.out.with_suffix(".md"))
            print(markdown(report), flush=True)
            return 0
        report = run(args, argv)
    except BrainageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = [d["loss"] for d in report["losses"].values() if d["n_seeds"] < args.seeds]
    print(markdown(report), flush=True)
    print(f"[bench] {args.out} and {args.table or args.out.with_suffix('.md')} written in {report['wall_s']} s",
          flush=True)
    if failed:
        print(f"error: seeds failed for {', '.join(failed)}: see their study folders", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
