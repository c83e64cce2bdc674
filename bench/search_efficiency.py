"""Does the search pay? The project's searchers replayed on a table of trained configurations.

``python bench/search_efficiency.py [--table bench/results/search_table/expw_fast.parquet] [--reps 30]
[--budget-factor 1.0] [--concurrency 1] [--searchers random,grid_listed,...] [--tune-check 12]``

The table (``bench/search_table.py``) holds every evaluation of every configuration of a grid. Each
replay runs one searcher over that grid's discrete space with a stand-in trainable that reads the table
instead of training (:func:`table_trial`: the real trial's reports, row for row), for a compute budget
counted in trial-epochs (default: the whole table, configurations x epochs, what the full grid costs).

What is shared with the studies (``study/run.py``) and what is not:

- shared: the search space is parsed by :func:`study.space.parse_search_space` from the table's own
  space file (only its ``study`` block changed: searcher, seed, ASHA, objectives); the searcher is
  :func:`study.searcher.build_searcher` (the project's ``StudyOptunaSearch`` with its Optuna samplers
  seeded by ``study.seed``, PRUNED trials with their intermediate values), the scheduler
  :func:`study.searcher.build_scheduler` (``RecordingASHA`` on ``epoch`` with ``max_t`` = epochs);
  trial configurations map to dotted values by ``SearchSpace.overrides``; the selection is
  :func:`study.final.select_top` (last evaluation of each completed trial, best ``val_lc``);
- not shared: the Tune controller and trial actors. :func:`replay` drives the searcher and the scheduler
  in this process, calling them in the order Tune's controller does for each result (scheduler's
  ``on_trial_result``; the searcher's ``on_trial_result`` unless the decision is STOP; at the end of a
  trial the scheduler's and then the searcher's ``on_trial_complete``), with ``concurrency`` virtual
  workers whose clocks advance one unit per trial-epoch; Optuna's storage is in memory instead of
  sqlite. ``--tune-check K`` runs the same replay through a real ``ray.tune.Tuner`` (a function
  trainable reading the table, ``max_concurrent_trials = 1``) for K trials and records whether the
  trials it ran (configurations and epochs) are the in-process replay's, and Tune's seconds per trial.
- the grid in the order a user would list it (``grid_listed``: ``itertools.product`` of the search
  block in file order) is a plain list, not Optuna's ``GridSampler``, which shuffles the grid by seed
  (``grid``, the project's grid searcher, is replayed as well).

Writes ``docs/measurements/search_efficiency.json`` (summary per searcher, median and 25-75 % curves of
the best ``val_lc`` against compute, machine, command) and ``docs/measurements/search_efficiency.png``
(the curves), plus every replay's trials in ``bench/results/search_efficiency_replays.json``.

Long (over 400 lines) for a reason: it is one experiment read with its document
(docs/search-efficiency.md): the replay trainable, the searchers' settings, the ASHA replay and the
summary statistics only make sense together, and none of it is used by the studies.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import heapq
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_TABLE = ROOT / "bench" / "results" / "search_table" / "expw_fast.parquet"
OUT_JSON = ROOT / "docs" / "measurements" / "search_efficiency.json"
OUT_PNG = ROOT / "docs" / "measurements" / "search_efficiency.png"
OUT_REPLAYS = ROOT / "bench" / "results" / "search_efficiency_replays.json"

OBJECTIVE = "val_lc"
#: the ASHA settings replayed with "+asha" searchers unless --asha says otherwise: the first rung at the
#: first evaluation, the usual reduction factor 3, one bracket
DEFAULT_ASHA = {"grace_period": None, "reduction_factor": 3, "brackets": 1}

#: searcher name -> changes to the table space's ``study`` block
SEARCHERS: dict[str, dict[str, Any]] = {
    "random": {"searcher": "random", "asha": None},
    "grid_listed": {"searcher": "grid", "asha": None},  # driven as a list in file order, see ListedGrid
    "grid": {"searcher": "grid", "asha": None},
    "tpe": {"searcher": "tpe", "asha": None},
    "tpe_asha": {"searcher": "tpe", "asha": "default"},
    "random_asha": {"searcher": "random", "asha": "default"},
    "nsga2": {"searcher": "nsga2", "asha": None, "objectives": ["val_mae_ext", "val_bacc"], "modes": ["min", "min"],
              "prune_on": OBJECTIVE},
    # NSGA-II with generations of 8 (Optuna's default population of 50 exceeds the budget of a 48-trial table)
    "nsga2_pop8": {"searcher": "nsga2", "asha": None, "objectives": ["val_mae_ext", "val_bacc"],
                   "modes": ["min", "min"], "prune_on": OBJECTIVE, "population_size": 8},
    # ASHA variants, for the choice of the shipped defaults: grace in evaluations, reduction factor
    "tpe_asha_rf2": {"searcher": "tpe", "asha": {"grace_evals": 1, "reduction_factor": 2}},
    "tpe_asha_grace2": {"searcher": "tpe", "asha": {"grace_evals": 2, "reduction_factor": 3}},
}


# --------------------------------------------------------------------------------------------------
# The table and its stand-in trainable
# --------------------------------------------------------------------------------------------------


class Table:
    """A table written by ``bench/search_table.py``: ``frame`` (one row per configuration and evaluation
    epoch), ``meta`` (its JSON), ``raw_space`` (the space file's dict) and lookups by dotted values."""

    def __init__(self, frame: Any, meta: Mapping[str, Any], raw_space: Mapping[str, Any], source: str = "table"):
        from brainage_core.errors import DataError

        self.frame = frame
        self.meta = dict(meta)
        self.raw_space = copy.deepcopy(dict(raw_space))
        self.source = source
        self.keys = list(raw_space["search"])
        self.param_cols = [f"param.{k}" for k in self.keys]
        for col in ("config_id", "epoch", OBJECTIVE, *self.param_cols):
            if col not in frame.columns:
                raise DataError(f"{source}: no column {col!r}: expected a table written by bench/search_table.py")
        self._rows: dict[int, list[dict[str, Any]]] = {}
        self._by_values: dict[tuple, int] = {}
        for cid, g in frame.sort_values(["config_id", "epoch"]).groupby("config_id", sort=True):
            records = [{k: _plain(v) for k, v in r.items()} for r in g.to_dict("records")]
            self._rows[int(cid)] = records
            self._by_values[tuple(records[0][c] for c in self.param_cols)] = int(cid)
        self.eval_epochs = sorted(int(e) for e in frame["epoch"].unique())
        self.full_search = copy.deepcopy(self.raw_space["search"])
        self.dropped = self._restrict_to_complete_subgrid()
        self.epochs = int(self.raw_space["training"]["epochs"])
        if self.eval_epochs[-1] != self.epochs:
            raise DataError(f"{source}: last evaluation at epoch {self.eval_epochs[-1]}, training.epochs = "
                            f"{self.epochs}: expected every configuration evaluated at its last epoch")

    def _restrict_to_complete_subgrid(self) -> dict[str, list[Any]]:
        """A partial table (configurations missing): drop choice values from the search block, greedily, until
        every remaining combination is in the table, so that the replays search a grid the table covers.
        Returns the dropped values per key (empty for a complete table)."""
        search = self.raw_space["search"]
        values = {k: list(search[k]["choice"]) for k in self.keys}
        dropped: dict[str, list[Any]] = {}

        def missing(vals: dict[str, list[Any]]) -> int:
            return sum(tuple(_plain(x) for x in combo) not in self._by_values for combo in product(*vals.values()))

        while missing(values):
            best = None
            for k, vs in values.items():
                if len(vs) < 2:
                    continue
                for v in vs:
                    trial = {**values, k: [x for x in vs if x != v]}
                    n = math.prod(len(x) for x in trial.values())
                    key = (missing(trial), -n)
                    if best is None or key < best[0]:
                        best = (key, k, v)
            if best is None:
                from brainage_core.errors import DataError

                raise DataError(f"{self.source}: no complete sub-grid: expected at least one configuration")
            _, k, v = best
            values[k] = [x for x in values[k] if x != v]
            dropped.setdefault(k, []).append(v)
        for k in self.keys:
            search[k] = {"choice": values[k]}
        return dropped

    @property
    def searched_configs(self) -> list[int]:
        """The configurations of the (possibly restricted) search block."""
        vals = [self.raw_space["search"][k]["choice"] for k in self.keys]
        return sorted(self._by_values[tuple(_plain(x) for x in combo)] for combo in product(*vals))

    @classmethod
    def load(cls, path: str | Path) -> Table:
        """Read ``<name>.parquet`` and ``<name>.json`` (the space is read from the JSON's ``space_yaml``)."""
        import pandas as pd
        import yaml

        from brainage_core.errors import DataError

        path = Path(path)
        meta_path = path.with_suffix(".json")
        if not path.exists() or not meta_path.exists():
            raise DataError(f"{path}: table or its {meta_path.name} not found: expected the output of "
                            f"bench/search_table.py")
        meta = json.loads(meta_path.read_text())
        return cls(pd.read_parquet(path), meta, yaml.safe_load(meta["space_yaml"]), source=str(path))

    @property
    def config_ids(self) -> list[int]:
        """The configurations the replays search (all of a complete table)."""
        return self.searched_configs

    def config_id(self, values: Mapping[str, Any]) -> int:
        """The configuration of dotted ``values`` (as ``SearchSpace.overrides`` gives them)."""
        from brainage_core.errors import DataError

        key = tuple(_plain(values[k]) for k in self.keys)
        if key not in self._by_values:
            raise DataError(f"{self.source}: no configuration {dict(zip(self.keys, key))} in the table "
                            f"({len(self._by_values)} configurations): expected a point of its grid")
        return self._by_values[key]

    def rows(self, config_id: int) -> list[dict[str, Any]]:
        """Copies of the table rows of one configuration, by epoch."""
        return [dict(r) for r in self._rows[config_id]]

    def final(self, config_id: int) -> dict[str, Any]:
        return dict(self._rows[config_id][-1])

    def best(self, metric: str = OBJECTIVE) -> tuple[int, float]:
        """(configuration, value) with the lowest ``metric`` at the last epoch."""
        finals = {cid: self._rows[cid][-1][metric] for cid in self.config_ids}
        cid = min(finals, key=lambda c: finals[c])
        return cid, float(finals[cid])

    def space(self, study: Mapping[str, Any], *, concurrency: int = 1) -> Any:
        """The table's search space with its ``study`` block changed by ``study`` (parsed by the study's own
        parser); ``asha: "default"`` means :data:`DEFAULT_ASHA` with the grace period at the first
        evaluation, ``{grace_evals: n, reduction_factor: r}`` the grace period at the n-th evaluation."""
        from study.space import parse_search_space

        raw = copy.deepcopy(self.raw_space)
        block = dict(raw.get("study") or {})
        changes = dict(study)
        asha = changes.get("asha")
        if asha == "default":
            changes["asha"] = {**DEFAULT_ASHA, "grace_period": self.eval_epochs[0]}
        elif isinstance(asha, Mapping) and "grace_evals" in asha:
            changes["asha"] = {**DEFAULT_ASHA, "reduction_factor": asha.get("reduction_factor", 3),
                               "grace_period": self.eval_epochs[int(asha["grace_evals"]) - 1]}
        if "objectives" in changes:
            block.pop("objective", None)
            block.pop("mode", None)
        block.update(changes)
        block["max_concurrent_trials"] = concurrency
        if block.get("searcher") == "grid":
            block.pop("num_samples", None)
        else:
            block["num_samples"] = 1_000_000  # the compute budget ends a replay, not a trial count
        raw["study"] = block
        return parse_search_space(raw, source=f"{self.source} (replay space)")


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def table_trial(sampled: Mapping[str, Any], *, table: Table, space: Any) -> Iterator[dict[str, Any]]:
    """The stand-in trainable: the reports the real trial of ``sampled`` (Optuna's parameters) made, one
    per evaluation epoch, read from the table (every metric, ``epoch``, ``compute_s``...), plus
    ``config_id``."""
    yield from table.rows(table.config_id(space.overrides(sampled)))


def tune_table_trainable(config: dict[str, Any], table: Table, space: Any) -> None:
    """The stand-in as a Ray Tune function trainable (``--tune-check``): ``tune.report`` each table row."""
    from ray import tune

    started_s = time.time()  # orders the trials as Tune started them (its trial ids are random)
    for row in table_trial(config, table=table, space=space):
        metrics = {k: v for k, v in row.items() if isinstance(v, int | float | str | bool) and k != "trial_id"}
        tune.report({**metrics, "started_s": started_s})


# --------------------------------------------------------------------------------------------------
# The replay
# --------------------------------------------------------------------------------------------------


class ListedGrid:
    """The grid in the order a user would list it (file order, the last key fastest), as a Tune-style
    searcher: ``suggest`` returns Optuna-named parameters, None once the grid is exhausted."""

    def __init__(self, space: Any):
        grid = space.grid()
        self.points = [space.sampled_from_values(space.overrides(dict(zip(grid, v)))) for v in product(*grid.values())]
        self.next = 0

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.next >= len(self.points):
            return None
        self.next += 1
        return dict(self.points[self.next - 1])

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass


@dataclass
class _Trial:
    trial_id: str
    config: dict[str, Any]
    config_id: int
    start: int  # virtual time (trial-epochs of one worker) at which it started
    reports: Iterator[dict[str, Any]]
    order: int = 0
    last: dict[str, Any] | None = None
    status: str = "running"
    epochs: int = 0


@dataclass
class Replay:
    """One replay: the searcher, seed, budget and every trial it ran (start and end in consumed compute,
    trial-epochs), with ``completions`` = [(compute consumed when the trial completed, its final row)]."""

    searcher: str
    seed: int
    budget: int
    concurrency: int
    trials: list[dict[str, Any]] = field(default_factory=list)
    completions: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    consumed: int = 0
    wall_s: float = 0.0

    def best_curve(self, grid: list[int]) -> list[float]:
        """Best (lowest) final ``val_lc`` among trials completed by each compute in ``grid`` (NaN before any)."""
        out, best, i = [], math.inf, 0
        done = sorted(self.completions, key=lambda c: c[0])
        for c in grid:
            while i < len(done) and done[i][0] <= c:
                v = done[i][1].get(OBJECTIVE)
                if v is not None and v < best:
                    best = v
                i += 1
            out.append(best if best < math.inf else math.nan)
        return out

    def compute_to_reach(self, target: float) -> float:
        """Compute (trial-epochs) at which a completed trial first has ``val_lc <= target``; inf if never."""
        for c, row in sorted(self.completions, key=lambda c: c[0]):
            v = row.get(OBJECTIVE)
            if v is not None and v <= target:
                return float(c)
        return math.inf

    def selection(self) -> dict[str, Any] | None:
        """What the study would select (``study.final.select_top``: last evaluation of each completed trial,
        best ``val_lc``), as a row of the table, or None when no trial completed."""
        import pandas as pd

        from study.final import select_top

        if not self.completions:
            return None
        rows = [{**row, "trial_id": f"t{i}", "status": "completed"} for i, (_, row) in enumerate(self.completions)]
        top = select_top(pd.DataFrame(rows), OBJECTIVE, "min", 1)
        return {k: _plain(v) for k, v in top.iloc[0].to_dict().items()}


def make_searcher(name: str, space: Any) -> Any:
    """The searcher of a replay: the project's (``study.searcher.build_searcher``, Optuna in memory), or
    :class:`ListedGrid` for ``grid_listed``."""
    if name == "grid_listed":
        return ListedGrid(space)
    import optuna

    from study.searcher import build_searcher

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return build_searcher(space, None, f"replay-{name}-{space.study.seed}", storage=optuna.storages.InMemoryStorage())


def replay(table: Table, name: str, seed: int, *, budget: int, concurrency: int = 1,
           study_changes: Mapping[str, Any] | None = None) -> Replay:
    """Replay searcher ``name`` (a key of :data:`SEARCHERS`, or any name with ``study_changes``) with
    ``study.seed = seed`` until ``budget`` trial-epochs are consumed (or the searcher has nothing left).

    ``concurrency`` virtual workers each run one trial at a time; a trial's report at epoch e arrives at
    its start time + e; events are handled in time order (ties: the trial started first), and a worker
    freed by a finished or stopped trial starts the next suggestion at once. The budget is checked when
    a trial is started (no trial starts once ``budget`` is consumed) and results after the budget are
    not counted, so every searcher is judged on the same compute."""
    from ray.tune.schedulers import TrialScheduler

    from study.searcher import EARLY_STOPPED, build_scheduler

    changes = dict(SEARCHERS[name] if study_changes is None else study_changes)
    changes["seed"] = seed
    space = table.space(changes, concurrency=concurrency)
    searcher = make_searcher(name, space)
    scheduler = build_scheduler(space)
    np.random.seed(seed)  # ASHA draws its bracket from numpy's global generator (one bracket: no effect)
    EARLY_STOPPED.clear()
    rep = Replay(name, seed, budget, concurrency)
    t0 = time.perf_counter()
    events: list[tuple[int, int, _Trial]] = []  # (arrival time, start order, trial)
    trials: list[_Trial] = []
    exhausted = False

    def consumed_at(now: int) -> int:
        # a running trial has computed since it started; a finished one for the epochs it ran
        return sum(now - t.start if t.status == "running" else t.epochs for t in trials)

    def start(now: int) -> bool:
        nonlocal exhausted
        if exhausted or consumed_at(now) >= budget:
            return False
        trial_id = f"{name}_{seed}_{len(trials):05d}"
        config = searcher.suggest(trial_id)
        if config is None:
            exhausted = True
            return False
        trial = _Trial(trial_id, config, table.config_id(space.overrides(config)), now,
                       table_trial(config, table=table, space=space), order=len(trials))
        scheduler.on_trial_add(None, trial)
        trials.append(trial)
        _schedule(trial)
        return True

    def _schedule(trial: _Trial) -> None:
        row = next(trial.reports, None)
        if row is None:  # cannot happen: the last row ends the trial below
            raise AssertionError(trial.trial_id)
        trial.last = row
        heapq.heappush(events, (trial.start + int(row["epoch"]), trial.order, trial))

    def finish(trial: _Trial, now: int, status: str) -> None:
        trial.status = status
        trial.epochs = int(trial.last["epoch"])
        result = dict(trial.last)
        scheduler.on_trial_complete(None, trial, result)
        searcher.on_trial_complete(trial.trial_id, result=result)
        spent = consumed_at(now)
        if status == "completed" and spent <= budget:
            rep.completions.append((spent, dict(trial.last)))

    now = 0
    for _ in range(concurrency):
        if not start(now):
            break
    while events:
        now, _, trial = heapq.heappop(events)
        if consumed_at(now) > budget:
            break  # the budget ran out while this evaluation was computed: it does not count
        result = dict(trial.last)
        trial.epochs = int(result["epoch"])
        decision = scheduler.on_trial_result(None, trial, result)
        last = trial.epochs >= table.epochs
        if decision != TrialScheduler.STOP:
            searcher.on_trial_result(trial.trial_id, result)
        if decision == TrialScheduler.STOP or last:
            finish(trial, now, "pruned" if trial.trial_id in EARLY_STOPPED else "completed")
            start(now)
        else:
            _schedule(trial)
    rep.consumed = min(budget, consumed_at(now))
    rep.trials = [{"trial_id": t.trial_id, "config_id": t.config_id, "start": t.start,
                   "epochs": t.epochs if t.status != "running" else None, "status": t.status} for t in trials]
    rep.wall_s = time.perf_counter() - t0
    return rep


# --------------------------------------------------------------------------------------------------
# Ray Tune check: the same replay through a real Tuner
# --------------------------------------------------------------------------------------------------


def tune_check(table: Table, name: str, seed: int, n_trials: int) -> dict[str, Any]:
    """Run ``n_trials`` trials of searcher ``name`` through ``ray.tune.Tuner`` (the project's searcher with
    a sqlite Optuna storage, its scheduler, the table trainable, one trial at a time) and compare the
    trials it ran (configuration, epochs) with :func:`replay`'s first ``n_trials``."""
    import ray
    from ray import tune

    from study.searcher import EARLY_STOPPED, build_scheduler, build_searcher

    changes = {**SEARCHERS[name], "seed": seed}
    space = table.space(changes, concurrency=1)
    space.study = dataclasses.replace(space.study, num_samples=n_trials)
    np.random.seed(seed)
    EARLY_STOPPED.clear()
    with tempfile.TemporaryDirectory(prefix="search_eff_tune_") as tmp:
        ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            t0 = time.perf_counter()
            tuner = tune.Tuner(
                tune.with_resources(tune.with_parameters(tune_table_trainable, table=table, space=space), {"cpu": 1}),
                tune_config=tune.TuneConfig(search_alg=build_searcher(space, tmp, f"tune-check-{name}"),
                                            scheduler=build_scheduler(space), num_samples=n_trials,
                                            max_concurrent_trials=1, reuse_actors=True),
                run_config=tune.RunConfig(name="tune", storage_path=tmp, verbose=0),
            )
            grid = tuner.fit()
            wall = time.perf_counter() - t0
        finally:
            ray.shutdown()
        ran = []
        for r in grid:
            df = r.metrics_dataframe
            ran.append((int(df["config_id"].iloc[0]), int(df["epoch"].max()), float(df["started_s"].iloc[0])))
    # one trial at a time: the order Tune started them is the order the searcher suggested them
    ran.sort(key=lambda x: x[2])
    tune_seq = [(c, e) for c, e, _ in ran]
    # n_trials trials cost at most n_trials x epochs: enough for the first n_trials (an unbounded budget
    # would replay a repeating searcher such as TPE forever)
    rep = replay(table, name, seed, budget=n_trials * table.epochs, concurrency=1)
    mine = [(t["config_id"], t["epochs"]) for t in rep.trials[:n_trials]]
    return {"searcher": name, "seed": seed, "trials": n_trials, "tune_wall_s": wall,
            "tune_s_per_trial": wall / n_trials, "in_process_s_per_trial": rep.wall_s / max(1, len(rep.trials)),
            "same_trials": tune_seq == mine, "tune_sequence": tune_seq, "in_process_sequence": mine}


# --------------------------------------------------------------------------------------------------
# Summary, figure, main
# --------------------------------------------------------------------------------------------------


def _quantiles(values: list[float]) -> dict[str, float | None]:
    """Median and quartiles; inf ("not reached") sorts last and a quantile that touches it is None."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return {"median": None, "q25": None, "q75": None}
    arr = np.where(np.isinf(arr), _NOT_REACHED, arr)
    q = [float(x) if x < _NOT_REACHED / 10 else math.inf for x in np.quantile(arr, [0.25, 0.5, 0.75])]
    return {"median": _num(q[1]), "q25": _num(q[0]), "q75": _num(q[2])}


_NOT_REACHED = 1e300


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def summarise(table: Table, replays: dict[str, list[Replay]], budget: int) -> dict[str, Any]:
    """Per searcher: final best val_lc, compute to within 2 % of the table's best and to random's median
    final best, the selection's test Lc, trial counts; the curves on a common compute grid."""
    best_id, best = table.best()
    within = best * 1.02
    step = table.eval_epochs[0]
    grid = list(range(0, budget + 1, step))
    random_final = [r.best_curve([budget])[0] for r in replays.get("random", [])]
    random_target = float(np.nanmedian(random_final)) if random_final else None
    finals = {cid: table.final(cid) for cid in table.config_ids}
    val = np.array([finals[c][OBJECTIVE] for c in table.config_ids])
    test = np.array([finals[c].get("test_lc", math.nan) for c in table.config_ids])
    from scipy.stats import spearmanr

    out: dict[str, Any] = {
        "table": {"configs": len(table.config_ids), "configs_in_table": len(table._rows),
                  "values_left_out_of_the_replays": table.dropped, "full_grid": table.full_search,
                  "epochs": table.epochs, "eval_epochs": table.eval_epochs,
                  "best_val_lc": best, "best_config_id": best_id, "best_config_test_lc": finals[best_id].get("test_lc"),
                  "within_2pct_target": within, "configs_within_2pct": int((val <= within).sum()),
                  "best_test_lc": float(np.nanmin(test)), "median_val_lc": float(np.median(val)),
                  "spearman_val_test_lc": float(spearmanr(val, test, nan_policy="omit").statistic),
                  "random_median_final_best": random_target},
        "budget_trial_epochs": budget, "curve_compute": grid, "searchers": {},
    }
    random_to_target: float | None = None
    for name, reps in replays.items():
        curves = np.array([r.best_curve(grid) for r in reps])
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                med, q25, q75 = (np.nanquantile(curves, q, axis=0) for q in (0.5, 0.25, 0.75))
        to2 = [r.compute_to_reach(within) for r in reps]
        to_random = [r.compute_to_reach(random_target) for r in reps] if random_target is not None else []
        sel = [r.selection() for r in reps]
        entry = {
            "reps": len(reps),
            "final_best_val_lc": _quantiles([r.best_curve([budget])[0] for r in reps]),
            "compute_to_within_2pct": _quantiles(to2),
            "reached_within_2pct": float(np.mean(np.isfinite(to2))),
            "compute_to_random_final_best": _quantiles(to_random),
            "reached_random_final_best": float(np.mean(np.isfinite(to_random))) if to_random else None,
            "selected_test_lc": _quantiles([s["test_lc"] for s in sel if s and s.get("test_lc") is not None]),
            "selected_is_table_best": float(np.mean([bool(s) and s["config_id"] == best_id for s in sel])),
            "trials_started": _quantiles([len(r.trials) for r in reps]),
            "trials_completed": _quantiles([len(r.completions) for r in reps]),
            "trials_pruned": _quantiles([sum(t["status"] == "pruned" for t in r.trials) for r in reps]),
            "distinct_configs_tried": _quantiles([len({t["config_id"] for t in r.trials}) for r in reps]),
            "replay_wall_s": _quantiles([r.wall_s for r in reps]),
            "curve": {"median": [_num(x) for x in med], "q25": [_num(x) for x in q25], "q75": [_num(x) for x in q75]},
        }
        # the Goal's measure, on median curves: the compute at which this searcher's median best first reaches
        # random's median final best (random itself: where its median curve first reaches its final value)
        hit = [c for c, v in zip(grid, med) if random_target is not None and np.isfinite(v) and v <= random_target]
        entry["median_curve_compute_to_random_final_best"] = float(hit[0]) if hit else None
        out["searchers"][name] = entry
        if name == "random":
            random_to_target = entry["median_curve_compute_to_random_final_best"]
    for entry in out["searchers"].values():
        m = entry["median_curve_compute_to_random_final_best"]
        entry["compute_vs_random_to_random_final_best"] = (m / random_to_target if m is not None and random_to_target
                                                           else None)
    return out


def figure(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [2.2, 1]})
    x = np.array(summary["curve_compute"])
    tb = summary["table"]
    for name, e in summary["searchers"].items():
        med = np.array([np.nan if v is None else v for v in e["curve"]["median"]])
        lo = np.array([np.nan if v is None else v for v in e["curve"]["q25"]])
        hi = np.array([np.nan if v is None else v for v in e["curve"]["q75"]])
        (line,) = ax.plot(x, med, label=name, lw=1.6, drawstyle="steps-post")
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, lw=0, step="post")
    ax.axhline(tb["best_val_lc"], color="k", lw=0.8, ls="--", label="table best")
    ax.axhline(tb["within_2pct_target"], color="k", lw=0.8, ls=":", label="within 2 %")
    ax.set_xlabel("compute (trial-epochs)")
    ax.set_ylabel("best val_lc found (completed trials; lower is better)")
    ax.set_title(f"{tb['configs']} configurations x {tb['epochs']} epochs; median and 25-75 % over "
                 f"{next(iter(summary['searchers'].values()))['reps']} seeds")
    ax.legend(fontsize=8, ncol=2)
    names = list(summary["searchers"])
    sel = [summary["searchers"][n]["selected_test_lc"] for n in names]
    bx.errorbar(range(len(names)), [s["median"] for s in sel],
                yerr=[[s["median"] - s["q25"] for s in sel], [s["q75"] - s["median"] for s in sel]], fmt="o", capsize=3)
    bx.axhline(tb["best_config_test_lc"], color="k", lw=0.8, ls="--", label="test Lc of the val-best config")
    bx.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    bx.set_ylabel("test Lc of the selection (median, 25-75 %)")
    bx.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


