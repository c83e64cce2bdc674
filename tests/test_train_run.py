"""study.train_run without a Ray cluster: a finished DDP run's trial waits until Tune has its last report."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from study import train_run


class FakeQueue:
    """The run's report queue as ``_wait_for_handover`` sees it: full for ``full_polls`` looks, then empty."""

    def __init__(self, full_polls: int | None):
        self.full_polls, self.polls = full_polls, 0

    def empty(self) -> bool:
        self.polls += 1
        return self.full_polls is not None and self.polls > self.full_polls


class GoneQueue:
    def empty(self) -> bool:
        raise ConnectionError("the queue's actor died")


@pytest.fixture
def trainer_with(monkeypatch):
    """``trainer_with(*queues)``: a stand-in trainer whose callbacks are a reporter per queue and one other callback."""
    reporter_class = train_run._make_reporter_class()
    monkeypatch.setattr(train_run.compat, "report_queue", lambda callback: callback.queue)

    def make(*queues):
        reporters = []
        for queue in queues:
            reporter = object.__new__(reporter_class)  # no Tune session here: its __init__ needs one
            reporter.queue = queue
            reporters.append(reporter)
        return SimpleNamespace(run_config=SimpleNamespace(callbacks=[object(), *reporters]))

    return make


def test_returns_once_the_last_report_is_taken(trainer_with, monkeypatch):
    monkeypatch.setattr(train_run, "STOP_POLL_S", 0.01)
    queue = FakeQueue(full_polls=3)
    started = time.monotonic()
    train_run._wait_for_handover(trainer_with(queue), timeout=30)
    assert queue.polls == 4 and time.monotonic() - started < 5


def test_gives_up_after_the_timeout_and_on_a_dead_queue(trainer_with, monkeypatch):
    monkeypatch.setattr(train_run, "STOP_POLL_S", 0.01)
    stuck = FakeQueue(full_polls=None)
    started = time.monotonic()
    train_run._wait_for_handover(trainer_with(stuck, GoneQueue()), timeout=0.2)
    assert 0.2 <= time.monotonic() - started < 5 and stuck.polls > 1
    train_run._wait_for_handover(trainer_with(GoneQueue()), timeout=30)  # returns at once
    train_run._wait_for_handover(SimpleNamespace(run_config=SimpleNamespace(callbacks=None)))  # no reporter
