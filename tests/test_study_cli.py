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


def test_bad_journal_storage_is_one_clear_error_and_writes_nothing(tmp_path):
    bad = f"journal:{tmp_path / 'missing' / 'optuna.journal'}"
    proc = run(["-m", "study.run", str(ROOT / "search_spaces" / "smoke.yaml"), "--storage", str(tmp_path / "studies"),
                "--optuna-storage", bad], tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == f"error: --optuna-storage {bad}: expected journal:PATH, PATH a file in an existing folder"
    assert not (tmp_path / "studies").exists() and not (tmp_path / "missing").exists()


def test_bad_override_and_missing_study_for_resume(tmp_path):
    smoke = str(ROOT / "search_spaces" / "smoke.yaml")
    proc = run(["-m", "study.run", smoke, "loss.temprature=0.1"], tmp_path)
    assert proc.returncode == 2 and "loss.temperature" in proc.stderr
    proc = run(["-m", "study.run", smoke, "--resume", "--storage", str(tmp_path / "none")], tmp_path)
    assert proc.returncode == 2 and "no study in" in proc.stderr and "run without --resume" in proc.stderr


def test_bad_data_root_writes_no_study_folder(tmp_path):
    """Issue 12, case 8: a mistyped OPENBHB_ROOT left config.yaml / space.yaml behind, which then blocked both
    the corrected rerun ("already holds a study") and --resume."""
    smoke = str(ROOT / "search_spaces" / "smoke.yaml")
    args = ["-m", "study.run", smoke, "data.synthetic=null", "data.source=${OPENBHB_ROOT}", "data.layout=openbhb",
            "--storage", str(tmp_path / "studies")]
    proc = run(args, tmp_path, OPENBHB_ROOT=str(tmp_path / "no-such-root"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "no-such-root" in lines[0]
    assert not (tmp_path / "studies" / "smoke").exists()


def test_unreadable_results_on_resume_is_one_line_before_ray(tmp_path):
    """Issue 12, case 7: a truncated results.parquet on --resume ended in a traceback after Ray had started."""
    from study.run import _write_folder, resolved_config
    from study.space import load_search_space
    from study.storage import StudyFolder

    smoke = ROOT / "search_spaces" / "smoke.yaml"
    folder = StudyFolder(str(tmp_path / "studies" / "smoke"))
    _write_folder(folder, smoke, resolved_config(load_search_space(smoke, []), []))
    (tmp_path / "studies" / "smoke" / "results.parquet").write_bytes(b"PAR1 truncated")
    proc = run(["-m", "study.run", str(smoke), "--storage", str(tmp_path / "studies"), "--resume"], tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "results.parquet is not a readable parquet table" in lines[0] and "move it away" in lines[0]
    assert "Ray" not in proc.stdout  # stopped before Ray started


def test_unwritable_study_folder_mid_run_stops_the_study_without_a_traceback(tmp_path, capsys):
    """Issue 12, case 7: the study folder turning read-only mid-run printed 672 lines of tracebacks from inside
    Tune. The driver callback now records the OSError, says it once, and the study's stopper ends the study."""
    from types import SimpleNamespace

    import study.run as run_module
    from study.results import ResultsTable
    from study.space import load_search_space

    space = load_search_space(ROOT / "search_spaces" / "smoke.yaml", [])
    callback = run_module.StudyCallback(str(tmp_path / "study"), space, str(tmp_path / "store"))
    table = ResultsTable(tmp_path / "study" / "results.parquet", param_keys=[], static={}, resume=False)
    table.rows[("t1", 1)] = {"trial_id": "t1", "epoch": 1, "status": "running", "val_mae_ext": 5.0}

    def read_only(op):  # every change of the table is a journal append (or a rewrite): both fail
        raise PermissionError(13, "Permission denied", str(tmp_path / "study" / "results.journal.jsonl"))

    table._record = read_only
    callback.table = table
    stopper = run_module.DoomedStudyStopper(2)
    run_module.WRITE_ERRORS.clear()
    try:
        assert not stopper.stop_all()
        callback.on_trial_error(0, [], SimpleNamespace(trial_id="t1"))  # no exception escapes into Tune
        callback.on_checkpoint(0, [], SimpleNamespace(trial_id="t1"), SimpleNamespace(path="/ckpt", filesystem=None))
        callback.on_trial_complete(0, [], SimpleNamespace(trial_id="t1"))  # these writes fail too, still no raise
        assert stopper.stop_all() and len(run_module.WRITE_ERRORS) == 3
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot write the study folder (Permission denied" in err[0]
        message = run_module._unwritable(run_module.StudyFolder(str(tmp_path / "study")), run_module.WRITE_ERRORS[0])
        assert "became unwritable (Permission denied" in message and "--resume" in message
    finally:
        run_module.WRITE_ERRORS.clear()


def test_missing_metrics_warning_is_dropped_only_with_the_loggers_off(caplog):
    import logging

    from study import run as study_run

    log = logging.getLogger(study_run.RESULT_GRID_LOGGER)
    missing = "Failed to fetch metrics for 2 trial(s):\n- trial_1: FileNotFoundError('Could not fetch metrics')"
    with caplog.at_level(logging.WARNING, logger=study_run.RESULT_GRID_LOGGER):
        with study_run._no_missing_metrics_warning(True):
            log.warning(missing)
            log.warning("another warning")
        with study_run._no_missing_metrics_warning(False):
            log.warning(missing)
        log.warning(missing)  # the filter is gone after the block
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "another warning", "Failed to fetch metrics for 2 trial(s)", "Failed to fetch metrics for 2 trial(s)"]
