"""The training loop: loss goes down, metrics and checkpoints are written, resume is exact, NaN stops.

One tiny synthetic store (6 mm grid, 24 subjects over 4 sites) is generated and prepared once per
module; the model is a resnet18 of base width 4. Everything runs on the CPU, single-threaded.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gloo_helpers import exit_gloo_worker
from study_fixtures import fault_env

from brainage_core.data.prepare import prepare
from brainage_core.data.synthetic import generate_cohort
from brainage_core.errors import ConfigError, NonFiniteLossError
from brainage_core.training import load_checkpoint, load_model_from_checkpoint, train
from brainage_core.training.checkpoint import CHECKPOINT_FILE, CheckpointError, capture_rng_state, restore_rng_state
from brainage_core.training.schedules import lr_factor

torch.set_num_threads(1)

CONTRACT_METRICS = (
    "epoch",
    "train_loss",
    "lr",
    "val_mae_int",
    "val_mae_ext",
    "val_bacc",
    "val_lc",
    "test_mae_int",
    "test_mae_ext",
    "test_bacc",
    "test_lc",
    "leaked",
    "wall_s",
)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("training-store")
    generate_cohort(root / "cohort", subjects=24, sites=4, grid="6mm", seed=0, progress=False)
    prepare(root / "cohort", layout="openbhb", out=root / "store", grid="6mm", progress=False)
    return root / "store"


def make_config(store: Path, **sections) -> dict:
    cfg = {
        "data": {"store": str(store), "grid": "6mm"},
        "model": {"backbone": "resnet18", "base_width": 4},
        "loss": {"method": "yaware", "kernel": "rbf", "sigma": 5.0, "temperature": 0.5},
        "optimizer": {"name": "adam", "lr": 1.0e-3, "weight_decay": 0.0},
        "schedule": {"name": "none"},
        "training": {
            "epochs": 2,
            "batch_size": 6,
            "views": 2,
            "loader_workers": 0,
            "device": "cpu",
            "seed": 0,
            "augment": {"cutout": True},
        },
        "evaluation": {"eval_every": 1, "batch_size": 12, "val_internal_frac": 0.15, "val_external_frac": 0.15},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_two_epochs_write_metrics_and_checkpoint(store_path, tmp_path):
    calls = []
    metrics = train(
        make_config(store_path), tmp_path / "run", callback=lambda m, d: calls.append((m, d)),
    )
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    for name in CONTRACT_METRICS:
        assert name in records[-1], name
    assert records[-1]["leaked"] is False
    # evaluation.protocol (fast) during the run, evaluation.final_protocol (exact) for its last evaluation
    assert [r["protocol"] for r in records] == ["fast", "exact"]
    assert set(records[0]) == set(records[1])
    assert math.isfinite(records[-1]["train_loss"]) and records[-1]["wall_s"] > 0
    assert metrics == records[-1]
    # callback: rank 0 gets every evaluation with the checkpoint folder
    assert [m["epoch"] for m, _ in calls] == [1, 2]
    assert calls[-1][1] == tmp_path / "run" / "checkpoint"
    # only the latest checkpoint folder is kept, and it loads with weights_only=True
    folders = sorted(p.name for p in (tmp_path / "run").iterdir() if p.is_dir())
    assert folders == ["checkpoint"]
    raw = torch.load(tmp_path / "run" / "checkpoint" / CHECKPOINT_FILE, weights_only=True)
    assert raw["epoch"] == 2 and raw["config"]["model"]["base_width"] == 4
    assert isinstance(raw["rng"][0]["torch"], torch.Tensor)
    assert raw["metrics"]["epoch"] == 2
    model, config = load_model_from_checkpoint(tmp_path / "run")
    assert config["loss"]["method"] == "yaware" and not model.training
    with torch.no_grad():
        out = model(torch.zeros(2, 1, 31, 37, 31))
    assert out.shape == (2, 128)


def test_loss_goes_down_over_epochs(store_path, tmp_path):
    cfg = make_config(
        store_path,
        training={"epochs": 6, "augment": {}},
        optimizer={"lr": 3.0e-3},
        evaluation={"eval_every": 6},
    )
    train(cfg, tmp_path / "run")
    losses = [r["train_loss"] for r in read_jsonl(tmp_path / "run" / "train_log.jsonl")]
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses


class Interrupted(Exception):
    pass


def interrupt_at(epoch: int):
    def callback(metrics, checkpoint_dir):
        if metrics["epoch"] == epoch:
            raise Interrupted(epoch)

    return callback


def test_resume_equals_uninterrupted(store_path, tmp_path):
    cosine = {"name": "cosine", "rate": 0.5}
    cfg = make_config(store_path, training={"epochs": 3}, evaluation={"eval_every": 2}, schedule=cosine)
    train(cfg, tmp_path / "straight")
    with pytest.raises(Interrupted):  # dies right after the epoch-2 checkpoint
        train(cfg, tmp_path / "resumed", callback=interrupt_at(2))
    train(cfg, tmp_path / "resumed", resume_from=tmp_path / "resumed" / "checkpoint")
    a = read_jsonl(tmp_path / "straight" / "train_log.jsonl")
    b = read_jsonl(tmp_path / "resumed" / "train_log.jsonl")
    assert [r["epoch"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], abs=1e-6, rel=0)
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-12)
    ma = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    mb = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [m["epoch"] for m in mb] == [2, 3]
    assert mb[-1]["train_loss"] == pytest.approx(ma[-1]["train_loss"], abs=1e-6, rel=0)
    wa = load_checkpoint(tmp_path / "straight")["model"]
    wb = load_checkpoint(tmp_path / "resumed")["model"]
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6)
    # Extending a finished 2-epoch run to 3 epochs follows the 3-epoch cosine schedule at epoch 3.
    short = make_config(store_path, training={"epochs": 2}, evaluation={"eval_every": 2}, schedule=cosine)
    train(short, tmp_path / "extended")
    train(cfg, tmp_path / "extended", resume_from=tmp_path / "extended")
    c = read_jsonl(tmp_path / "extended" / "train_log.jsonl")
    assert c[-1]["epoch"] == 3 and c[-1]["lr"] == pytest.approx(a[-1]["lr"], rel=1e-12)


def test_resume_when_finished_reports_stored_metrics(store_path, tmp_path):
    cfg = make_config(store_path, training={"epochs": 1})
    first = train(cfg, tmp_path / "run")
    calls = []
    again = train(cfg, tmp_path / "run", resume_from=tmp_path / "run", callback=lambda m, d: calls.append((m, d)))
    assert again == first and calls == [(first, tmp_path / "run" / "checkpoint")]


def test_non_finite_loss_names_epoch_step_and_value(store_path, tmp_path, monkeypatch):
    import brainage_core.losses as losses

    class NanLoss(torch.nn.Module):
        def forward(self, features, ages):
            return features.sum() * float("nan")

    monkeypatch.setattr(losses, "build_loss", lambda *a, **k: NanLoss())
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 1: nan"):
        train(make_config(store_path), tmp_path / "run")


def test_huge_learning_rate_is_a_non_finite_loss_error(store_path, tmp_path):
    """Issue 12, case 6: optimizer.lr=1e6 surfaced as a LossError about non-normalised features."""
    cfg = make_config(store_path, optimizer={"name": "adam", "lr": 1.0e6, "weight_decay": 0.0},
                      training={"epochs": 3})
    with pytest.raises(NonFiniteLossError, match=r"non-finite or degenerate model output .* at epoch \d+, step \d+ .*"
                                                 r"optimizer\.lr=1e\+06"):
        train(cfg, tmp_path / "run")


def test_supervised_l1_sgd_bf16_clip_warmup(store_path, tmp_path):
    cfg = make_config(
        store_path,
        loss={"method": "l1", "kernel": None},
        optimizer={"name": "sgd", "lr": 1.0e-3, "momentum": 0.9},
        schedule={"name": "step", "step_every": 1, "rate": 0.5, "warmup_epochs": 2},
        training={"epochs": 1, "bf16": True, "grad_clip": 1.0, "augment": {"zscore": True, "crop": True}},
    )
    del cfg["loss"]["sigma"], cfg["loss"]["temperature"]
    metrics = train(cfg, tmp_path / "run")
    assert metrics["epoch"] == 1 and math.isfinite(metrics["train_loss"])
    # bf16 on the CPU is deterministic (oneDNN's bf16 conv3d weight gradients were not, see loop.py)
    assert train(cfg, tmp_path / "again")["train_loss"] == metrics["train_loss"]
    assert metrics["lr"] == pytest.approx(0.5e-3)  # first warm-up epoch: lr / 2
    model, _ = load_model_from_checkpoint(tmp_path / "run")
    with torch.no_grad():
        assert model(torch.zeros(3, 1, 31, 37, 31)).shape == (3,)


def test_rnc_trains_an_unnormalised_projection(store_path):
    from brainage_core.config import config_from_dict
    from brainage_core.training.loop import build_training_model

    cfg = make_config(store_path, loss={"method": "rnc", "kernel": None, "temperature": 2.0})
    del cfg["loss"]["sigma"]
    model = build_training_model(config_from_dict(cfg))
    with torch.no_grad():
        norms = model(torch.rand(2, 1, 31, 37, 31)).norm(dim=1)
    assert not torch.allclose(norms, torch.ones(2), atol=1e-3)


def test_train_on_all_flags_leak(store_path, tmp_path):
    cfg = make_config(store_path, training={"epochs": 1, "train_on": "all"})
    assert train(cfg, tmp_path / "run")["leaked"] is True


def test_batch_larger_than_training_set_is_a_clear_error(store_path, tmp_path):
    with pytest.raises(ConfigError, match="training.batch_size = 64"):
        train(make_config(store_path, training={"batch_size": 64}), tmp_path / "run")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        load_checkpoint(tmp_path)


def test_rng_state_round_trip():
    import random

    import numpy as np

    gen = torch.Generator().manual_seed(7)
    state = capture_rng_state({"loader": gen})
    before = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=gen))
    restore_rng_state(state, {"loader": gen})
    after = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=gen))
    torch.testing.assert_close(before[0], after[0])
    assert np.array_equal(before[1], after[1]) and before[2] == after[2]
    torch.testing.assert_close(before[3], after[3])
    with pytest.raises(CheckpointError, match="augment"):
        restore_rng_state(state, {"augment": torch.Generator()})


def test_schedules():
    step = [lr_factor(e, name="step", epochs=30, step_every=10, rate=0.9) for e in range(30)]
    assert step[0] == step[9] == 1.0 and step[10] == pytest.approx(0.9) and step[29] == pytest.approx(0.81)
    cos = [lr_factor(e, name="cosine", epochs=10, rate=0.5) for e in range(11)]
    assert cos[0] == 1.0 and cos[10] == pytest.approx(0.125) and all(a > b for a, b in zip(cos, cos[1:]))
    warm = [lr_factor(e, name="step", epochs=10, step_every=2, rate=0.5, warmup_epochs=4) for e in range(7)]
    assert warm == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.5])
    with pytest.raises(ConfigError, match="linear"):
        lr_factor(0, name="linear", epochs=1)


@pytest.mark.slow
def test_cli_fault_injection_and_resume(store_path, tmp_path, monkeypatch, capsys):
    """The CLI trains; the test-only fault hook kills it once at epoch 2; --resume finishes the run."""
    import os

    import yaml

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(make_config(store_path, training={"epochs": 1})))
    once = tmp_path / "fired"
    env = fault_env({**os.environ, "BRAINAGE_FAULT_KILL_AT_EPOCH": "2", "BRAINAGE_FAULT_ONCE_FILE": str(once)})
    cmd = [sys.executable, "-m", "brainage_core.training", str(config), "training.epochs=2", "--out",
           str(tmp_path / "out"), "--quiet"]
    killed = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert killed.returncode == -9 and once.exists(), (killed.returncode, killed.stderr)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "out" / "metrics.jsonl")] == [1]
    assert (tmp_path / "out" / "config.yaml").exists()
    # The rest runs in-process (same code path as the command line, without another start-up).
    from brainage_core.training.__main__ import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(cmd[3:] + ["--resume"]) == 0
    assert [r["epoch"] for r in read_jsonl(tmp_path / "out" / "metrics.jsonl")] == [1, 2]
    assert load_checkpoint(tmp_path / "out")["epoch"] == 2
    assert main([str(config), "training.nope=1", "--out", str(tmp_path / "bad")]) == 2
    assert "training.nope" in capsys.readouterr().err


def _ddp_worker(rank: int, world_size: int, port: int, cfg: dict, out: str, results: str) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        seen = []
        metrics = train(cfg, out, rank=rank, world_size=world_size,
                        callback=lambda m, d: seen.append([m["epoch"], None if d is None else str(d)]))
        Path(results, f"{rank}.json").write_text(json.dumps({"metrics": metrics, "seen": seen}))
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_gloo_worker()


@pytest.mark.slow
def test_two_rank_ddp_on_gloo(store_path, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = make_config(store_path, training={"epochs": 1, "batch_size": 6}, model={"sync_batchnorm": True})
    mp.spawn(_ddp_worker, args=(2, port, cfg, str(tmp_path / "run"), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "0.json").read_text())
    r1 = json.loads((tmp_path / "1.json").read_text())
    assert r0["metrics"] == r1["metrics"] and r0["metrics"]["epoch"] == 1
    assert r0["seen"] == [[1, str(tmp_path / "run" / "checkpoint")]] and r1["seen"] == [[1, None]]
    state = load_checkpoint(tmp_path / "run")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["generators"]["augment"], state["rng"][1]["generators"]["augment"])
    assert [r["epoch"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1]


def test_store_with_unknown_ages_is_refused_with_a_clear_error(store_path, tmp_path):
    """A store prepared for prediction (require_age=False, NaN ages) cannot be trained or evaluated on."""
    import shutil

    import pandas as pd

    from brainage_core.errors import StoreError

    cohort = tmp_path / "cohort"
    shutil.copytree(store_path.parent / "cohort", cohort)
    table = pd.read_csv(cohort / "participants.tsv", sep="\t", dtype={"participant_id": str})
    blank = table["participant_id"].iloc[[2, 5]].tolist()
    table.loc[table["participant_id"].isin(blank), "age"] = float("nan")
    table.to_csv(cohort / "participants.tsv", sep="\t", index=False)
    store = tmp_path / "store_no_age"
    prepare(cohort, layout="openbhb", out=store, grid="6mm", progress=False, require_age=False)
    with pytest.raises(StoreError) as info:
        train(make_config(store, training={"epochs": 1}), tmp_path / "run")
    message = str(info.value)
    assert str(store) in message and "2 participant(s) without age" in message
    assert all(repr(pid) in message for pid in blank) and "require_age=False" in message
    assert not (tmp_path / "run" / CHECKPOINT_FILE).exists()


def test_epoch_start_hooks_are_called_and_removable(store_path, tmp_path):
    """The library reads no fault variables: callers (the tests) supply epoch-start hooks."""
    from brainage_core.training import loop

    seen = []
    remove = loop.add_epoch_start_hook(lambda epoch, rank: seen.append((epoch, rank)))
    try:
        train(make_config(store_path, training={"epochs": 2}), tmp_path / "a")
    finally:
        remove()
    assert seen == [(1, 0), (2, 0)]
    train(make_config(store_path, training={"epochs": 1}), tmp_path / "b")
    assert seen == [(1, 0), (2, 0)] and loop.EPOCH_START_HOOKS == []
