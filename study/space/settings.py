"""The ``study:`` block of a search space: searcher, objective(s), ASHA, resources, budgets.

The block's keys are a schema like the experiment config's (:class:`Asha`, :class:`Resources` and
:class:`StudySettings` declare their types, ranges and defaults with
``brainage_core.config.validate.setting``) and are checked by the same engine, so a bad value or an
unknown key reads exactly like one in the config (``<file>: study.asha.brackets = 0 is out of range:
expected an integer >= 1``). What is specific to a study is checked here: the objective is a
validation metric (``test_*`` metrics are never optimised, an error metric is never maximised), the
multi-objective keys go together, ``study.asha.grace_period`` is a multiple of
``evaluation.eval_every`` and at most ``training.epochs``, and ``training.epochs`` is a multiple of
``evaluation.eval_every`` so that the last epoch is an evaluation (ASHA's ``max_t`` and the "training
finished" test rely on it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from brainage_core import config as cfgmod
from brainage_core.config.validate import check, check_known_keys, field_names, info_of, section, setting
from brainage_core.errors import ConfigError
from brainage_core.metrics import ERROR_METRICS, VALIDATION_METRICS

__all__ = ["MODES", "SEARCHERS", "Asha", "Resources", "StudySettings", "parse_study"]

SEARCHERS = ("tpe", "nsga2", "random", "grid")
MODES = ("min", "max")


@dataclass(frozen=True)
class Asha:
    grace_period: int = setting(ge=1)  # required: epochs, a multiple of evaluation.eval_every
    reduction_factor: float = setting(3.0, gt=1.0)
    brackets: int = setting(1, ge=1)


@dataclass(frozen=True)
class Resources:
    num_workers: int = setting(1, ge=1)
    use_gpu: bool = setting(False)
    cpus_per_worker: float = setting(1.0, gt=0.0)


@dataclass(frozen=True)
class StudySettings:
    num_samples: int = setting(ge=1)  # required, except for the grid searcher (the grid's size)
    max_concurrent_trials: int = setting(1, ge=1)
    searcher: str = setting("tpe", choices=SEARCHERS)
    objective: str = setting("val_mae_ext", choices=VALIDATION_METRICS)
    mode: str = setting("min", choices=MODES)
    asha: Asha | None = setting(None)
    seed: int = setting(0, ge=0)  # the searcher's seed (training.seed is the trials' seed)
    #: NSGA-II only: trials per generation (Optuna's default 50). Its first generation is random search, so
    #: NSGA-II searches only when num_samples is several times this (docs/search-efficiency.md)
    population_size: int | None = setting(None, ge=2)
    resources: Resources = section(Resources)
    max_failures: int = setting(2, ge=0)
    checkpoints_to_keep: int = setting(2, ge=1)
    #: Tune's per-trial loggers (result.json, progress.csv, TensorBoard events under tune/). Off
    #: (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS) halves the driver's CPU and memory per trial in studies of
    #: hundreds of short trials (docs/cluster-sim.md); results.parquet holds every result either way
    tune_loggers: bool = setting(True)
    #: what the searcher optimises: ``(objective,)`` for a single objective; with several, ``objective``
    #: and ``mode`` are ``prune_on`` and its mode (ASHA, checkpoint ranking, progress table)
    objectives: tuple[str, ...] = field(default=())
    modes: tuple[str, ...] = field(default=())

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["objectives"], d["modes"] = list(self.objectives), list(self.modes)
        return d


#: the keys of a ``study:`` block (``prune_on`` is read into ``objective`` of a multi-objective study)
STUDY_KEYS: tuple[str, ...] = (*field_names(StudySettings), "prune_on")


def _value(d: Mapping[str, Any], name: str, source: str, *, like: str | None = None) -> Any:
    """``d[name]`` checked as the StudySettings field ``like`` (default ``name``), or that field's default."""
    info = info_of(StudySettings, like or name, "study.")
    if name not in d:
        return info.default
    return check(info, d[name], f"study.{name}", source)


def _metric(d: Mapping[str, Any], name: str, source: str, default: str | None = None) -> str:
    """A validation metric under ``study.<name>`` (``test_*`` refused), ``default`` when absent."""
    value = d.get(name, default)
    if isinstance(value, str) and value.startswith("test_"):
        raise ConfigError(f"{source}: study.{name} = '{value}': test metrics are never optimised: expected a "
                          f"validation metric ({', '.join(VALIDATION_METRICS)})")
    return check(info_of(StudySettings, "objective"), value, f"study.{name}", source)


