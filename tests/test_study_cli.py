"""The study command line without Ray: both invocation forms, clear errors before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(args, tmp_path, **env):
    # PYTHONPATH stands for the installed project (`pip install -e .`), which `python study/run.py` relies on.
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "BRAINAGE_CACHE": str(tmp_path / "cache"), **env}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=full_env, capture_output=True, text=True,
                          timeout=120)


def test_script_and_module_forms(tmp_path):
    for form in (["study/run.py"], ["-m", "study.run"]):
        args = [str(ROOT / form[0])] if form[0].endswith(".py") else form
        proc = run([*args, "--help"], tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "--resume" in proc.stdout and "--storage" in proc.stdout


def test_bad_space_is_one_clear_error_and_starts_nothing(tmp_path):
    space = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())
    space["search"]["loss.temperature"] = {"uniform": [0.5, 0.1]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(space))
    proc = run(["-m", "study.run", str(path), "--storage", str(tmp_path / "studies")], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(path) in lines[0] and "search.loss.temperature.uniform" in lines[0] and "empty range" in lines[0]
    assert not (tmp_path / "studies").exists()


def test_bad_override_and_missing_study_for_resume(tmp_path):
    smoke = str(ROOT / "search_spaces" / "smoke.yaml")
    proc = run(["-m", "study.run", smoke, "loss.temprature=0.1"], tmp_path)
    assert proc.returncode == 2 and "loss.temperature" in proc.stderr
    proc = run(["-m", "study.run", smoke, "--resume", "--storage", str(tmp_path / "none")], tmp_path)
    assert proc.returncode == 2 and "no study in" in proc.stderr and "run without --resume" in proc.stderr
