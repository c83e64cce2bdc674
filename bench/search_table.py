"""The tabular benchmark's table: every evaluation of every configuration of a grid, trained once.

``python bench/search_table.py [--space bench/search_table_expw.yaml] [--out bench/results/search_table]
[--name expw_fast] [--split-by loss.sigma | none] [--table-only] [a.b=c ...]``

Trains the grid of ``--space`` as ordinary studies (:func:`study.run.run_study`, the grid searcher, no
ASHA: every configuration trains all its epochs): by default one grid study per value of ``--split-by``
(``<out>/studies/<name>.<i>/``, that key fixed to its i-th value, run one after the other), so that a
table cut short still holds complete sub-grids; ``--split-by none`` runs one study of the whole grid
(``<out>/studies/<name>/``). Then it writes

- ``<out>/<name>.parquet``: the table, one row per (configuration, evaluation epoch): ``config_id`` (the
  configuration's index in the order a user would list the grid: ``itertools.product`` of the search
  block in file order, the last key varying fastest), ``param.<key>`` for every searched key,
  ``epoch``, every reported ``val_*`` / ``test_*`` metric, ``train_loss``, ``eval_s``, ``wall_s``
  (training + evaluation seconds since the trial started) and ``compute_s`` (= ``wall_s`` x workers),
  ``study_trial_id`` (``<study>/<trial>``), and ``protocol`` when the evaluation reports one;
- ``<out>/<name>.json``: what the table holds (the space file's text, epochs, evaluation epochs, number of
  configurations, which are missing), the machine, the commit and the wall time of each session.

Exit status: 0 when the table (with ``--part``: those studies) is complete, 3 when configurations are
missing, 2 on bad input. Resumable: run the same command again and each study continues with
``--resume`` semantics (finished configurations are not re-run; the overrides recorded by the first
session are reused). The table is
rewritten from the studies' ``results.parquet`` at the end of every session, complete or not, and by
``--table-only`` at any time (also while the studies run): a partial table says which configurations it
lacks. Keep it out of git (``bench/results/`` is ignored).

When the evaluation schema has ``evaluation.protocol`` (the fast probes), the table is evaluated with
``protocol: fast`` at every evaluation, the last one included (``final_protocol: fast``), so that all
the rows of a curve come from one probe protocol; on an older schema the exact probes are used and the
JSON says which.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import sys
import time
from itertools import product
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_SPACE = ROOT / "bench" / "search_table_expw.yaml"
DEFAULT_OUT = ROOT / "bench" / "results" / "search_table"

#: columns of results.parquet copied into the table besides params and metrics
KEPT = ("trial_id", "epoch", "train_loss", "eval_s", "epoch_s", "wall_s", "compute_s", "protocol", "leaked")


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_avg_1min": os.getloadavg()[0]}


def protocol_overrides() -> list[str]:
    """``evaluation.protocol=fast`` and ``evaluation.final_protocol=fast`` where the schema has them."""
    from brainage_core import config as cfgmod
    from brainage_core.errors import ConfigError

    out = []
    for key in ("evaluation.protocol", "evaluation.final_protocol"):
        try:
            cfgmod.field_info(key)
        except ConfigError:
            continue
        out.append(f"{key}=fast")
    return out


def listed_points(space: Any) -> list[dict[str, Any]]:
    """The grid's configurations as dotted values, in the order a user lists them (file order, last key fastest)."""
    grid = space.grid()
    return [space.overrides(dict(zip(grid, values))) for values in product(*grid.values())]


