"""Studies at cluster scale, simulated on one machine: GPU-slot use, scheduling latency, driver memory.

``python bench/cluster_sim.py [--gpus 8] [--nodes 1] [--gpus-per-trial 2] [--trials 20] [--epochs 8]
[--epoch-s 0.5] [--concurrency 0] [--out FILE]`` runs one study through the project's own runner
(:func:`study.run.run_study`: the real Optuna searcher and its sqlite storage, ASHA, the Train DDP trial
shells of :mod:`study.trial` with ``use_gpu`` on, the driver callback writing ``results.parquet``) on a
Ray whose GPUs are logical: one node with ``--gpus`` fake GPUs, or ``--nodes`` nodes of
``ray.cluster_utils.Cluster`` sharing them. Nothing in the runner knows it is simulated: the bench sets the
runner's test hook ``BRAINAGE_TEST_TRAIN_FN`` (:data:`study.trial.TRAIN_FN_ENV`) to
:func:`standin_train`, which every trial process / Train worker calls instead of
``brainage_core.training.train``. The stand-in builds no model and reads no data: each epoch is a sleep of
``--epoch-s`` seconds, each evaluation reports a learning curve (an exponential decay towards a floor
that depends on the sampled temperature and learning rate, with noise), so ASHA and TPE see realistic
decisions; rank 0 writes a small checkpoint folder at each evaluation, as the real loop does, and an
event line per epoch into ``$BRAINAGE_SIM_EVENTS/<trial id>.jsonl`` (start, report, end, with the
rank's wall clock).

What the JSON holds (``--out``, default ``bench/results/cluster_sim.json``):

- ``utilisation`` (fractions of the GPU-seconds, "while trials remain" = from the first trial's start to
  the last trial's start, and over the whole study): ``slots_*``, GPU slots held by RUNNING Tune trials
  (the driver's ``on_trial_start`` to ``on_trial_complete``/``on_trial_error``, x GPUs per trial: the
  issue's "GPU-seconds held by running trials", what the scheduler controls); ``held_*``, GPUs reserved
  in Ray (``ray.available_resources`` every ``--sample-s``: a DDP trial's placement group exists only
  once its Train controller has started); ``training_*``, GPUs whose trial's stand-in was running (its
  first epoch's start to its last report); ``training_timeline`` / ``held_timeline``;
- ``slot_to_running_trial_s``: from a trial's end to the next trial's start (Tune's view; matched
  first-ended to first-started, all trials hold the same GPUs), against ``trial_start_s`` (a RUNNING trial
  to its first epoch: trial set-up, Train controller and worker group start); ``scheduling_latency_s``:
  the same from a trial's last report to the next trial's first epoch (both delays together);
- ``driver_rss``: the driver's RSS against the number of trials started and finished, with the slope
  (KB per finished trial, least squares over the second half of the study);
- ``writes``: changes to ``results.parquet`` (journal appends, and the whole-table rewrites among them) and
  Optuna storage writes (count, per second, seconds per write against the table's size);
- ``wall_s`` against ``ideal_s`` (sum over trials of epochs run x ``--epoch-s`` x GPUs per trial / GPUs);
- ``asha``: how many trials stopped at each epoch and how many completed;
- ``check``: every trial has all its reported epochs as rows of ``results.parquet``, no trial left
  running or errored.

The machine's limits (``machine``): every Ray actor is a process (a trial, its Train controller, one per
worker), ~150-300 MB each; their start-up (imports of Ray and torch) runs on this machine's cores, where a
cluster spreads it over its nodes. The JSON's ``simulated`` block says what ran.

Long (over 400 lines) for a reason: it is one experiment read with its document (docs/cluster-sim.md):
the stand-in trainable (which Ray workers import from this module, through the runner's test hook), the
event timelines and the figures computed from them belong together; none of it is used by the studies.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results" / "cluster_sim.json"
SMOKE = ROOT / "search_spaces" / "smoke.yaml"

#: where the stand-in writes its event lines (one file per trial); forwarded to every trial (BRAINAGE_*)
EVENTS_ENV = "BRAINAGE_SIM_EVENTS"
#: seconds of one simulated epoch
EPOCH_S_ENV = "BRAINAGE_SIM_EPOCH_S"
#: the runner's test hook value that selects the stand-in
STANDIN = "bench.cluster_sim:standin_train"


# --------------------------------------------------------------------------------------------------
# the stand-in (runs in trial processes and Train workers: stdlib imports only)
# --------------------------------------------------------------------------------------------------


def _curve_params(config: dict[str, Any]) -> tuple[float, float, float, int]:
    """(floor, start, tau, noise seed) of a configuration's validation-MAE curve (years).

    The floor is best at temperature 0.1 and lr 1e-3 (quadratic in log10 distance), plus a per-config
    offset; tau (epochs to 1/e of the gap) varies per config, so curves cross and ASHA can be wrong."""
    import hashlib

    temperature = float((config.get("loss") or {}).get("temperature", 0.1) or 0.1)
    lr = float((config.get("optimizer") or {}).get("lr", 1e-3) or 1e-3)
    key = json.dumps([config.get("loss"), config.get("optimizer"), config.get("model")], sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).digest()
    u1, u2 = digest[0] / 255.0, digest[1] / 255.0
    floor = 2.6 + 1.2 * math.log10(temperature / 0.1) ** 2 + 0.8 * math.log10(lr / 1e-3) ** 2 + 0.6 * u1
    tau = 1.0 + 5.0 * u2
    return floor, floor + 8.0, tau, int.from_bytes(digest[2:6], "little")


def _event(out_dir: Path, kind: str, **fields: Any) -> None:
    folder = os.environ.get(EVENTS_ENV)
    if not folder:
        return
    line = json.dumps({"e": kind, "t": time.time(), **fields})
    with open(Path(folder) / f"{Path(out_dir).name}.jsonl", "a") as f:
        f.write(line + "\n")


def standin_train(config: Any, out_dir: str | Path, *, callback: Any = None, rank: int = 0, world_size: int = 1,
                  device: Any = None, resume_from: str | Path | None = None, keep_checkpoints: int = 1) -> dict:
    """``brainage_core.training.train``'s contract without a model (see the module docstring).

    ``config``: the experiment dict (``training.epochs``, ``evaluation.eval_every``, ``loss.temperature``,
    ``optimizer.lr``); every rank sleeps ``$BRAINAGE_SIM_EPOCH_S`` (default 0.5) seconds per epoch and calls
    ``callback(metrics, checkpoint_dir)`` at each evaluation (``checkpoint_dir`` on rank 0 only); resumes
    from ``resume_from`` (a folder holding ``state.json``). Returns the last metrics."""
    import random

    if hasattr(config, "to_dict"):
        config = config.to_dict()
    out_dir = Path(out_dir)
    epochs = int(config["training"]["epochs"])
    every = int((config.get("evaluation") or {}).get("eval_every", 1) or 1)
    epoch_s = float(os.environ.get(EPOCH_S_ENV, "0.5"))
    floor, start, tau, seed = _curve_params(config)
    state_path = Path(resume_from) / "state.json" if resume_from else None
    if state_path is not None and not state_path.exists():
        state_path = Path(resume_from) / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text()) if state_path is not None and state_path.exists() else {}
    done, wall0, last = int(state.get("epoch", 0)), float(state.get("wall_s", 0.0)), state.get("metrics")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        _event(out_dir, "start", epoch=done, gpus=world_size)
    if os.environ.get(EVENTS_ENV):  # which node each rank runs on (a DDP trial split over nodes)
        import ray

        # ray.get_runtime_context() would start a local Ray in a process that has none (unit tests)
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        _event(out_dir, "rank", rank=rank, node=node)
    if done >= epochs and last is not None:
        if callback is not None:
            callback(last, Path(resume_from) if rank == 0 else None)
        return last
    t0 = time.perf_counter()
    for epoch in range(done + 1, epochs + 1):
        time.sleep(epoch_s)
        if epoch % every and epoch != epochs:
            continue
        noise = random.Random(seed * 1000 + epoch).gauss(0.0, 0.15)
        val = floor + (start - floor) * math.exp(-epoch / tau) + noise
        wall = wall0 + time.perf_counter() - t0
        metrics = {"epoch": epoch, "train_loss": 4.0 * math.exp(-epoch / tau) + 1.0, "lr": 1e-3,
                   "val_mae_int": val - 0.3, "val_mae_ext": val, "test_mae_int": val - 0.25, "test_mae_ext": val + 0.1,
                   "leaked": False, "eval_s": 0.0, "epoch_s": epoch_s, "wall_s": wall}
        checkpoint_dir = None
        if rank == 0:
            checkpoint_dir = out_dir / "checkpoint"
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            (checkpoint_dir / "state.json").write_text(json.dumps({"epoch": epoch, "wall_s": wall, "metrics": metrics}))
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            _event(out_dir, "report", epoch=epoch, gpus=world_size)
        if callback is not None:
            callback(metrics, checkpoint_dir)
        last = metrics
    if rank == 0:
        _event(out_dir, "end", epoch=epochs, gpus=world_size)
    return last or {}


#: the stand-in never touches a device: its DDP process group is gloo even on (fake) GPUs
standin_train.torch_backend = "gloo"  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------
# the bench (driver side)
# --------------------------------------------------------------------------------------------------


def space_file(folder: Path, *, trials: int, epochs: int, gpus_per_trial: int, concurrency: int,
               grace: int, reduction: int, searcher: str, tune_loggers: bool = True,
               checkpoints_to_keep: int = 1) -> Path:
    """The simulated study's search-space YAML: smoke.yaml's tiny store, two searched keys, ASHA, GPU trials."""
    import yaml

    d = yaml.safe_load(SMOKE.read_text())
    d["data"]["synthetic"]["subjects"] = 24
    d["training"].update(epochs=epochs, device="auto")
    d["search"] = {"loss.temperature": {"loguniform": [0.02, 0.5]}, "optimizer.lr": {"loguniform": [1e-4, 1e-2]}}
    d["study"].update(num_samples=trials, max_concurrent_trials=concurrency, searcher=searcher,
                      asha={"grace_period": grace, "reduction_factor": reduction},
                      resources={"num_workers": gpus_per_trial, "use_gpu": True, "cpus_per_worker": 1},
                      checkpoints_to_keep=checkpoints_to_keep, max_failures=1, tune_loggers=tune_loggers)
    path = folder / "cluster_sim.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def start_simulated_ray(*, gpus: int, nodes: int, cpus: int) -> Any:
    """A local Ray with ``gpus`` logical GPUs over ``nodes`` nodes (``ray.cluster_utils.Cluster`` when
    nodes > 1); returns the Cluster (or None). The environment is set before, so every node inherits it."""
    import logging

    import ray

    if nodes <= 1:
        # address="local": a new Ray even when another one on this machine was started with `ray start`
        ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 object_store_memory=200 * 2**20, logging_level=logging.WARNING)
        return None
    from ray.cluster_utils import Cluster

    if gpus % nodes or cpus % nodes:
        raise SystemExit(f"--gpus {gpus} and CPUs {cpus} must divide by --nodes {nodes}")
    import socket

    def free_port() -> int:  # Cluster's head does not retry an occupied dashboard (or agent) port
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": cpus // nodes, "num_gpus": gpus // nodes, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port(),
        "object_store_memory": 100 * 2**20})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus // nodes, num_gpus=gpus // nodes, object_store_memory=100 * 2**20)
    ray.init(address=cluster.address, logging_level=logging.WARNING)
    cluster.wait_for_nodes()
    return cluster


class Probe:
    """Driver-side measurements: wraps (never replaces) the results writer and the Optuna storage's
    writes to time them, and samples RSS / held GPUs on a thread."""

    OPTUNA_WRITES = ("create_new_trial", "set_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
                     "set_trial_user_attr", "set_trial_system_attr")

    def __init__(self, events: Path, gpus: int, sample_s: float, *, trace_at: tuple[int, int] | None = None):
        self.events, self.gpus, self.sample_s = events, gpus, sample_s
        #: (finished trials of the first and of the second tracemalloc snapshot) with --trace-memory
        self.trace_at = trace_at
        self.snapshots: list[Any] = []
        self.samples: list[dict[str, float]] = []
        self.results_writes: list[tuple[float, int, float]] = []  # (t, rows, seconds) per change
        self.results_rewrites = 0  # whole-table rewrites among them (study.results: every COMPACT_EVERY_S)
        self.optuna_writes: list[tuple[float, str, float]] = []
        self.finished = 0
        self.delivered: dict[str, set[int]] = {}  # trial id -> epochs whose result reached the driver
        self.tune_times: dict[str, dict[str, float]] = {}  # trial id -> {"start": t, "end": t} (driver's view)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sim-probe", daemon=True)

    def install(self) -> None:
        import optuna

        from study.results import ResultsTable

        probe = self
        record, compact, set_status = ResultsTable._record, ResultsTable.compact, ResultsTable.set_status

        def timed_record(table: Any, op: dict) -> None:  # one change: a journal append or a whole rewrite
            t0 = time.perf_counter()
            record(table, op)
            probe.results_writes.append((time.time(), len(table.rows), time.perf_counter() - t0))

        def counted_compact(table: Any) -> None:
            probe.results_rewrites += 1
            compact(table)

        def counted_status(table: Any, trial_id: str, status: str) -> None:
            if status in ("completed", "pruned", "error"):
                probe.finished += 1
            set_status(table, trial_id, status)

        ResultsTable._record, ResultsTable.compact = timed_record, counted_compact
        ResultsTable.set_status = counted_status
        from ray.tune.callback import CallbackList

        for hook, kind in (("on_trial_start", "start"), ("on_trial_complete", "end"), ("on_trial_error", "end")):
            original_hook = getattr(CallbackList, hook)

            def timed_hook(self_: Any, _original: Any = original_hook, _kind: str = kind, **info: Any) -> Any:
                trial = info.get("trial")
                if trial is not None:  # the Tune trial RUNNING (start) and its end: the slot it holds
                    probe.tune_times.setdefault(trial.trial_id, {})[_kind] = time.time()
                return _original(self_, **info)

            setattr(CallbackList, hook, timed_hook)
        on_result = CallbackList.on_trial_result

        def delivered(self_: Any, **info: Any) -> Any:
            trial, result = info.get("trial"), info.get("result") or {}
            if trial is not None and "epoch" in result:  # what the driver received (ASHA may have stopped
                probe.delivered.setdefault(trial.trial_id, set()).add(int(result["epoch"]))  # the rest)
            return on_result(self_, **info)

        CallbackList.on_trial_result = delivered
        for storage_class in (optuna.storages.RDBStorage, optuna.storages.JournalStorage):
            for name in self.OPTUNA_WRITES:
                original = getattr(storage_class, name)

                def timed(self_: Any, *a: Any, _original: Any = original, _name: str = name, **k: Any) -> Any:
                    t0 = time.perf_counter()
                    try:
                        return _original(self_, *a, **k)
                    finally:
                        probe.optuna_writes.append((time.time(), _name, time.perf_counter() - t0))

                setattr(storage_class, name, timed)

    def _loop(self) -> None:
        import psutil
        import ray

        me = psutil.Process()
        while not self._stop.is_set():
            try:
                held = self.gpus - float(ray.available_resources().get("GPU", 0.0))
            except Exception:  # noqa: BLE001 - Ray shutting down at the end of the study
                held = float("nan")
            self.samples.append({"t": time.time(), "rss": me.memory_info().rss, "gpus_held": held,
                                 "started": sum(1 for _ in self.events.glob("*.jsonl")), "finished": self.finished,
                                 "cpu_s": sum(me.cpu_times()[:2])})
            due = self.trace_at is not None and len(self.snapshots) < 2
            if due and self.finished >= self.trace_at[len(self.snapshots)]:
                import tracemalloc

                self.snapshots.append((self.finished, tracemalloc.take_snapshot()))
            self._stop.wait(self.sample_s)

    def memory_growth(self, top: int = 25) -> dict[str, Any] | None:
        """The driver's Python allocations that grew between the two snapshots (--trace-memory): the
        largest ``top`` by allocation traceback, innermost frame last, in KB per finished trial."""
        if len(self.snapshots) < 2:
            return None
        (n0, first), (n1, second) = self.snapshots
        per = max(1, n1 - n0)
        sites = []
        for stat in second.compare_to(first, "traceback")[:top]:
            frames = [f"{_short(f.filename)}:{f.lineno}" for f in stat.traceback]
            sites.append({"kb_per_trial": round(stat.size_diff / 1024 / per, 2), "blocks": stat.count_diff,
                          "traceback": frames})
        total = sum(s.size_diff for s in second.compare_to(first, "filename"))
        return {"finished_trials": [n0, n1], "python_kb_per_trial": round(total / 1024 / per, 1), "sites": sites}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def load_events(folder: Path) -> dict[str, list[dict]]:
    out = {}
    for path in sorted(folder.glob("*.jsonl")):
        out[path.stem] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def analyse(events: dict[str, list[dict]], probe: Probe, *, gpus: int, epoch_s: float, t_start: float,
            t_end: float, study_dir: Path) -> dict[str, Any]:
    """The figures of the JSON (see the module docstring) from the stand-in's events and the probe."""
    import pandas as pd

    spans = []  # (trial, first epoch start, last report, gpus, epochs run)
    for trial, ev in events.items():
        starts = [e for e in ev if e["e"] == "start"]
        reports = [e for e in ev if e["e"] == "report"]
        if not starts or not reports:
            continue
        spans.append((trial, starts[0]["t"], reports[-1]["t"], int(starts[0]["gpus"]), int(reports[-1]["epoch"])))
    first_start = min(s[1] for s in spans)
    last_start = max(s[1] for s in spans)

    def busy(a: float, b: float) -> float:
        return sum(max(0.0, min(e, b) - max(s, a)) * g for _, s, e, g, _ in spans)

    remain = busy(first_start, last_start) / (gpus * (last_start - first_start)) if last_start > first_start else None

    def held_fraction(a: float, b: float) -> float | None:
        """GPUs held (placement groups and actors of running trials) integrated over [a, b], step-wise."""
        pts = [(s["t"], s["gpus_held"]) for s in probe.samples if not math.isnan(s["gpus_held"])]
        if b <= a or len(pts) < 2:
            return None
        total = 0.0
        for (t0, h0), (t1, _) in zip(pts, pts[1:]):
            total += h0 * max(0.0, min(t1, b) - max(t0, a))
        return total / (gpus * (b - a))

    slots = [(t["start"], t.get("end", t_end)) for t in probe.tune_times.values() if "start" in t]
    per_trial_gpus = max(1, spans[0][3])

    def slot_fraction(a: float, b: float) -> float | None:
        """GPU slots held by RUNNING Tune trials (start to end as the driver sees them) over [a, b]."""
        if b <= a:
            return None
        return sum(max(0.0, min(e, b) - max(s, a)) for s, e in slots) * per_trial_gpus / (gpus * (b - a))

    tune_starts = sorted(s for s, _ in slots)
    tune_ends = sorted(e for _, e in slots)
    slot_wave = gpus // per_trial_gpus
    slot_latencies = [b - a for a, b in zip(tune_ends, tune_starts[slot_wave:])]
    start_overheads = []
    for trial, t in probe.tune_times.items():
        first = [e["t"] for e in events.get(trial, []) if e["e"] == "start"]
        if "start" in t and first:
            start_overheads.append(first[0] - t["start"])
    slot_window = (tune_starts[0], tune_starts[-1]) if tune_starts else (first_start, last_start)

    nodes_per_trial = {}
    for trial, ev in events.items():
        nodes_per_trial[trial] = len({e.get("node") for e in ev if e["e"] == "rank"})
    whole = busy(t_start, t_end) / (gpus * (t_end - t_start))
    timeline = []
    for i in range(20):
        a = t_start + (t_end - t_start) * i / 20
        b = t_start + (t_end - t_start) * (i + 1) / 20
        timeline.append({"t_s": round(a - t_start, 2), "training_fraction": round(busy(a, b) / (gpus * (b - a)), 4)})
    held = [{"t_s": round(s["t"] - t_start, 2), "gpus_held": s["gpus_held"]} for s in probe.samples]
    frees = sorted(s[2] for s in spans)
    starts_sorted = sorted(s[1] for s in spans)
    per_trial = max(1, spans[0][3])
    wave = gpus // per_trial
    latencies = [b - a for a, b in zip(frees, starts_sorted[wave:])]
    ideal = sum(s[4] * epoch_s * s[3] for s in spans) / gpus

    df = pd.read_parquet(study_dir / "results.parquet")
    problems = []
    after_stop = 0  # epochs a stopped trial's stand-in still ran before its Train run was aborted
    for trial, ev in events.items():
        reported = {int(e["epoch"]) for e in ev if e["e"] == "report"}
        got = probe.delivered.get(trial, set())
        rows = set(df.loc[df["trial_id"] == trial, "epoch"].astype(int))
        after_stop += len(reported - got)
        if got != rows:
            problems.append(f"trial {trial}: the driver received epochs {sorted(got)}, results.parquet holds "
                            f"{sorted(rows)}")
        if not got:
            problems.append(f"trial {trial}: no result reached the driver")
    statuses = df.groupby("trial_id")["status"].last()
    for trial, status in statuses.items():
        if status not in ("completed", "pruned"):
            problems.append(f"trial {trial}: status {status}")
    last_epoch = df.groupby("trial_id")["epoch"].max()
    stopped = last_epoch[statuses == "pruned"].value_counts().sort_index()

    rss = [(s["started"], s["finished"], s["rss"]) for s in probe.samples]
    half = [r for r in rss if r[1] >= max(r[1] for r in rss) / 2] or rss
    slope = None
    if len({r[1] for r in half}) > 1:
        xs, ys = [r[1] for r in half], [r[2] for r in half]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs) / 1024
    wall = t_end - t_start
    rw = probe.results_writes
    ow = probe.optuna_writes
    return {
        "trials_in_events": len(events), "trials_in_results": int(df["trial_id"].nunique()), "rows": len(df),
        "utilisation": {"slots_while_trials_remain": slot_fraction(*slot_window),
                        "slots_whole_study": slot_fraction(t_start, t_end),
                        "held_while_trials_remain": held_fraction(first_start, last_start),
                        "held_whole_study": held_fraction(t_start, t_end),
                        "training_while_trials_remain": remain, "training_whole_study": whole,
                        "window_s": last_start - first_start,
                        "first_trial_start_s": first_start - t_start, "training_timeline": timeline,
                        "held_timeline": held[:: max(1, len(held) // 200)]},
        "scheduling_latency_s": _stats(latencies),
        "slot_to_running_trial_s": _stats(slot_latencies),
        "trial_start_s": _stats(start_overheads),
        "epochs_run_after_stop": after_stop,
        "trials_over_several_nodes": sum(1 for n in nodes_per_trial.values() if n > 1),
        "wall_s": wall, "ideal_s": ideal, "wall_over_ideal": wall / ideal if ideal else None,
        "driver_rss": {"start_mb": rss[0][2] / 2**20 if rss else None, "end_mb": rss[-1][2] / 2**20 if rss else None,
                       "peak_mb": max(r[2] for r in rss) / 2**20 if rss else None,
                       "kb_per_finished_trial_second_half": slope,
                       "series": [{"started": a, "finished": b, "rss_mb": round(c / 2**20, 1)}
                                  for a, b, c in rss[:: max(1, len(rss) // 200)]],
                       "driver_cpu_s": (probe.samples[-1]["cpu_s"] - probe.samples[0]["cpu_s"]) if probe.samples
                       else None},
        "writes": {"results": {"count": len(rw), "per_s": len(rw) / wall, "seconds_total": sum(w[2] for w in rw),
                               "table_rewrites": probe.results_rewrites,
                               "seconds_per_write_by_rows": _by_rows(rw)},
                   "optuna": {"count": len(ow), "per_s": len(ow) / wall, "seconds_total": sum(w[2] for w in ow),
                              "seconds_per_write": _stats([w[2] for w in ow]),
                              "by_kind": {k: sum(1 for w in ow if w[1] == k) for k in sorted({w[1] for w in ow})}}},
        "asha": {"completed": int((statuses == "completed").sum()), "pruned": int((statuses == "pruned").sum()),
                 "stopped_at_epoch": {str(int(k)): int(v) for k, v in stopped.items()}},
        "check": {"ok": not problems and int(df["trial_id"].nunique()) == len(events), "problems": problems[:20]},
    }


def _stats(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p95": None, "max": None}
    v = sorted(values)
    return {"n": len(v), "mean": sum(v) / len(v), "p50": v[len(v) // 2], "p95": v[min(len(v) - 1, int(0.95 * len(v)))],
            "max": v[-1]}


def _by_rows(writes: list[tuple[float, int, float]]) -> list[dict[str, float]]:
    if not writes:
        return []
    step = max(1, len(writes) // 10)
    out = []
    for i in range(0, len(writes), step):
        chunk = writes[i:i + step]
        out.append({"rows": chunk[-1][1], "mean_s": sum(w[2] for w in chunk) / len(chunk)})
    return out


def machine() -> dict[str, Any]:
    import psutil
    import ray

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "ray": ray.__version__,
            "load_avg_1min_before": os.getloadavg()[0]}


def ray_processes_rss_mb() -> float:
    """RSS of this process's descendants (the local Ray's GCS, raylet(s) and workers), MB."""
    import psutil

    total = 0
    for p in psutil.Process().children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def _short(filename: str) -> str:
    """A source path without the machine's prefix (site-packages/…, or relative to the repository)."""
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1]
    if filename.startswith(str(ROOT)):
        return os.path.relpath(filename, ROOT)
    return filename.rsplit("/lib/", 1)[-1]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One simulated study (see the module docstring); returns the report."""
    from study.ray_runtime import DEFAULT_ENV
    from study.trial import TRAIN_FN_ENV

    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="cluster-sim-"))
    events = tmp / "events"
    events.mkdir(parents=True, exist_ok=True)
    env = {**DEFAULT_ENV, "OMP_NUM_THREADS": "1", TRAIN_FN_ENV: STANDIN, EVENTS_ENV: str(events),
           EPOCH_S_ENV: str(args.epoch_s), "BRAINAGE_CACHE": str(args.cache or tmp / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           # the raylet would start one idle Python worker per logical CPU when the driver connects: on a
           # simulated cluster of many logical CPUs that is dozens of processes nobody uses
           "RAY_prestart_worker_first_driver": "0", "RAY_enable_worker_prestart": "0"}
    for key, value in env.items():  # before Ray starts: every node and worker inherits it
        os.environ.setdefault(key, value) if key in DEFAULT_ENV else os.environ.__setitem__(key, value)
    os.environ.pop("RAY_ADDRESS", None)
    if args.results_compact_every_s is not None:
        import study.results

        study.results.COMPACT_EVERY_S = args.results_compact_every_s
    concurrency = args.concurrency or max(1, args.gpus // args.gpus_per_trial)
    space = space_file(tmp, trials=args.trials, epochs=args.epochs, gpus_per_trial=args.gpus_per_trial,
                       concurrency=concurrency, grace=args.grace, reduction=args.reduction, searcher=args.searcher,
                       tune_loggers=args.tune_loggers == "default",
                       checkpoints_to_keep=args.checkpoints_to_keep)
    from brainage_core.data.sources import resolve_store
    from study.space import load_search_space

    resolve_store(load_search_space(space).config.data, progress=False)  # outside the timing

    import ray

    import study.run as runner

    report: dict[str, Any] = {"machine": machine(), "settings": {k: str(v) if isinstance(v, Path) else v
                                                                  for k, v in vars(args).items()}}
    cpus = args.cpus or args.gpus * 2 + 2
    t_ray = time.perf_counter()
    for attempt in range(3):  # Ray gives a node 30 s to register: not always enough on a loaded machine
        try:
            cluster = start_simulated_ray(gpus=args.gpus, nodes=args.nodes, cpus=cpus)
            break
        except Exception as exc:  # noqa: BLE001 - "The current node timed out during startup"
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            print(f"[cluster-sim] Ray did not start ({exc}); trying again", flush=True)
            ray.shutdown()
    report["ray_start_s"] = time.perf_counter() - t_ray
    trace_at = (args.trials // 2, args.trials - concurrency) if args.trace_memory else None
    if trace_at is not None:
        import tracemalloc

        tracemalloc.start(args.trace_memory)
    probe = Probe(events, args.gpus, args.sample_s, trace_at=trace_at)
    probe.install()
    probe.start()
    ray_peak = [0.0]

    def watch_ray_memory() -> None:
        while not probe._stop.is_set():
            ray_peak[0] = max(ray_peak[0], ray_processes_rss_mb())
            probe._stop.wait(2.0)

    watcher = threading.Thread(target=watch_ray_memory, daemon=True)
    watcher.start()
    error = None
    interrupted = threading.Event()

    def interrupt() -> None:  # Tune's first SIGINT ends the study gracefully: what ran is still measured
        interrupted.set()
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(args.max_wall_s, interrupt) if args.max_wall_s else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    t_start = time.time()
    study_dir = tmp / "studies" / "sim"
    try:
        journal = f"journal:{tmp / 'optuna.journal'}" if args.optuna_storage == "journal" else None
        runner.run_study(space, name="sim", storage=tmp / "studies", optuna_storage=journal)
    except Exception as exc:  # noqa: BLE001 - reported, then re-raised after the clean-up
        error = exc
    except KeyboardInterrupt:
        if not interrupted.is_set():
            raise
    t_end = time.time()
    if timer is not None:
        timer.cancel()
    probe.stop()
    watcher.join(5)
    try:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    except Exception:  # noqa: BLE001
        pass
    if error is not None:
        raise error
    report["simulated"] = {
        "gpus": args.gpus, "nodes": args.nodes, "gpus_per_trial": args.gpus_per_trial, "cpus_logical": cpus,
        "concurrent_trials": concurrency, "trials": args.trials, "epochs": args.epochs, "epoch_s": args.epoch_s,
        "trial": "study.trial DDP shell (LeanTorchTrainer, gloo) per trial" if args.gpus_per_trial > 1
                 else "study.trial in-trial shell (one Tune actor, reused)",
        "training": "bench.cluster_sim.standin_train through BRAINAGE_TEST_TRAIN_FN (sleep per epoch, synthetic "
                    "learning curve; no model, no data loading, no GPU kernels)"}
    report["ray_processes_peak_rss_mb"] = ray_peak[0]
    report["driver_memory_growth"] = probe.memory_growth()
    report["interrupted_after_s"] = args.max_wall_s if interrupted.is_set() else None
    report.update(analyse(load_events(events), probe, gpus=args.gpus, epoch_s=args.epoch_s, t_start=t_start,
                          t_end=t_end, study_dir=study_dir))
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=8, help="logical GPUs of the simulated cluster")
    p.add_argument("--nodes", type=int, default=1, help="nodes sharing them (ray.cluster_utils.Cluster when > 1)")
    p.add_argument("--gpus-per-trial", type=int, default=2, help="DDP workers per trial, one GPU each (1: in-trial)")
    p.add_argument("--cpus", type=int, default=0, help="logical CPUs (default 2 per GPU + 2)")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--epoch-s", type=float, default=0.5, help="seconds of one simulated epoch")
    p.add_argument("--grace", type=int, default=2, help="ASHA grace period (epochs)")
    p.add_argument("--reduction", type=int, default=2, help="ASHA reduction factor")
    p.add_argument("--searcher", default="tpe")
    p.add_argument("--concurrency", type=int, default=0,
                   help="study.max_concurrent_trials (default: GPUs / GPUs per trial)")
    p.add_argument("--max-wall-s", type=float, default=0.0,
                   help="end the study (SIGINT, as Ctrl-C) after this many seconds and measure what ran")
    p.add_argument("--tune-loggers", choices=("default", "off"), default="default",
                   help="off: study.tune_loggers: false (no result.json / progress.csv / TensorBoard "
                        "files per trial), to measure what Tune's default loggers cost the driver")
    p.add_argument("--checkpoints-to-keep", type=int, default=1,
                   help="study.checkpoints_to_keep: Tune forces an experiment snapshot whenever a trial has "
                        "checkpointed this many times since the last one (1: at every evaluation)")
    p.add_argument("--results-compact-every-s", type=float, default=None,
                   help="study.results.COMPACT_EVERY_S for the study's driver: the longest time between two "
                        "whole rewrites of results.parquet (default: the project's, 10 s; 0: a rewrite at every "
                        "change, as before the journal)")
    p.add_argument("--optuna-storage", choices=("sqlite", "journal"), default="sqlite",
                   help="the study's Optuna storage: its sqlite optuna.db (default) or an Optuna journal file "
                        "(study/run.py --optuna-storage journal:PATH)")
    p.add_argument("--trace-memory", type=int, default=0, metavar="FRAMES",
                   help="trace the driver's Python allocations (tracemalloc, FRAMES deep) and report what grew "
                        "from half the trials finished to all but the last wave (driver_memory_growth); slows the "
                        "driver, so its times are not comparable with an untraced run")
    p.add_argument("--sample-s", type=float, default=0.5, help="probe period (driver RSS, held GPUs)")
    p.add_argument("--workdir", type=Path, help="folder for the study, events and cache (default: a new temp dir)")
    p.add_argument("--cache", type=Path, help="BRAINAGE_CACHE (the tiny store; default: inside the workdir)")
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    u, lat = report["utilisation"], report["scheduling_latency_s"]
    print(f"[cluster-sim] {report['trials_in_results']} trials, {report['rows']} rows; GPU-slot utilisation while "
          f"trials remain: slots {u['slots_while_trials_remain']}, held {u['held_while_trials_remain']}, training "
          f"{u['training_while_trials_remain']}; "
          f"wall {report['wall_s']:.1f} s vs ideal "
          f"{report['ideal_s']:.1f} s; latency p50 {lat['p50']} max {lat['max']}; driver RSS "
          f"{report['driver_rss']['kb_per_finished_trial_second_half']} KB/trial; check {report['check']}; "
          f"-> {args.out}", flush=True)
    return 0 if report["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