_JOB_TABLE: Table | None = None


def _replay_job(name: str, seed: int, budget: int, concurrency: int) -> Replay:
    return replay(_JOB_TABLE, name, seed, budget=budget, concurrency=concurrency)


def run_replays(table: Table, names: list[str], reps: int, budget: int, concurrency: int,
                jobs: int = 1) -> dict[str, list[Replay]]:
    """Every searcher's replays with seeds 0..reps-1, in ``jobs`` forked processes (same results as one)."""
    global _JOB_TABLE
    tasks = [(n, seed, budget, concurrency) for n in names for seed in range(reps)]
    t0 = time.time()
    if jobs > 1:
        import multiprocessing

        _JOB_TABLE = table
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            done = pool.starmap(_replay_job, tasks, chunksize=1)
    else:
        done = [replay(table, n, seed, budget=b, concurrency=c) for n, seed, b, c in tasks]
    out: dict[str, list[Replay]] = {n: [] for n in names}
    for rep in done:
        out[rep.searcher].append(rep)
    print(f"[search_efficiency] {len(tasks)} replays in {time.time() - t0:.1f} s ({jobs} process(es))", flush=True)
    return out


def machine() -> dict[str, Any]:
    import optuna
    import ray

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "optuna": optuna.__version__, "ray": ray.__version__, "load_avg_1min": os.getloadavg()[0]}


