"""Test-only fault injection, supplied to the library from outside: an epoch-start hook for
``brainage_core.training.loop`` and an after-result hook for the study driver (``study.callback``), driven
by environment variables (the library itself reads none).

- ``BRAINAGE_FAULT_KILL_AT_EPOCH=k``: the process sends itself SIGKILL at the start of epoch ``k``;
- ``BRAINAGE_FAULT_RANK=r``: only rank ``r`` does;
- ``BRAINAGE_FAULT_ONCE_FILE=path``: only if ``path`` does not exist (it is created first, so the restarted
  worker survives);
- ``BRAINAGE_FAULT_SLOW_EPOCH_S=s``: sleep ``s`` seconds at the start of every epoch (long epochs, e.g. to
  check that a stopped trial's run is aborted mid-training);
- ``BRAINAGE_FAULT_KILL_DRIVER_AFTER_RESULTS=n``: a study driver sends itself SIGKILL once it has written its
  n-th result row (a crashed driver).

Processes started by the tests (the training CLI, study drivers, Ray workers) get the hook through
``sitecustomize.py`` beside this file, when this folder is on their ``PYTHONPATH``
(``study_fixtures.fault_env``).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from types import ModuleType

FAULT_KILL_AT_EPOCH = "BRAINAGE_FAULT_KILL_AT_EPOCH"
FAULT_RANK = "BRAINAGE_FAULT_RANK"
FAULT_ONCE_FILE = "BRAINAGE_FAULT_ONCE_FILE"
FAULT_SLOW_EPOCH_S = "BRAINAGE_FAULT_SLOW_EPOCH_S"
FAULT_VARS = (FAULT_KILL_AT_EPOCH, FAULT_RANK, FAULT_ONCE_FILE, FAULT_SLOW_EPOCH_S)
FAULT_KILL_DRIVER_AFTER_RESULTS = "BRAINAGE_FAULT_KILL_DRIVER_AFTER_RESULTS"

log = logging.getLogger("brainage_core.training")


def inject(epoch: int, rank: int) -> None:
    """The epoch-start hook: sleep and/or SIGKILL this process as the environment says."""
    slow = os.environ.get(FAULT_SLOW_EPOCH_S)
    if slow:
        time.sleep(float(slow))
    at = os.environ.get(FAULT_KILL_AT_EPOCH)
    if not at or int(at) != epoch:
        return
    only_rank = os.environ.get(FAULT_RANK)
    if only_rank not in (None, "") and int(only_rank) != rank:
        return
    once = os.environ.get(FAULT_ONCE_FILE)
    if once:
        once_path = Path(once)
        if once_path.exists():
            return
        once_path.parent.mkdir(parents=True, exist_ok=True)
        once_path.write_text(f"killed rank {rank} at epoch {epoch}\n")
    log.warning("fault injection: killing rank %d (pid %d) at the start of epoch %d", rank, os.getpid(), epoch)
    os.kill(os.getpid(), signal.SIGKILL)


def install(loop: ModuleType | None = None) -> None:
    """Register :func:`inject` as an epoch-start hook of the training loop (once)."""
    if loop is None:
        from brainage_core.training import loop
    if inject not in loop.EPOCH_START_HOOKS:
        loop.add_epoch_start_hook(inject)


def kill_driver(written: int) -> None:
    """The after-result hook: SIGKILL this driver once it has written the number of rows the environment says."""
    limit = os.environ.get(FAULT_KILL_DRIVER_AFTER_RESULTS)
    if limit and written >= int(limit):
        print(f"[study] test fault hook: killing the driver after {written} results", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def install_driver(callback: ModuleType | None = None) -> None:
    """Register :func:`kill_driver` as an after-result hook of the study driver (once)."""
    if callback is None:
        from study import callback
    if kill_driver not in callback.AFTER_RESULT_HOOKS:
        callback.add_after_result_hook(kill_driver)
