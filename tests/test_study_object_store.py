"""Study folders on an object store: ``--storage s3://bucket/prefix`` end to end against a local S3.

A moto S3 server (``moto.server.ThreadedMotoServer`` on 127.0.0.1, a free port) stands in for S3 for
the whole module; ``AWS_ENDPOINT_URL`` and test credentials are set in this process. One Ray for the
module (as in test_study.py), started WITHOUT those variables, so trials and workers reach the bucket
only through the study's forwarding of AWS_* (as on a real cluster); each study is a real
``python -m study.run`` process joining it through RAY_ADDRESS. The smoke study runs in-trial
(num_workers 1, 2 trials of 2 epochs; the first trial's process kills itself at epoch 2 and restarts from
its checkpoint in the bucket) and is then resumed, read by the loader, the report, the export and
final.py (2 seeds: the final rows and their intervals); a DDP study (2 workers, 2 trials in one reused trial
process, ASHA stopping one) checks Train's storage on S3. About 3 minutes on a loaded 2-core machine.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from scipy import stats
from study_fixtures import shared_store_cache, start_test_ray

from brainage_core.errors import ConfigError, DataError
from study.storage import StudyFolder, join_location

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"
BUCKET = "bucket"
STORAGE = f"s3://{BUCKET}/studies"
#: in-trial training; the fast probes at the last evaluation too (no test here checks the exact protocol, which
#: tests/test_study.py::test_smoke_study_with_ddp_trials_a_killed_worker_and_a_killed_driver does)
FAST = "evaluation.final_protocol=fast"
IN_TRIAL = ("study.resources.num_workers=1", FAST)

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


@pytest.fixture(scope="module")
def s3():
    """A local S3 (moto) with one bucket; the AWS_* environment points at it for the module."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}?allow_bucket_creation=true")
        fs.create_dir(BUCKET)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def ray_address(s3):
    """One Ray for the module, started WITHOUT the AWS_* environment: its workers reach the local S3 only
    if the study forwards the variables (the job's runtime_env), as on a real cluster."""
    import ray

    for key in s3:
        os.environ.pop(key)
    try:
        address = start_test_ray()
    finally:
        os.environ.update(s3)
    try:
        yield address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def cache(tmp_path_factory, store_cache):
    """BRAINAGE_CACHE of the module (this process and the studies): mirrors, downloads; the stores are the
    session's (``store_cache``)."""
    path = shared_store_cache(tmp_path_factory.mktemp("cache"), store_cache)
    saved = os.environ.get("BRAINAGE_CACHE")
    os.environ["BRAINAGE_CACHE"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("BRAINAGE_CACHE", None)
    else:
        os.environ["BRAINAGE_CACHE"] = saved


def s3fs() -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(STORAGE)[0]


def objects(prefix: str) -> list[str]:
    """Keys of the files under ``bucket/prefix`` (empty when none)."""
    fs = s3fs()
    if fs.get_file_info(prefix).type == pafs.FileType.NotFound:
        return []
    return [i.path for i in fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
            if i.type == pafs.FileType.File]


def read_object(key: str) -> bytes:
    with s3fs().open_input_stream(key) as f:
        return f.read()


def optuna_trials(prefix: str, name: str, cache: Path) -> list:
    """The trials of the Optuna snapshot that the study ``name`` keeps in the bucket (``prefix/optuna.db``)."""
    db = cache / f"check-{name}-optuna.db"
    db.write_bytes(read_object(f"{prefix}/optuna.db"))
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}").get_trials(deepcopy=False)


def run_study(ray_address, cache, cwd, *args, env=None, timeout=400):
    # Tune's own period for its experiment-state snapshots (no TUNE_GLOBAL_CHECKPOINT_S=0: no driver is killed
    # here; a snapshot at every step, each an upload to the bucket, cost the DDP study 40-55 CPU-seconds)
    full_env = {**os.environ, "RAY_ADDRESS": ray_address, "BRAINAGE_CACHE": str(cache), "PYTHONPATH": str(ROOT),
                **(env or {})}
    cmd = [sys.executable, "-m", "study.run", str(SMOKE), *args]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def show(proc):
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"


# --------------------------------------------------------------------------------------------------
# StudyFolder without Ray
# --------------------------------------------------------------------------------------------------


