"""The loss benchmark (bench/loss_benchmark.py, search_spaces/benchmark/) and the quickstart's design."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from analysis.tables import MIN_LEARNING_EPOCHS
from bench.loss_benchmark import LOSSES, difference_summary, interval_summary, markdown
from study.ray_runtime import cpus_per_trial
from study.space import load_search_space

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "search_spaces" / "benchmark"


def test_quickstart_validates_learns_long_enough_and_fits_two_cores():
    space = load_search_space(ROOT / "search_spaces" / "quickstart.yaml")
    cfg, st = space.config, space.study
    assert cfg.data.grid == "6mm" and cfg.data.synthetic.subjects >= 800
    assert cfg.training.epochs >= 2 * MIN_LEARNING_EPOCHS
    assert cfg.training.epochs // cfg.evaluation.eval_every >= 4  # the curves have points
    # one trial per loss family, both cores busy and no more
    assert space.keys == ["loss.method"] and st.searcher == "grid"
    methods = space.grid()["loss.method"]
    assert len(methods) == len(set(methods)) == space.grid_size()
    assert {"l1"} < set(methods)
    assert cpus_per_trial(st.resources) * st.max_concurrent_trials == 2


def test_benchmark_spaces_share_everything_but_the_loss():
    raw = {loss: yaml.safe_load((BENCH / f"{loss}.yaml").read_text()) for loss in LOSSES}
    assert sorted(p.stem for p in BENCH.glob("*.yaml")) == sorted(LOSSES)
    ref = raw["l1"]
    for loss, d in raw.items():
        space = load_search_space(BENCH / f"{loss}.yaml")
        assert space.config.loss.method == loss
        for section in ("data", "optimizer", "schedule", "training", "evaluation", "study"):
            assert d[section] == ref[section], (loss, section)
        assert {k: v for k, v in d["model"].items() if k != "head"} == ref["model"]
        assert "optimizer.lr" in space.keys  # every loss gets the same learning-rate search
    assert raw["l1"]["data"]["grid"] == "6mm"


def test_json_summaries_of_the_intervals():
    # the statistics are tested in tests/test_intervals.py; here the JSON keys the table reads
    iv = interval_summary([3.0, float("nan"), 5.0])
    assert set(iv) == {"n", "mean", "std", "ci95_low", "ci95_high"} and iv["n"] == 2 and iv["mean"] == 4.0
    assert iv["ci95_low"] < 4.0 < iv["ci95_high"]
    w = difference_summary([4.1, 4.5, 3.9, 4.4], [5.0, 5.6, 5.2])
    assert set(w) == {"diff", "ci95_low", "ci95_high", "p_value", "significant"}
    assert w["significant"] and w["ci95_high"] < 0 and 0 < w["p_value"] < 0.05
    assert math.isnan(difference_summary([1.0], [2.0, 3.0])["diff"])
    json.dumps(w)  # plain types


@pytest.mark.slow
def test_bad_loss_name_is_one_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "bench/loss_benchmark.py", "--losses", "l1,huber", "--out",
                           str(tmp_path / "b.json")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --losses l1,huber: unknown loss 'huber'")
    assert not (tmp_path / "b.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_tiny_benchmark_writes_the_json_and_the_table(tmp_path, store_cache):
    from study_fixtures import shared_store_cache

    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench/loss_benchmark.py", "--losses", "l1,expw", "--trials", "1", "--seeds", "2",
           "--epochs", "1", "--subjects", "60", "--sites", "6", "--concurrent", "1",
           "--set", "model.base_width=4", "--set", "training.batch_size=8",
           # the fast probes at the last evaluation too: the table's figures, not the exact protocol (test_study.py
           # checks it), are what this reads
           "--set", "evaluation.final_protocol=fast",
           "--storage", str(tmp_path / "studies"), "--name", "tiny", "--out", str(out)]
    cache = shared_store_cache(tmp_path / "cache", store_cache)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BRAINAGE_CACHE": str(cache), "RAY_ADDRESS": "",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["losses"]) == {"l1", "expw"} and report["missing"] == []
    assert report["budget"]["trials"] == 1 and report["budget"]["seeds"] == 2 and report["budget"]["epochs"] == 1
    assert report["cohort"]["synthetic"]["subjects"] == 60 and report["cohort"]["grid"] == "6mm"
    for loss, d in report["losses"].items():
        assert d["n_seeds"] == 2 and len(d["search_trials"]) == 1, loss
        for metric in ("test_mae_int", "test_mae_ext", "test_bacc", "test_lc"):
            s = d["metrics"][metric]
            assert s["n"] == 2 and s["ci95_low"] <= s["mean"] <= s["ci95_high"], (loss, metric)
        assert d["baselines"]["test_mae_int_const"] > 0 and 0 < d["baselines"]["test_bacc_chance"] <= 1
        assert (tmp_path / "studies" / f"tiny-{loss}" / "final_summary.csv").is_file()
    assert set(report["comparisons"]) == {"expw"}
    table = out.with_suffix(".md").read_text()
    assert table == markdown(report)
    assert "| l1 |" in table and "| expw |" in table and "Difference from l1" in table
    assert table.count("[") >= 8  # an interval in every metric cell
    # the same figures split into two files and combined give the same table; another budget is refused
    parts = []
    for loss in ("l1", "expw"):
        part = {**report, "losses": {loss: report["losses"][loss]}, "comparisons": {}}
        parts.append(tmp_path / f"{loss}.json")
        parts[-1].write_text(json.dumps(part))
    combined = tmp_path / "combined.json"
    proc = subprocess.run([sys.executable, "bench/loss_benchmark.py", "--combine", *map(str, parts), "--out",
                           str(combined)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    merged = json.loads(combined.read_text())
    assert merged["comparisons"] == report["comparisons"] and set(merged["losses"]) == {"l1", "expw"}
    assert [p["losses"] for p in merged["parts"]] == [["l1"], ["expw"]]
    other = {**json.loads(parts[1].read_text())}
    other["budget"] = {**other["budget"], "epochs": 2}
    parts[1].write_text(json.dumps(other))
    proc = subprocess.run([sys.executable, "bench/loss_benchmark.py", "--combine", *map(str, parts), "--out",
                           str(tmp_path / "bad.json")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "budget.epochs = 2" in proc.stderr and not (tmp_path / "bad.json").exists()
    # a second run with the same name refuses to overwrite the studies
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "exists" in again.stderr