def build_table(results: Any, space: Any) -> tuple[Any, dict[str, Any]]:
    """The table (see the module docstring) from a study's results frame, and what it covers.

    Only completed trials count; a configuration trained twice (a grid re-evaluation) keeps its first
    completed trial. Raises ``BrainageError`` when a completed trial's parameters are not a grid point."""
    import pandas as pd

    from brainage_core.errors import BrainageError

    points = listed_points(space)
    keys = space.keys
    index = {tuple(p[k] for k in keys): i for i, p in enumerate(points)}
    epochs = space.config.training.epochs
    every = space.config.evaluation.eval_every
    eval_epochs = list(range(every, epochs + 1, every))
    done = results[results["status"] == "completed"]
    frames = []
    seen: set[int] = set()
    for trial_id, g in done.groupby("trial_id", sort=False):
        first = g.iloc[0]
        point = tuple(_plain(first[f"param.{k}"]) for k in keys)
        if point not in index:
            raise BrainageError(f"trial {trial_id}: parameters {dict(zip(keys, point))} are not a point of the grid of "
                                f"{space.source}: expected a study of that grid")
        cid = index[point]
        if cid in seen:
            continue
        g = g.sort_values("epoch")
        if list(g["epoch"].astype(int)) != eval_epochs:
            continue  # a completed trial must have every evaluation; otherwise it is re-run on resume
        seen.add(cid)
        metrics = [c for c in g.columns if c.startswith(("val_", "test_"))]
        part = g[[c for c in KEPT if c in g.columns] + metrics].copy().rename(columns={"trial_id": "study_trial_id"})
        part.insert(0, "config_id", cid)
        for k in reversed(keys):
            part.insert(1, f"param.{k}", [points[cid][k]] * len(part))
        frames.append(part)
    table = (pd.concat(frames, ignore_index=True).sort_values(["config_id", "epoch"]).reset_index(drop=True)
             if frames else pd.DataFrame())
    missing = [i for i in range(len(points)) if i not in seen]
    cover = {"configs": len(points), "complete_configs": len(seen), "missing_config_ids": missing,
             "epochs": epochs, "eval_epochs": eval_epochs, "params": {k: space.grid()[k] for k in keys},
             "rows": int(len(table))}
    return table, cover


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    return value


def sub_spaces(space_path: Path, split_by: str | None, folder: Path) -> list[tuple[str, Path]]:
    """The grid studies that train the table: the whole grid (``split_by`` None), or one grid study per value
    of ``split_by`` (in file order) with that key fixed, so that a table cut short still holds complete
    sub-grids. Each sub-space is written to ``folder`` (the study copies it into its folder as space.yaml)."""
    from brainage_core.errors import BrainageError

    if split_by is None:
        return [("", space_path)]
    raw = yaml.safe_load(space_path.read_text())
    spec = (raw.get("search") or {}).get(split_by)
    if not isinstance(spec, dict) or "choice" not in spec:
        raise BrainageError(f"{space_path}: --split-by {split_by}: expected a searched choice key of the grid "
                            f"({', '.join(raw.get('search') or {})})")
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, value in enumerate(spec["choice"]):
        sub = yaml.safe_load(space_path.read_text())
        sub["search"][split_by] = {"choice": [value]}
        path = folder / f"{space_path.stem}.{i}.yaml"
        text = (f"# generated by bench/search_table.py from {space_path.name}: {split_by} = {value!r}\n"
                + yaml.safe_dump(sub, sort_keys=False))
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        out.append((f".{i}", path))
    return out


