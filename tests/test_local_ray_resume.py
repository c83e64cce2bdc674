"""Issue 12, case 11: ``--resume`` right after a SIGKILLed driver that had started its own (local) Ray.

The killed driver's Ray leaves its dashboard and runtime-env agents running for a while, holding their ports
(and, on a loaded machine, delaying the next raylet's registration past Ray's fixed 30 s); the resumed study
must start a new Ray anyway and finish the study without re-running what was done. Unlike tests/test_study.py
(whose studies join one shared Ray), each study here starts its own Ray, as `python study/run.py` does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from study_fixtures import shared_store_cache

from study.failures import has_results
from study.results import read_results

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def _study(storage: Path, cache: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "study.run", str(SMOKE), "--storage", str(storage), "--name", "local", *args,
            "study.num_samples=1", "training.epochs=2", "study.resources.num_workers=1"]


def test_resume_at_once_after_a_killed_driver_with_its_own_ray(tmp_path, store_cache):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # the session's synthetic cohort and store (built once for the suite), the rest of the cache the test's own
    cache = shared_store_cache(tmp_path / "cache", store_cache)
    env.update(BRAINAGE_CACHE=str(cache), TUNE_GLOBAL_CHECKPOINT_S="0")
    results = tmp_path / "local" / "results.parquet"
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(_study(tmp_path, cache), cwd=ROOT, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while not has_results(results) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)  # a row in results.parquet or in its journal
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
    assert has_results(results), "no result row within 600 s"
    first.send_signal(signal.SIGKILL)  # the driver only: its Ray's agents are left to exit on their own
    first.wait()
    before = read_results(results)  # what the killed driver left: the table and its journal
    assert len(before) == 1 and before["epoch"].tolist() == [1]

    try:
        resumed = subprocess.run(_study(tmp_path, cache, "--resume"), cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=600)
    finally:  # what is left of the killed driver's Ray (its process group; the resumed one shut its own down)
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-4000:]
    after = pd.read_parquet(results)
    assert after["epoch"].tolist() == [1, 2] and (after["status"] == "completed").all()
    assert after["train_loss"].iloc[0] == pytest.approx(before["train_loss"].iloc[0])  # row 1 kept, not re-run