def _repo_relative(value: Any) -> Any:
    """A path inside the repository as a relative path (no machine paths in the committed JSON)."""
    if isinstance(value, str) and value.startswith(str(ROOT) + os.sep):
        return os.path.relpath(value, ROOT)
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/search_efficiency.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--table", type=Path, default=DEFAULT_TABLE)
    p.add_argument("--reps", type=int, default=30, help="repetitions (seeds 0..reps-1) per searcher")
    p.add_argument("--budget-factor", type=float, default=1.0,
                   help="budget in units of the whole table (configurations x epochs trial-epochs)")
    p.add_argument("--concurrency", type=int, default=1, help="virtual workers (study.max_concurrent_trials)")
    p.add_argument("--searchers", default=",".join(SEARCHERS), help=f"comma-separated, of {', '.join(SEARCHERS)}")
    p.add_argument("--tune-check", type=int, default=0, metavar="K",
                   help="also run K trials of tpe_asha through a real ray.tune.Tuner and compare")
    p.add_argument("--jobs", type=int, default=1, help="replays run in this many processes (each replay is "
                                                       "sequential and seeded: the results do not depend on it)")
    p.add_argument("--out", type=Path, default=OUT_JSON, help="summary JSON (the figure goes beside it)")
    args = p.parse_args(argv)

    from brainage_core.errors import BrainageError

    try:
        names = [n.strip() for n in args.searchers.split(",") if n.strip()]
        for n in names:
            if n not in SEARCHERS:
                raise BrainageError(f"--searchers: {n!r}: expected one of {', '.join(SEARCHERS)}")
        if args.reps < 1 or args.concurrency < 1 or not args.budget_factor > 0:
            raise BrainageError(f"--reps {args.reps}, --concurrency {args.concurrency}, --budget-factor "
                                f"{args.budget_factor}: expected integers >= 1 and a factor > 0")
        table = Table.load(args.table)
        budget = int(round(args.budget_factor * len(table.config_ids) * table.epochs))
        t0 = time.time()
        replays = run_replays(table, names, args.reps, budget, args.concurrency, args.jobs)
        summary = summarise(table, replays, budget)
        summary.update(command=" ".join(["python", "bench/search_efficiency.py", *sys.argv[1:]]),
                       machine=machine(), wall_s=time.time() - t0, concurrency=args.concurrency,
                       asha_default=DEFAULT_ASHA, table_meta={k: table.meta.get(k) for k in
                                                             ("table", "configs", "complete_configs",
                                                              "missing_config_ids", "protocol", "total_wall_s",
                                                              "overrides")})
        summary["table_meta"] = {k: _repo_relative(v) for k, v in summary["table_meta"].items()}
        if args.tune_check:
            summary["tune_check"] = tune_check(table, "tpe_asha", 0, args.tune_check)
            print(f"[search_efficiency] tune check: same trials = {summary['tune_check']['same_trials']}, "
                  f"{summary['tune_check']['tune_s_per_trial']:.2f} s per trial through Tune", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))
        figure(summary, args.out.with_suffix(".png"))
        OUT_REPLAYS.parent.mkdir(parents=True, exist_ok=True)
        OUT_REPLAYS.write_text(json.dumps({n: [{"seed": r.seed, "trials": r.trials, "completions": [
            (c, row["config_id"]) for c, row in r.completions]} for r in reps] for n, reps in replays.items()}))
        for name, e in summary["searchers"].items():
            print(f"{name:12s} final best {e['final_best_val_lc']['median']:.4g}  to 2%: "
                  f"{e['compute_to_within_2pct']['median']}  ({e['reached_within_2pct']:.0%} reach)  "
                  f"x random: {e['compute_vs_random_to_random_final_best']}  test Lc "
                  f"{e['selected_test_lc']['median']:.4g}", flush=True)
        print(f"[search_efficiency] {args.out}, {args.out.with_suffix('.png')}", flush=True)
    except BrainageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