def _parse_objectives(d: Mapping[str, Any], source: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``objectives``/``modes`` of a multi-objective study (empty tuples when not given); ``prune_on``
    only with several objectives, ``objective``/``mode`` only without."""
    where = f"{source}: study"
    raw = d.get("objectives")
    if raw is None:
        for key in ("modes", "prune_on"):
            if key in d:
                raise ConfigError(f"{where}.{key}: only for a multi-objective study: expected study.objectives "
                                  f"(a list of validation metrics) as well")
        return (), ()
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}.objectives = {raw!r}: expected a list of validation metrics, e.g. "
                          f"[val_mae_ext, val_bacc]")
    for key in ("objective", "mode"):
        if key in d:
            raise ConfigError(f"{where}.{key}: give either objective/mode or objectives/modes (with prune_on "
                              f"for ASHA), not both")
    names = tuple(_metric({"objectives": v}, "objectives", source) for v in raw)
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.objectives = {raw!r}: expected distinct metrics")
    modes_raw = d.get("modes", ["min"] * len(names))
    if not isinstance(modes_raw, list) or len(modes_raw) != len(names):
        raise ConfigError(f"{where}.modes = {modes_raw!r}: expected a list of min/max, one per objective "
                          f"({len(names)})")
    modes = tuple(_value({"modes": m}, "modes", source, like="mode") for m in modes_raw)
    for name, mode in zip(names, modes):
        if name in ERROR_METRICS and mode != "min":
            raise ConfigError(f"{where}.modes: {name} is an error (lower is better): expected min")
    return names, modes


def _objective_and_mode(d: Mapping[str, Any], source: str) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
    """(objective, mode, objectives, modes): the scalar ASHA prunes on and what the searcher optimises."""
    objectives, modes = _parse_objectives(d, source)
    if len(objectives) > 1:
        objective = _metric(d, "prune_on", source, "val_lc")
        mode = modes[objectives.index(objective)] if objective in objectives else "min"
        return objective, mode, objectives, modes
    objective = _metric(d, "objective", source, "val_mae_ext")
    mode = _value(d, "mode", source)
    if objective in ERROR_METRICS and mode != "min":
        raise ConfigError(f"{source}: study.mode = 'max': {objective} is an error (lower is better): expected min")
    return objective, mode, (objective,), (mode,)


def _check_config_for_study(config: cfgmod.ExperimentConfig, source: str) -> None:
    if config.training.train_on != "train_minus_val":
        raise ConfigError(f"{source}: training.train_on = '{config.training.train_on}': a study selects on "
                          f"validation metrics: expected train_minus_val")
    epochs, every = config.training.epochs, config.evaluation.eval_every
    if epochs % every:
        raise ConfigError(f"{source}: training.epochs = {epochs}: expected a multiple of evaluation.eval_every "
                          f"({every}) so that the last epoch is evaluated")


def _parse_asha(d: Mapping[str, Any], config: cfgmod.ExperimentConfig, source: str) -> Asha | None:
    epochs, every = config.training.epochs, config.evaluation.eval_every
    raw = d.get("asha")
    if isinstance(raw, Mapping) and "grace_period" not in raw:
        check_known_keys(raw, field_names(Asha), "study.asha.", source)
        raise ConfigError(f"{source}: study.asha.grace_period: missing: expected a number of epochs, a multiple of "
                          f"evaluation.eval_every ({every})")
    asha = _value(d, "asha", source)
    if asha is not None and (asha.grace_period % every or asha.grace_period > epochs):
        raise ConfigError(f"{source}: study.asha.grace_period = {asha.grace_period}: expected a multiple of "
                          f"evaluation.eval_every ({every}) and <= training.epochs ({epochs})")
    return asha


def _parse_resources(d: Mapping[str, Any], config: cfgmod.ExperimentConfig, source: str) -> Resources:
    resources = _value({"resources": d.get("resources") or {}}, "resources", source)  # null: the defaults
    if resources.use_gpu and config.training.device == "cpu":
        raise ConfigError(f"{source}: training.device = 'cpu' with study.resources.use_gpu = true: expected auto "
                          f"or cuda")
    return resources


def parse_study(d: Mapping[str, Any], config: cfgmod.ExperimentConfig, source: str) -> StudySettings:
    """The validated ``study:`` block of a search space whose experiment config is ``config``.

    ``num_samples`` is 0 when the grid searcher leaves it out (the caller sets the grid's size)."""
    check_known_keys(d, STUDY_KEYS, "study.", source)
    searcher = _value(d, "searcher", source)
    if d.get("num_samples") is None and searcher != "grid":
        raise ConfigError(f"{source}: study.num_samples: missing: expected the number of trials (an integer >= 1)")
    num_samples = _value(d, "num_samples", source) if d.get("num_samples") is not None else 0
    objective, mode, objectives, modes = _objective_and_mode(d, source)
    _check_config_for_study(config, source)
    population_size = _value(d, "population_size", source)
    if population_size is not None and searcher != "nsga2":
        raise ConfigError(f"{source}: study.population_size = {population_size}: only for study.searcher: nsga2 "
                          f"(this study's searcher is {searcher})")
    return StudySettings(
        num_samples=num_samples,
        max_concurrent_trials=_value(d, "max_concurrent_trials", source),
        searcher=searcher,
        objective=objective,
        mode=mode,
        asha=_parse_asha(d, config, source),
        seed=_value(d, "seed", source),
        population_size=population_size,
        resources=_parse_resources(d, config, source),
        max_failures=_value(d, "max_failures", source),
        checkpoints_to_keep=_value(d, "checkpoints_to_keep", source),
        tune_loggers=_value(d, "tune_loggers", source),
        objectives=objectives,
        modes=modes,
    )
