"""Deterministic trial failures are not retried (issue 12, case 6), checked without starting Ray: the driver's
Tune trial gives up at once on a configuration / data / non-finite-loss error and Train's failure policy does not
restart the worker group for one; other failures are retried as configured."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("ray.tune")

from ray.exceptions import RayTaskError  # noqa: E402
from ray.train import FailureConfig  # noqa: E402
from ray.train.v2.api.exceptions import WorkerGroupError  # noqa: E402
from ray.tune.experiment.trial import Trial  # noqa: E402

import study.run as run_module  # noqa: E402
from brainage_core.errors import ConfigError, NonFiniteLossError  # noqa: E402
from study import compat  # noqa: E402
from study.train_run import _make_failure_policy_class  # noqa: E402
from study.trial import TrialInputError, input_error_of, one_line  # noqa: E402

UserExceptionWithTraceback = compat.user_exception_class()
FailureDecision = compat.failure_policy_classes()[1]


def _trial() -> Trial:
    trial = Trial("__fake", stub=True, max_failures=3)
    trial.storage = SimpleNamespace(trial_driver_staging_path=None)  # no error file to write
    return trial


def test_input_errors_are_found_through_ray_wrappers():
    worker = WorkerGroupError("x", {1: RuntimeError("gloo: connection reset"),
                                    0: UserExceptionWithTraceback(NonFiniteLossError("nan at epoch 1"), "tb")})
    assert isinstance(input_error_of(RayTaskError("run_trial", "tb", worker)), NonFiniteLossError)
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = ConfigError("training.batch_size = 8: only 4 training subjects")
    assert one_line(input_error_of(wrapped)) == "ConfigError: training.batch_size = 8: only 4 training subjects"
    assert input_error_of(RayTaskError("run_trial", "tb", RuntimeError("worker died"))) is None
    # what Tune's result grid holds: a RayTaskError whose class also derives from the cause's; its str() is the
    # whole traceback, the cause is one line
    dual = RayTaskError("run_trial", "Traceback ...\n  File x\n", TrialInputError("NonFiniteLossError: nan"))
    assert one_line(input_error_of(dual.as_instanceof_cause())) == "NonFiniteLossError: nan"
    assert run_module._cause(dual.as_instanceof_cause()) == "NonFiniteLossError: nan"


def test_tune_does_not_retry_a_trial_input_error():
    run_module._no_retry_on_input_errors()
    run_module.INPUT_ERRORS.clear()
    doomed, killed = _trial(), _trial()
    doomed.handle_error(RayTaskError("run_trial", "tb", TrialInputError("NonFiniteLossError: nan")))
    killed.handle_error(RayTaskError("run_trial", "tb", RuntimeError("SIGKILL")))
    assert not doomed.should_recover() and killed.should_recover()
    assert run_module.INPUT_ERRORS == {doomed.trial_id: "NonFiniteLossError: nan"}
    stopper = run_module.DoomedStudyStopper(4)
    assert not stopper.stop_all()  # one trial may just have had bad sampled parameters
    other = _trial()
    other.handle_error(RayTaskError("run_trial", "tb", TrialInputError("NonFiniteLossError: nan")))
    assert stopper.stop_all()  # the same error twice before any result: the study is doomed
    stopper.reported = True
    assert not stopper.stop_all()  # once a trial reported, the others go on
    run_module.INPUT_ERRORS.clear()


def test_train_does_not_restart_workers_for_an_input_error():
    policy = _make_failure_policy_class()(FailureConfig(max_failures=2))
    doomed = WorkerGroupError("x", {0: UserExceptionWithTraceback(ConfigError("bad key"), "tb")})
    died = WorkerGroupError("x", {0: UserExceptionWithTraceback(RuntimeError("worker died"), "tb")})
    assert policy.make_decision(doomed) == FailureDecision.RAISE
    assert policy.make_decision(died) == FailureDecision.RETRY
