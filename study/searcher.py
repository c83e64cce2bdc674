"""Optuna (through Ray Tune's ``OptunaSearch``) and ASHA, wired so that Optuna sees the truth.

What Optuna records (``<study>/optuna.db``, sqlite RDB storage, study name = the study's name):

- a trial that trained all its epochs: COMPLETE with the objective of its last evaluation;
- a trial that ASHA stopped early: PRUNED, with every evaluation it reported as an intermediate value
  (step = ``epoch``), the last one included. Ray's stock ``OptunaSearch`` would record it as COMPLETE
  with its early value, which biases TPE towards configurations that look good after a few epochs;
  TPE instead ranks pruned trials below complete ones by their last intermediate value;
- a trial that errored without reporting: FAIL.

How the pruned ones are recognised: :class:`RecordingASHA` notes every trial it stops before
``max_t`` in :data:`study.compat.EARLY_STOPPED` (both live in the driver process; Tune calls the
scheduler before the searcher), and :class:`StudyOptunaSearch` tells Optuna PRUNED for those. Both
reach ASHA's and OptunaSearch's private state through :mod:`study.compat` only. Intermediate values use
the ``epoch`` metric as the step, not Tune's ``training_iteration`` (which restarts at 1 when a trial
is resumed).

``--optuna-storage`` names another storage (:func:`open_optuna_storage`): an RDB URL shared by several
drivers, or ``journal:PATH``, Optuna's append-only journal file, whose storage keeps the study in the
driver's memory and appends one line per write instead of reading the running trials back from sqlite at
every suggestion (docs/cluster.md, for studies of hundreds of trials).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from brainage_core.errors import ConfigError
from study import compat
from study.compat import EARLY_STOPPED
from study.space import SearchSpace

__all__ = ["EARLY_STOPPED", "JOURNAL_PREFIX", "RecordingASHA", "StudyOptunaSearch", "build_searcher",
           "build_scheduler", "dashboard_target", "journal_path", "open_optuna_storage", "optuna_storage_url"]

#: the prefix of an ``--optuna-storage`` value that names an Optuna journal file (``journal:PATH``)
JOURNAL_PREFIX = "journal:"


class RecordingASHA(ASHAScheduler):
    """ASHA on the reported ``epoch`` that remembers which trials it stopped early."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and result.get(compat.asha_time_attr(self), 0) < compat.asha_max_t(self):
            EARLY_STOPPED.add(trial.trial_id)
        return decision


class StudyOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that steps intermediate values by ``epoch`` and records ASHA stops as PRUNED."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._report_intermediate(trial_id, result)

    def _report_intermediate(self, trial_id: str, result: dict | None) -> None:
        # Optuna keeps no intermediate values for multi-objective studies (ASHA prunes on its own scalar)
        if isinstance(self.metric, list):
            return
        trials = compat.optuna_trials(self)
        if not result or trial_id in compat.optuna_completed(self) or trial_id not in trials:
            return
        value, epoch = result.get(self.metric), result.get("epoch")
        if value is None or epoch is None:
            return
        ot_trial = trials[trial_id]
        # The steps already stored are read from the storage once per trial and driver (a resumed trial's
        # earlier epochs), then tracked here: reading the trial back at every result was a tenth of a
        # 200-trial study's driver time (bench/cluster_sim.py).
        known = self.__dict__.setdefault("_stored_steps", {})
        steps = known.get(trial_id)
        if steps is None:
            steps = known[trial_id] = set(compat.optuna_intermediate_values(ot_trial))
        if int(epoch) not in steps:
            ot_trial.report(float(value), int(epoch))
            steps.add(int(epoch))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        try:
            self._on_trial_complete(trial_id, result, error)
        finally:
            self.__dict__.get("_stored_steps", {}).pop(trial_id, None)

    def _on_trial_complete(self, trial_id: str, result: dict | None, error: bool) -> None:
        trials, completed = compat.optuna_trials(self), compat.optuna_completed(self)
        if trial_id in EARLY_STOPPED and trial_id in trials and trial_id not in completed:
            self._report_intermediate(trial_id, result)
            compat.optuna_study(self).tell(trials[trial_id], state=optuna.trial.TrialState.PRUNED)
            completed.add(trial_id)
            return
        super().on_trial_complete(trial_id, result=result, error=error)


    def restore(self, checkpoint_path: str) -> None:
        """Restore Tune's saved searcher state, then mark FAIL the Optuna trials left RUNNING by a killed
        driver that Tune never recorded (asked for after Tune's last experiment save): they will never
        be told otherwise, and a RUNNING trial misleads the dashboard and the sampler."""
        super().restore(checkpoint_path)
        known = {t.number for t in compat.optuna_trials(self).values()}
        study = compat.optuna_study(self)
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t.number not in known:
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)