def test_locations_and_transfers(s3, tmp_path):
    assert join_location("s3://b/p?endpoint_override=http://h:1", "x/y") == "s3://b/p/x/y?endpoint_override=http://h:1"
    assert join_location(str(tmp_path), "a") == str(tmp_path / "a")
    folder = StudyFolder(f"{STORAGE}/unit", cache_dir=tmp_path / "cache")
    assert folder.is_remote and folder.name == "unit" and folder.path == f"{BUCKET}/studies/unit"
    assert folder.local.is_relative_to(tmp_path / "cache" / "studies")
    assert folder.child("tune") == f"{STORAGE}/unit/tune"
    assert folder.uri_of(f"{BUCKET}/studies/unit/tune/x") == f"{STORAGE}/unit/tune/x"
    with pytest.raises(DataError, match="s3://bucket/studies/unit holds none of"):
        folder.materialize()
    folder.local.mkdir(parents=True)
    (folder.local / "config.yaml").write_text("a: 1\n")
    folder.upload("config.yaml")
    assert read_object(f"{BUCKET}/studies/unit/config.yaml") == b"a: 1\n"
    (folder.local / "config.yaml").unlink()
    (folder.local / "results.parquet").write_text("stale")  # no longer in the bucket: dropped from the mirror
    assert folder.materialize() == folder.local
    assert (folder.local / "config.yaml").read_text() == "a: 1\n" and not (folder.local / "results.parquet").exists()
    assert folder.download("missing.txt") is None and not folder.exists("missing.txt")
    folder.check_writable()
    assert [k for k in objects(f"{BUCKET}/studies/unit") if ".write-probe" in k] == []
    local = StudyFolder(tmp_path / "plain")
    assert not local.is_remote and local.local == (tmp_path / "plain").resolve() and local.child("x") == str(
        (tmp_path / "plain" / "x").resolve())


def test_bad_storage_is_one_config_error_and_writes_nothing(s3, tmp_path, monkeypatch):
    from study.run import run_study as run

    monkeypatch.setenv("BRAINAGE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"--storage s3://nobucket/studies/smoke: cannot write .*NO_SUCH_BUCKET"):
        run(SMOKE, storage="s3://nobucket/studies")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ConfigError, match=r"--storage s3://bucket/studies/smoke: cannot write .*(connect|Connect)"):
        run(SMOKE, storage=STORAGE)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["AWS_ENDPOINT_URL"])
    assert objects(f"{BUCKET}/studies/smoke") == []
    assert not (tmp_path / "cache").exists()
    # the command line: one error line, exit status 2
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BRAINAGE_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "study.run", str(SMOKE), "--storage", "s3://nobucket/x"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --storage s3://nobucket/x/smoke")


def test_submit_passes_the_uri_through(s3, tmp_path, monkeypatch):
    from study import jobs, opening, run

    seen = {}
    monkeypatch.setattr(jobs, "submit_study", lambda **kw: seen.update(kw) or 0)
    assert run.main([str(SMOKE), "--submit", "--address", "http://127.0.0.1:8265", "--storage", STORAGE]) == 0
    args = seen["run_args"]
    assert args[args.index("--storage") + 1] == STORAGE and seen["stage_dir"] == f"{STORAGE}/.jobs"
    assert seen["env"]["AWS_ENDPOINT_URL"] == s3["AWS_ENDPOINT_URL"]
    # the job's driver reads a space staged in the bucket
    monkeypatch.setenv("BRAINAGE_CACHE", str(tmp_path / "cache"))
    fs = s3fs()
    with fs.open_output_stream(f"{BUCKET}/studies/.jobs/smoke-1234.yaml") as f:
        f.write(SMOKE.read_bytes())
    local = opening.local_space(f"{STORAGE}/.jobs/smoke-1234.yaml")
    assert local.name == "smoke-1234.yaml" and local.read_bytes() == SMOKE.read_bytes()
    with pytest.raises(ConfigError, match="no such search-space YAML"):
        opening.local_space(f"{STORAGE}/.jobs/none.yaml")


# --------------------------------------------------------------------------------------------------
# Studies on S3
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_study(ray_address, cache, tmp_path_factory):
    """The in-trial smoke study written to s3://bucket/studies/s3smoke (cwd: an empty folder). The first
    trial's process kills itself at the start of epoch 2 (test hook, once): Tune restarts it from its
    epoch-1 checkpoint, which lives in the bucket (downloaded with Checkpoint.to_directory), and its logs
    continue on the bucket."""
    cwd = tmp_path_factory.mktemp("cwd")
    once = tmp_path_factory.mktemp("fault") / "fault-fired"
    proc = run_study(ray_address, cache, cwd, *IN_TRIAL, "--storage", STORAGE, "--name", "s3smoke",
                     env={"BRAINAGE_FAULT_KILL_AT_EPOCH": "2", "BRAINAGE_FAULT_ONCE_FILE": str(once)})
    assert proc.returncode == 0, show(proc)
    return {"proc": proc, "cwd": cwd, "uri": f"{STORAGE}/s3smoke", "prefix": f"{BUCKET}/studies/s3smoke",
            "fault_fired": once.exists()}