def parts_value(space: Any, split_by: str, i: int) -> Any:
    """The value of ``split_by`` that sub-grid study ``i`` fixes."""
    return space.param(split_by).dist.values[i]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/search_table.py", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="dotted overrides of the space (first session only)")
    p.add_argument("--space", type=Path, default=DEFAULT_SPACE, help="grid search space (study.searcher: grid)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the studies and the table go")
    p.add_argument("--name", default="expw_fast", help="study and table name")
    p.add_argument("--split-by", default="loss.sigma",
                   help="train the grid as one grid study per value of this searched key, one after the other "
                        "(default loss.sigma; 'none': one study of the whole grid)")
    p.add_argument("--part", type=int, action="append",
                   help="train only these sub-grid studies (0-based, repeatable), e.g. to run them in parallel "
                        "from several commands; a study another command is training (its lock is held) is skipped")
    p.add_argument("--table-only", action="store_true",
                   help="only (re)write the table from the studies' results so far (e.g. while they run)")
    args = p.parse_intermixed_args(argv)

    import pandas as pd

    from brainage_core.errors import BrainageError
    from study.results import git_commit
    from study.run import run_study
    from study.space import load_search_space

    study_root = args.out / "studies"
    meta_path = args.out / f"{args.name}.json"
    table_path = args.out / f"{args.name}.parquet"
    # Ray starts its workers at nice 15: on a machine shared with other work the trials then get almost no
    # CPU; the table's trials run at the priority of everything else (the wall time is then comparable).
    os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        split_by = None if args.split_by in ("none", "") else args.split_by
        parts = sub_spaces(args.space, split_by, args.out / "spaces")
        first = study_root / f"{args.name}{parts[0][0]}" / "config.yaml"
        if first.exists():  # the overrides of the first session, so that --resume finds the same studies
            overrides = list(yaml.safe_load(first.read_text()).get("overrides") or [])
            if args.overrides and args.overrides != overrides:
                raise BrainageError(f"{first}: the study was started with overrides {overrides}, not "
                                    f"{args.overrides}: expected the same (or none), or another --name")
        else:
            overrides = [*protocol_overrides(), *args.overrides]
        space = load_search_space(args.space, overrides)
        if space.study.searcher != "grid" or space.study.asha is not None:
            raise BrainageError(f"{args.space}: study.searcher = {space.study.searcher!r}, asha = {space.study.asha}: "
                                f"the table needs the grid searcher and no ASHA (every configuration trains all "
                                f"its epochs)")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"sessions": []}
        args.out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        failure = None
        if not args.table_only:
            for i, (suffix, path) in enumerate(parts):
                if args.part is not None and i not in args.part:
                    continue
                name = f"{args.name}{suffix}"
                study_root.mkdir(parents=True, exist_ok=True)
                lock = open(study_root / f"{name}.lock", "w")  # noqa: SIM115 - held while the study trains
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    print(f"[search_table] {study_root / name}: another command is training it: skipped", flush=True)
                    lock.close()
                    continue
                resume = (study_root / name / "config.yaml").exists()
                sub = load_search_space(path, overrides)
                print(f"[search_table] {'resuming' if resume else 'starting'} {study_root / name} ({sub.grid_size()} "
                      f"configurations x {sub.config.training.epochs} epochs); overrides {overrides}", flush=True)
                try:
                    run_study(path, overrides, name=name, storage=study_root, resume=resume)
                except KeyboardInterrupt:
                    failure = "interrupted"
                    break
                finally:
                    lock.close()
        wall = time.time() - t0
        frames = []
        for suffix, _ in parts:
            results_path = study_root / f"{args.name}{suffix}" / "results.parquet"
            if results_path.exists():
                df = pd.read_parquet(results_path)
                df["trial_id"] = f"{args.name}{suffix}/" + df["trial_id"].astype(str)
                frames.append(df)
        if not frames:
            raise BrainageError(f"{study_root}: no results.parquet of {args.name}: expected at least one finished "
                                f"trial (run without --table-only first)")
        table, cover = build_table(pd.concat(frames, ignore_index=True), space)
        tmp = table_path.with_suffix(".parquet.tmp")
        table.to_parquet(tmp, index=False)
        os.replace(tmp, table_path)
        if not args.table_only:
            meta["sessions"].append({"started_utc": started, "wall_s": wall, "machine": machine(),
                                     "git_commit": git_commit(), "ended": failure or "finished"})
        meta.update(space=str(args.space), space_yaml=args.space.read_text(), overrides=overrides,
                    studies=[str(study_root / f"{args.name}{suffix}") for suffix, _ in parts], split_by=split_by,
                    table=str(table_path),
                    protocol=sorted(set(table["protocol"].dropna())) if "protocol" in table.columns else ["exact"],
                    command=" ".join(["python", "bench/search_table.py", *sys.argv[1:]]),
                    total_wall_s=sum(s["wall_s"] for s in meta["sessions"]),
                    table_written_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **cover)
        meta_path.write_text(json.dumps(meta, indent=2, default=str))
        print(f"[search_table] {cover['complete_configs']}/{cover['configs']} configurations complete; table "
              f"{table_path} ({cover['rows']} rows), {meta_path}; this session {wall:.0f} s", flush=True)
        if failure:
            return 130
        if args.part is not None and not args.table_only:  # done when the studies this command trained are
            wanted = {i for i in args.part if 0 <= i < len(parts)}
            points = listed_points(space)
            values = [parts_value(space, split_by, i) for i in wanted]
            missing = [c for c in cover["missing_config_ids"] if split_by and points[c][split_by] in values]
            return 0 if not missing else 3
        return 0 if not cover["missing_config_ids"] else 3
    except BrainageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