def optuna_storage_url(study_dir: str | Path) -> str:
    return f"sqlite:///{Path(study_dir).resolve() / 'optuna.db'}"


def open_optuna_storage(url: str) -> optuna.storages.BaseStorage:
    """The Optuna storage ``url`` names: ``journal:PATH`` a journal file (Optuna's ``JournalFileBackend``
    with the open-file lock that optuna-dashboard uses; created if missing, its folder must exist),
    anything else an RDB URL (``sqlite:///...``, ``postgresql://...``). One ConfigError naming the value
    when a journal's folder does not exist."""
    path = journal_path(url)
    if path is None:
        return optuna.storages.RDBStorage(url)
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


def journal_path(url: str) -> Path | None:
    """The absolute journal file a ``journal:PATH`` storage value names (None for an RDB URL); one ConfigError
    naming the value when PATH is empty, a folder, or in a folder that does not exist."""
    if not url.startswith(JOURNAL_PREFIX):
        return None
    raw = url[len(JOURNAL_PREFIX):]
    path = Path(raw).expanduser().resolve()
    if not raw or path.is_dir() or not path.parent.is_dir():
        raise ConfigError(f"--optuna-storage {url}: expected journal:PATH, PATH a file in an existing folder")
    return path


def dashboard_target(url: str) -> str:
    """What ``optuna-dashboard`` takes for the storage ``url`` (a journal's file path, else the URL)."""
    path = journal_path(url)
    return url if path is None else str(path)


def build_searcher(space: SearchSpace, study_dir: str | Path | None, study_name: str, *,
                   storage_url: str | None = None,
                   storage: optuna.storages.BaseStorage | None = None) -> StudyOptunaSearch:
    """The Optuna searcher of a study: define-by-run space (conditionals), sampler by ``study.searcher``
    seeded with ``study.seed``, storage ``storage_url`` (:func:`open_optuna_storage`; default sqlite at
    ``<study_dir>/optuna.db``), or an Optuna ``storage`` object instead (e.g. ``InMemoryStorage`` for the
    in-process replays of ``bench/search_efficiency.py``; ``study_dir`` may then be None).

    Several ``study.objectives``: metric and mode are lists (Optuna multi-objective: ``nsga2`` is
    NSGA-II, ``tpe`` multi-objective TPE); ASHA prunes on ``study.objective`` (= ``prune_on``)."""
    st = space.study
    if st.searcher == "tpe":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.TPESampler(seed=st.seed)
    elif st.searcher == "nsga2":
        population = {} if st.population_size is None else {"population_size": st.population_size}
        sampler = optuna.samplers.NSGAIISampler(seed=st.seed, **population)
    elif st.searcher == "random":
        sampler = optuna.samplers.RandomSampler(seed=st.seed)
    else:
        sampler = optuna.samplers.GridSampler(space.grid(), seed=st.seed)
    if storage is None:
        storage = open_optuna_storage(storage_url or optuna_storage_url(study_dir))
    if st.multi_objective:
        metric: str | list[str] = list(st.objectives)
        mode: str | list[str] = list(st.modes)
    else:
        metric, mode = st.objective, st.mode
    return StudyOptunaSearch(
        space=space.suggest, metric=metric, mode=mode, sampler=sampler, study_name=study_name,
        storage=storage,
    )


def build_scheduler(space: SearchSpace) -> TrialScheduler:
    """ASHA on ``epoch`` (max_t = training.epochs) when ``study.asha`` is set, else FIFO."""
    asha = space.study.asha
    if asha is None:
        return FIFOScheduler()
    return RecordingASHA(
        time_attr="epoch", metric=space.study.objective, mode=space.study.mode, max_t=space.config.training.epochs,
        grace_period=asha.grace_period, reduction_factor=asha.reduction_factor, brackets=asha.brackets,
    )