def test_study_writes_its_folder_to_the_bucket(s3_study, cache):
    prefix, keys = s3_study["prefix"], objects(s3_study["prefix"])
    for name in ("config.yaml", "space.yaml", "results.parquet", "optuna.db"):
        assert f"{prefix}/{name}" in keys, name
    assert any(k.startswith(f"{prefix}/tune/experiment_state") for k in keys)
    assert not (ROOT / "studies" / "s3smoke").exists() and list(s3_study["cwd"].iterdir()) == []
    assert s3_study["fault_fired"]  # a trial process did kill itself once, at the start of epoch 2
    out = s3_study["proc"].stdout  # and was resumed at epoch 2 from the bucket, not re-trained
    assert out.count("epoch 1/2") == 2 and out.count("epoch 2/2") == 2, show(s3_study["proc"])

    df = pq.read_table(f"{prefix}/results.parquet", filesystem=s3fs()).to_pandas()
    assert df["trial_id"].nunique() == 2
    assert sorted(df.groupby("trial_id")["epoch"].apply(list).tolist()) == [[1, 2], [1, 2]]
    assert (df["status"] == "completed").all()
    assert df["compute_s"].tolist() == pytest.approx(df["wall_s"].tolist())  # one worker per trial
    # checkpoints: URIs under Tune's experiment; the one kept per trial (checkpoints_to_keep 1) is in the bucket
    assert df["checkpoint_path"].notna().all()
    assert df["checkpoint_path"].str.startswith(f"{s3_study['uri']}/tune/").all()
    for path in df.sort_values("epoch").groupby("trial_id")["checkpoint_path"].last():
        assert f"{path.removeprefix('s3://')}/checkpoint.pt" in keys
    # each trial's logs were published
    for trial_id in df["trial_id"].unique():
        log = read_object(f"{prefix}/trials/{trial_id}/train_log.jsonl").decode().splitlines()
        assert [json.loads(line)["epoch"] for line in log] == [1, 2]
        metrics = read_object(f"{prefix}/trials/{trial_id}/metrics.jsonl").decode().splitlines()
        assert len(metrics) == 2
    # the Optuna snapshot in the bucket is the study
    trials = optuna_trials(prefix, "s3smoke", cache)
    assert len(trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    last = df[df["epoch"] == 2].sort_values("param.loss.temperature")
    assert sorted(t.value for t in trials) == pytest.approx(sorted(last["val_mae_ext"]))


def test_resume_keeps_rows_and_reruns_nothing(s3_study, ray_address, cache):
    prefix = s3_study["prefix"]
    before = pq.read_table(f"{prefix}/results.parquet", filesystem=s3fs()).to_pandas()
    StudyFolder(s3_study["uri"]).clear_mirror()  # as on another machine: everything comes from the bucket
    proc = run_study(ray_address, cache, s3_study["cwd"], *IN_TRIAL, "--storage", STORAGE, "--name", "s3smoke",
                     "--resume")
    assert proc.returncode == 0, show(proc)
    assert "[study] trial" not in proc.stdout, show(proc)  # no trial reported again
    after = pq.read_table(f"{prefix}/results.parquet", filesystem=s3fs()).to_pandas()
    pd.testing.assert_frame_equal(before.reset_index(drop=True), after.reset_index(drop=True))
    again = run_study(ray_address, cache, s3_study["cwd"], *IN_TRIAL, "--storage", STORAGE, "--name", "s3smoke")
    assert again.returncode == 2 and "add --resume" in again.stderr


def test_loader_and_export_read_the_bucket(s3_study, cache, tmp_path):
    from analysis.loader import load_studies, load_study
    from study.export import export_submission, rank_checkpoints

    StudyFolder(s3_study["uri"]).clear_mirror()
    study = load_study(s3_study["uri"])
    assert study.name == "s3smoke" and study.results["trial_id"].nunique() == 2
    assert study.config["study"]["num_samples"] == 2
    df = load_studies([s3_study["uri"]])
    assert set(df["study_dir"]) == {s3_study["uri"]} and set(df["study"]) == {"s3smoke"}
    # the HTML report, Optuna importances included (optuna.db comes down with the mirror)
    from analysis.report import build_report

    html = build_report([s3_study["uri"]], tmp_path / "report.html", metric="val_mae_ext").read_text()
    assert all(str(t) in html for t in study.results["trial_id"].unique())
    assert len(re.findall(r'<img[^>]+src="data:image/png;base64,', html)) == 4  # pareto, importances, epochs, ref

    ranked = rank_checkpoints(s3_study["uri"], "val_mae_ext")
    assert len(ranked) == 2 and ranked["checkpoint"].str.startswith(s3_study["uri"]).all()
    out = export_submission(s3_study["uri"], tmp_path / "sub", metric="val_mae_ext")
    assert sorted(p.name for p in out.iterdir()) == ["estimator.py", "metadata.pkl", "weights.pth"]
    assert list((cache / "checkpoints").iterdir())  # the checkpoint was downloaded into the cache
    meta = pd.read_pickle(out / "metadata.pkl")
    assert meta["checkpoint"] == ranked["checkpoint"].iloc[0] and meta["study_dir"] == s3_study["uri"]
    # a submission copied to the bucket is read from there by study/predict.py
    from study.predict import load_submission

    pafs.copy_files(str(out), f"{BUCKET}/submissions/sub", destination_filesystem=s3fs())
    model, meta_s3 = load_submission(f"s3://{BUCKET}/submissions/sub")
    local_model, _ = load_submission(out)
    assert meta_s3["trial_id"] == meta["trial_id"]
    for key, value in local_model.state_dict().items():
        assert (model.state_dict()[key] == value).all(), key
    with pytest.raises(DataError, match=f"s3://{BUCKET}/submissions/none: no such folder"):
        load_submission(f"s3://{BUCKET}/submissions/none")


def test_ddp_trials_on_s3_reuse_one_process_and_asha_aborts_stopped_runs(ray_address, cache, tmp_path):
    """DDP trials with their study folder on S3 (Train's storage in the bucket), run one after another in one
    reused trial process (study.train_run); a trial that ASHA stops has its Train run aborted (it trains no
    further), and the next trial still starts cleanly. What ASHA stopped reaches Optuna as PRUNED, with its
    intermediate values, the others as COMPLETE. (One study for both: it was two, one per behaviour.)"""
    epochs = 4  # ASHA rungs at epochs 1 and 2 (grace 1, factor 2): the stops happen there
    trials = 2  # one trial process, reused once; with study.seed 3 the second trial is stopped at the first rung
    # (its epoch-1 val_mae_ext 14.4 against the first trial's 12.9, measured)
    # Epochs of >= 1 s (test hook, in the test Ray's workers): a stopped run that went on would reach the last epoch.
    proc = run_study(ray_address, cache, tmp_path, f"study.num_samples={trials}", "study.seed=3",
                     f"training.epochs={epochs}", "study.asha={grace_period: 1, reduction_factor: 2}", FAST,
                     "--storage", STORAGE, "--name", "s3ddp", env={"BRAINAGE_FAULT_SLOW_EPOCH_S": "1.0"})
    assert proc.returncode == 0, show(proc)
    assert "reset_config" not in proc.stdout + proc.stderr, show(proc)
    assert list(tmp_path.iterdir()) == []  # nothing written beside the bucket
    prefix = f"{BUCKET}/studies/s3ddp"
    keys = objects(prefix)
    df = pd.read_parquet(io.BytesIO(read_object(f"{prefix}/results.parquet")))
    assert (df["compute_s"] - 2 * df["wall_s"]).abs().max() < 1e-6  # 2 DDP workers
    status = df.groupby("trial_id")["status"].last()
    assert len(status) == trials and set(status) <= {"completed", "pruned"}, status.to_dict()
    assert (status == "pruned").any(), "expected ASHA to stop a trial of this seeded study"
    assert ((status == "pruned") == (df.groupby("trial_id")["epoch"].max() < epochs)).all()
    # each trial's last checkpoint: written by its Train run, in the bucket
    for path in df.sort_values("epoch").groupby("trial_id")["checkpoint_path"].last():
        assert path.startswith(f"{STORAGE}/s3ddp/train_runs/trial_"), path
        assert f"{path.removeprefix('s3://')}/checkpoint.pt" in keys
    by_state = {t.number: t for t in optuna_trials(prefix, "s3ddp", cache)}
    assert len(by_state) == trials
    pruned = [t for t in by_state.values() if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in by_state.values() if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(pruned) == (status == "pruned").sum() and len(complete) == (status == "completed").sum()
    assert all(t.intermediate_values for t in pruned)
    pids = {}  # the trial process of each trial, from the first line of Tune's result.json in the bucket
    for key in keys:
        if key.startswith(f"{prefix}/tune/") and key.endswith("/result.json"):
            first = json.loads(read_object(key).decode().splitlines()[0])
            pids[first["trial_id"]] = first["pid"]
    assert len(pids) == trials and len(set(pids.values())) == 1, pids  # one trial process for all of them
    for trial_id in status.index:
        # what the trial trained: its log in the node-local work folder of a study on an object store
        # (study.trial.TrialSpec.work_dir); the bucket has the log as of the trial's last report
        local = list((Path(tempfile.gettempdir()) / "brainage-study-trials").glob(f"*/{trial_id}/train_log.jsonl"))
        assert len(local) == 1, local
        trained = [json.loads(line)["epoch"] for line in local[0].read_text().splitlines()]
        published = read_object(f"{prefix}/trials/{trial_id}/train_log.jsonl").decode().splitlines()
        reported = int(df[df["trial_id"] == trial_id]["epoch"].max())
        assert [json.loads(line)["epoch"] for line in published] == trained[:len(published)] == list(
            range(1, len(published) + 1)) and len(published) >= reported, (trial_id, trained, len(published))
        if status[trial_id] == "completed":
            assert trained == list(range(1, epochs + 1)), (trial_id, trained)
        else:  # aborted: at most the epoch in flight when Tune's decision arrived (and one more on a busy machine)
            assert max(trained) <= min(reported + 2, epochs - 1), (trial_id, reported, trained)


def test_final_on_the_bucket_writes_final_rows_with_intervals(s3_study, ray_address, cache):
    """study/final.py on the bucket's study (the best trial, 2 seeds): the final rows join the study's
    results.parquet in the bucket beside its search rows, and final.parquet / final_summary.csv hold their
    t-intervals. (The local study's final.py was tests/test_smoke_study.py's; one run checks both.)"""
    from analysis.loader import load_studies
    from study.final import select_top

    StudyFolder(s3_study["uri"]).clear_mirror()
    prefix = s3_study["prefix"]
    search = pq.read_table(f"{prefix}/results.parquet", filesystem=s3fs()).to_pandas()
    best = select_top(search, "val_mae_ext", "min", 1)["trial_id"].iloc[0]
    epochs = yaml.safe_load(read_object(f"{prefix}/config.yaml"))["training"]["epochs"]
    env = {**os.environ, "RAY_ADDRESS": ray_address, "BRAINAGE_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "study" / "final.py"), s3_study["uri"], "--top-k", "1",
                           "--seeds", "2"], cwd=s3_study["cwd"], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, show(proc)
    assert "[final] #1" in proc.stdout, show(proc)
    keys = objects(prefix)
    assert f"{prefix}/final.parquet" in keys and f"{prefix}/final_summary.csv" in keys
    assert any(k.startswith(f"{prefix}/final/final-") for k in keys)  # the Tune run is on the bucket
    assert list(s3_study["cwd"].iterdir()) == []

    df = pq.read_table(f"{prefix}/results.parquet", filesystem=s3fs()).to_pandas()
    final = df[df["status"] == "final"]
    assert len(df) == len(search) + 2 and (df["status"] == "completed").sum() == 4  # the search rows are kept
    assert len(final) == 2 and final["final"].astype(bool).all() and (final["kind"] == "final").all()
    assert sorted(final["seed"]) == [0, 1] and (final["source_trial_id"] == best).all()
    assert (final["epoch"] == epochs).all()  # the same budget as the search
    source_t = search.loc[search["trial_id"] == best, "param.loss.temperature"].iloc[0]
    assert (final["param.loss.temperature"] == source_t).all()
    for m in ("test_mae_int", "test_mae_ext", "test_bacc"):
        assert final[m].notna().all(), m
    assert final["val_mae_ext"].isna().all()  # trained on the whole training split: no validation data
    assert final["trial_id"].nunique() == 2 and not set(final["trial_id"]) & set(search["trial_id"])

    table = pq.read_table(f"{prefix}/final.parquet", filesystem=s3fs()).to_pandas()
    summary = table[table["kind"] == "summary"]
    assert len(summary) == 1 and summary["n_seeds"].iloc[0] == 2
    values = final["test_mae_ext"].to_numpy()
    low, high = stats.t.interval(0.95, 1, loc=values.mean(), scale=stats.sem(values))
    row = summary.iloc[0]
    assert row["test_mae_ext_mean"] == pytest.approx(values.mean())
    assert (row["test_mae_ext_ci95_low"], row["test_mae_ext_ci95_high"]) == pytest.approx((low, high))
    csv = pd.read_csv(io.BytesIO(read_object(f"{prefix}/final_summary.csv")))
    assert len(csv) == 1 and csv["n_seeds"].tolist() == [2]
    assert int(load_studies([s3_study["uri"]])["final"].sum()) == 2
