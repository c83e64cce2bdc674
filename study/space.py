"""The search-space YAML: a base experiment configuration plus ``search:`` and ``study:`` blocks.

A search-space file is an experiment YAML (validated by ``brainage_core.config``) with two more
top-level blocks::

    search:                                   # dotted config key -> distribution
      loss.temperature: {loguniform: [0.03, 1.0]}
      loss.threshold_margin: {uniform: [0.0, 10.0]}
      training.batch_size: {int: [16, 64]}     # inclusive bounds
      loss.kernel: {choice: [rbf, cauchy]}
      loss.sigma:                              # conditional on a searched choice
        depends_on: loss.kernel
        cases:
          rbf: {uniform: [0.5, 5.0]}           # sigma of the RBF kernel (years)
          cauchy: {loguniform: [0.01, 1.0]}    # gamma of the Cauchy kernel (1/years^2)
          # a case may also be {fixed: VALUE}; a choice value with no case keeps the base value
      loss.threshold_margin:                   # nested: the parent may itself be conditional,
        depends_on: loss.form                  # and ``when`` adds conditions on other searched keys
        when: {loss.method: [threshold]}       # (key: value or list of values; all must hold)
        cases: {paper: {uniform: [0.0, 10.0]}}
    study:
      num_samples: 20                # trials (grid: omitted or equal to the grid size)
      max_concurrent_trials: 1
      searcher: tpe                  # tpe | nsga2 | random | grid (grid: choice/int/fixed only)
      objective: val_mae_ext         # a validation metric; test_* metrics are never optimised
      mode: min                      # min | max
      # multi-objective instead of objective/mode (Pareto set -> pareto.csv/.parquet):
      # objectives: [val_mae_ext, val_bacc]; modes: [min, min] (default min for each);
      # prune_on: val_lc (the one scalar ASHA prunes on and checkpoints are ranked by; default val_lc)
      asha: {grace_period: 50, reduction_factor: 3, brackets: 1}   # or null: no early stopping
      seed: 0                        # the searcher's seed (training.seed is the trials' seed)
      resources: {num_workers: 1, use_gpu: false, cpus_per_worker: 1}
      max_failures: 2                # restarts of a failed trial / DDP worker group (bounded)
      checkpoints_to_keep: 2         # per trial, best by the objective (the latest is always kept)

Contracts:

- :func:`load_search_space` returns a :class:`SearchSpace` or raises ONE
  :class:`~brainage_core.errors.ConfigError` naming the file and the full key (``search.loss.sigma``,
  ``study.asha.grace_period``...) and what was expected.
- Every searched key must exist in the experiment schema; every bound, choice value and fixed value is
  checked against that key's type and range (``brainage_core.config.check_value``), and the extreme
  configurations of each parameter are validated as whole experiment configs (cross-field rules).
- ``study.asha.grace_period`` is a multiple of ``evaluation.eval_every`` and at most
  ``training.epochs``; ``training.epochs`` is a multiple of ``evaluation.eval_every`` so that the last
  epoch is an evaluation (ASHA's ``max_t`` and the "training finished" test rely on it).
- Optuna parameter names are the dotted keys, or ``key[case]`` for a conditional parameter
  (``loss.sigma[rbf]``); :meth:`SearchSpace.overrides` maps a sampled parameter dict back to the
  dotted config values of one trial.
- A conditional parameter is active when its ``depends_on`` parameter is active, that parameter's value
  has a case, and every ``when`` condition holds; an inactive parameter is not sampled and keeps the
  base value (so method-dependent defaults of ``brainage_core.config`` apply). Every combination of
  choices (with the numeric parameters at their bounds) is validated as a whole experiment config.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from brainage_core import config as cfgmod
from brainage_core.errors import ConfigError
from brainage_core.metrics import ERROR_METRICS, VALIDATION_METRICS

__all__ = [
    "DISTRIBUTIONS",
    "SEARCHERS",
    "VALIDATION_METRICS",
    "Param",
    "Asha",
    "Resources",
    "StudySettings",
    "SearchSpace",
    "load_search_space",
    "parse_search_space",
]

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
SEARCHERS = ("tpe", "nsga2", "random", "grid")
# What the trials report and a study may select on (brainage_core.metrics): the objective is one of
# VALIDATION_METRICS; maximising an error metric is refused.


@dataclass(frozen=True)
class Dist:
    """One distribution: ``kind`` in DISTRIBUTIONS or ``fixed``; ``low``/``high`` inclusive bounds for
    loguniform/uniform/int; ``values`` for choice; ``value`` for fixed."""

    kind: str
    low: float | int | None = None
    high: float | int | None = None
    values: tuple[Any, ...] = ()
    value: Any = None

    def grid_values(self) -> list[Any]:
        if self.kind == "choice":
            return list(self.values)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1))
        raise AssertionError(self.kind)


@dataclass(frozen=True)
class Param:
    """A searched key. Unconditional: ``dist`` set. Conditional: ``depends_on`` (a searched parameter
    whose values are choices or fixed, itself possibly conditional), ``cases`` mapping ``str(its
    value)`` -> Dist, and ``when`` (further conditions: key -> allowed ``str`` values)."""

    key: str
    dist: Dist | None = None
    depends_on: str | None = None
    cases: dict[str, Dist] = field(default_factory=dict)
    when: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def active(self, values: Mapping[str, Any]) -> tuple[Dist | None, str]:
        """(distribution, Optuna name) of this parameter given the values of the active parameters
        before it, or (None, "") when it does not apply."""
        if self.dist is not None:
            return self.dist, self.optuna_name()
        if self.depends_on not in values:
            return None, ""
        for key, allowed in self.when.items():
            if key not in values or str(values[key]) not in allowed:
                return None, ""
        case = str(values[self.depends_on])
        dist = self.cases.get(case)
        return (dist, self.optuna_name(case)) if dist is not None else (None, "")

    def optuna_name(self, case: str | None = None) -> str:
        return self.key if case is None else f"{self.key}[{case}]"


@dataclass(frozen=True)
class Asha:
    grace_period: int
    reduction_factor: float = 3.0
    brackets: int = 1


@dataclass(frozen=True)
class Resources:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0


@dataclass(frozen=True)
class StudySettings:
    num_samples: int
    max_concurrent_trials: int = 1
    searcher: str = "tpe"
    objective: str = "val_mae_ext"
    mode: str = "min"
    asha: Asha | None = None
    seed: int = 0
    resources: Resources = field(default_factory=Resources)
    max_failures: int = 2
    checkpoints_to_keep: int = 2
    #: what the searcher optimises: ``(objective,)`` for a single objective; with several, ``objective``
    #: and ``mode`` are ``prune_on`` and its mode (ASHA, checkpoint ranking, progress table)
    objectives: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["objectives"], d["modes"] = list(self.objectives), list(self.modes)
        return d


@dataclass
class SearchSpace:
    """A validated search space.

    ``base``: the raw experiment dict (search/study removed, CLI overrides applied, env vars expanded
    when asked) — trials apply their parameters to THIS dict so that method-dependent defaults of
    ``brainage_core.config`` still apply; ``config``: ``base`` validated; ``params`` in file order
    (a parent before its dependants); ``source``: the file, for messages.
    """

    base: dict[str, Any]
    config: cfgmod.ExperimentConfig
    params: list[Param]
    study: StudySettings
    source: str
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def param(self, key: str) -> Param:
        return next(p for p in self.params if p.key == key)

    def grid(self) -> dict[str, list[Any]]:
        """Optuna GridSampler's search space (grid searcher only)."""
        return {p.optuna_name(): p.dist.grid_values() for p in self.params if p.dist is not None}

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())

    def suggest(self, trial: Any) -> None:
        """Define-by-run search space for Optuna (``trial.suggest_*``), conditionals included."""
        chosen: dict[str, Any] = {}
        for p in self.params:
            dist, name = p.active(chosen)
            if dist is not None:
                chosen[p.key] = dist.value if dist.kind == "fixed" else _suggest(trial, name, dist)

    def active_values(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """Dotted config values of the parameters that apply to one trial (fixed cases filled in)."""
        values: dict[str, Any] = {}
        for p in self.params:
            dist, name = p.active(values)
            if dist is not None:
                values[p.key] = dist.value if dist.kind == "fixed" else sampled[name]
        return values

    def overrides(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """Dotted config values of one trial from Optuna's sampled parameters (fixed cases filled in).

        A conditional key that does not apply maps to None here (the base value is kept)."""
        values = self.active_values(sampled)
        return {p.key: values.get(p.key) for p in self.params}

    def sampled_from_values(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`overrides`: Optuna-named parameters from dotted values (None or NaN =
        does not apply), e.g. to re-run a trial from its ``param.*`` columns (study/final.py)."""
        active: dict[str, Any] = {}
        sampled: dict[str, Any] = {}
        for p in self.params:
            dist, name = p.active(active)
            value = values.get(p.key)
            if dist is None or value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            if dist.kind == "int":
                value = int(value)
            active[p.key] = value if dist.kind != "fixed" else dist.value
            if dist.kind != "fixed":
                sampled[name] = value
        return sampled

    def trial_dict(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """The experiment dict of one trial: ``base`` with the applying sampled values set."""
        d = cfgmod.plain_copy(self.base)
        for key, value in self.active_values(sampled).items():
            _set(d, key, value)
        return d


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------

_STUDY_KEYS = {f.name for f in dataclasses.fields(StudySettings)} | {"prune_on"}
_ASHA_KEYS = {f.name for f in dataclasses.fields(Asha)}
_RESOURCE_KEYS = {f.name for f in dataclasses.fields(Resources)}


def load_search_space(
    path: str | Path, overrides: Iterable[str] = (), *, expand_env: bool = True
) -> SearchSpace:
    """Read, override and validate a search-space YAML.

    ``overrides``: ``a.b=c`` strings; ``study.*`` keys set the study block, ``search.*`` keys are refused
    (edit the file), every other key goes through ``brainage_core.config.apply_overrides``.
    """
    source = str(path)
    raw = cfgmod.load_yaml(path)
    return parse_search_space(raw, source=source, overrides=overrides, expand_env=expand_env)


def parse_search_space(
    raw: Mapping[str, Any],
    *,
    source: str = "<dict>",
    overrides: Iterable[str] = (),
    expand_env: bool = True,
) -> SearchSpace:
    """Validate a search-space dict (see the module docstring); ConfigError naming ``source`` and the key."""
    raw = cfgmod.plain_copy(dict(raw))
    search_raw = raw.pop("search", None)
    study_raw = raw.pop("study", None)
    base_overrides, study_overrides = [], []
    for o in overrides:
        key = o.partition("=")[0].strip()
        if key.startswith("search.") or key == "search":
            raise ConfigError(f"{source}: override {o!r}: the search block cannot be overridden on the command line")
        (study_overrides if key.startswith("study.") else base_overrides).append(o)
    base = cfgmod.apply_overrides(raw, base_overrides, source=source)
    if expand_env:
        base = cfgmod.expand_env_vars(base, source=source)
    config = cfgmod.config_from_dict(base, source, expand_env=False)
    if search_raw is None or search_raw == {}:
        raise ConfigError(f"{source}: search: missing or empty: expected a mapping of dotted keys to distributions")
    if not isinstance(search_raw, Mapping):
        raise ConfigError(f"{source}: search = {search_raw!r}: expected a mapping of dotted keys to distributions")
    if study_raw is None:
        study_raw = {}
    if not isinstance(study_raw, Mapping):
        raise ConfigError(f"{source}: study = {study_raw!r}: expected a mapping")
    study_raw = _apply_study_overrides(dict(study_raw), study_overrides, source)
    params = _parse_search(search_raw, source)
    study = _parse_study(study_raw, config, params, source)
    space = SearchSpace(base=base, config=config, params=params, study=study, source=source, raw=dict(raw))
    _check_extremes(space)
    if study.searcher == "grid":
        _check_grid(space, study_raw)
    return space


def _apply_study_overrides(study: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    import yaml

    for o in overrides:
        key, _, text = o.partition("=")
        parts = key.strip().split(".")[1:]
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"{source}: override {o!r}: the value is not valid YAML") from None
        node = study
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return study


def _closest(name: str, options: Iterable[str], prefix: str) -> str:
    close = difflib.get_close_matches(name, sorted(options), n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{where} = {value!r}: expected a number")
    try:
        out = float(value)
    except ValueError:
        raise ConfigError(f"{where} = {value!r}: expected a number") from None
    if not math.isfinite(out):
        raise ConfigError(f"{where} = {value!r}: expected a finite number")
    return out


def _parse_dist(key: str, spec: Any, where: str, *, allow_fixed: bool) -> Dist:
    kinds = DISTRIBUTIONS + (("fixed",) if allow_fixed else ())
    expected = "a mapping with one key among " + ", ".join(kinds) + ", e.g. {loguniform: [0.03, 1.0]}"
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(f"{where} = {spec!r}: expected {expected}")
    (kind, args), = spec.items()
    if kind not in kinds:
        raise ConfigError(f"{where}: unknown distribution '{kind}'{_closest(str(kind), kinds, '')}: expected one of "
                          f"{', '.join(kinds)}")
    where_k = f"{where}.{kind}"
    if kind == "fixed":
        return Dist("fixed", value=cfgmod.check_value(key, args, source=where_k))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where_k} = {args!r}: expected a non-empty list of values")
        values = tuple(cfgmod.check_value(key, v, source=where_k) for v in args)
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{where_k} = {args!r}: expected distinct values")
        return Dist("choice", values=values)
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"{where_k} = {args!r}: expected [low, high]")
    info = cfgmod.field_info(key, source=where)
    if kind == "int":
        if info.type is not int:
            raise ConfigError(f"{where_k}: {key} takes {info.expected()}, not an integer range: use uniform/loguniform")
        if any(isinstance(v, bool) or not isinstance(v, int) for v in args):
            raise ConfigError(f"{where_k} = {args!r}: expected two integers [low, high]")
        low, high = args
    else:
        if info.type is not float:
            hint = "int" if info.type is int else "choice"
            raise ConfigError(
                f"{where_k}: {key} takes {info.expected()}, not a real range: use {hint} instead"
            )
        low, high = (_number(v, where_k) for v in args)
    if not low < high:
        raise ConfigError(f"{where_k} = {args!r}: empty range: expected low < high")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where_k} = {args!r}: a log range needs low > 0")
    for v in (low, high):
        cfgmod.check_value(key, v, source=where_k)
    return Dist(kind, low=low, high=high)


def _parse_search(search: Mapping[str, Any], source: str) -> list[Param]:
    params: list[Param] = []
    by_key: dict[str, Param] = {}
    for key, spec in search.items():
        where = f"{source}: search.{key}"
        if not isinstance(key, str):
            raise ConfigError(f"{where}: expected a dotted key such as loss.temperature")
        info = cfgmod.field_info(key, source=f"{source}: search")
        if info.is_section:
            raise ConfigError(f"{where}: {key} is a section ({info.expected()}): expected a value key")
        if isinstance(spec, Mapping) and "depends_on" in spec:
            unknown = set(spec) - {"depends_on", "cases", "when"}
            if unknown or "cases" not in spec:
                raise ConfigError(f"{where}: a conditional parameter takes depends_on, cases and optionally when "
                                  f"(found {', '.join(map(str, spec))})")
            parent_key = spec["depends_on"]
            allowed = _discrete_values(by_key.get(parent_key))
            if allowed is None:
                raise ConfigError(f"{where}.depends_on = {parent_key!r}: expected a searched choice parameter "
                                  f"listed before {key} (choice or fixed values in every case)")
            cases_raw = spec["cases"]
            if not isinstance(cases_raw, Mapping) or not cases_raw:
                raise ConfigError(f"{where}.cases = {cases_raw!r}: expected a mapping of {parent_key} values to "
                                  f"distributions")
            cases: dict[str, Dist] = {}
            for case, case_spec in cases_raw.items():
                if str(case) not in allowed:
                    raise ConfigError(f"{where}.cases.{case}: {case!r} is not a value of {parent_key}: expected one "
                                      f"of {', '.join(sorted(allowed))}")
                cases[str(case)] = _parse_dist(key, case_spec, f"{where}.cases.{case}", allow_fixed=True)
            param = Param(key=key, depends_on=parent_key, cases=cases,
                          when=_parse_when(spec.get("when"), by_key, f"{where}.when"))
        else:
            param = Param(key=key, dist=_parse_dist(key, spec, where, allow_fixed=False))
        params.append(param)
        by_key[key] = param
    return params


def _discrete_values(param: Param | None) -> set[str] | None:
    """The ``str`` values a parameter can take, or None unless every distribution is choice/fixed."""
    if param is None:
        return None
    dists = [param.dist] if param.dist is not None else list(param.cases.values())
    if any(d.kind not in ("choice", "fixed") for d in dists):
        return None
    return {str(v) for d in dists for v in (d.values if d.kind == "choice" else (d.value,))}


def _parse_when(raw: Any, by_key: Mapping[str, Param], where: str) -> dict[str, tuple[str, ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{where} = {raw!r}: expected a mapping of searched choice keys to a value or a list "
                          f"of values, e.g. {{loss.method: [threshold]}}")
    out: dict[str, tuple[str, ...]] = {}
    for key, values in raw.items():
        allowed = _discrete_values(by_key.get(key))
        if allowed is None:
            raise ConfigError(f"{where}.{key}: expected a searched choice parameter listed before")
        values = values if isinstance(values, list) else [values]
        for v in values:
            if str(v) not in allowed:
                raise ConfigError(f"{where}.{key}: {v!r} is not a value of {key}: expected one of "
                                  f"{', '.join(sorted(allowed))}")
        out[str(key)] = tuple(str(v) for v in values)
    return out


def _check_keys(d: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for k in d:
        if k not in allowed:
            raise ConfigError(f"{where}.{k}: unknown key{_closest(str(k), allowed, where.split(': ')[-1] + '.')} "
                              f"(valid keys: {', '.join(sorted(allowed))})")


def _int(d: Mapping[str, Any], key: str, default: Any, where: str, *, minimum: int) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{where}.{key} = {v!r}: expected an integer >= {minimum}")
    return v


def _choice(d: Mapping[str, Any], key: str, default: str, choices: Iterable[str], where: str) -> str:
    v = d.get(key, default)
    choices = tuple(choices)
    if v not in choices:
        raise ConfigError(f"{where}.{key} = {v!r}: expected one of {', '.join(choices)}"
                          f"{_closest(str(v), choices, '')}")
    return v


def _parse_study(
    d: Mapping[str, Any], config: cfgmod.ExperimentConfig, params: list[Param], source: str
) -> StudySettings:
    where = f"{source}: study"
    _check_keys(d, _STUDY_KEYS, where)
    searcher = _choice(d, "searcher", "tpe", SEARCHERS, where)
    num_samples = d.get("num_samples")
    if num_samples is None and searcher != "grid":
        raise ConfigError(f"{where}.num_samples: missing: expected the number of trials (an integer >= 1)")
    if num_samples is not None:
        num_samples = _int(d, "num_samples", None, where, minimum=1)
    objectives, modes = _parse_objectives(d, where)
    if len(objectives) > 1:
        objective = _validation_metric(d, "prune_on", "val_lc", where)
        mode = modes[objectives.index(objective)] if objective in objectives else "min"
    else:
        objective = _validation_metric(d, "objective", "val_mae_ext", where)
        mode = _choice(d, "mode", "min", ("min", "max"), where)
        if objective in ERROR_METRICS and mode != "min":
            raise ConfigError(f"{where}.mode = 'max': {objective} is an error (lower is better): expected min")
        objectives, modes = (objective,), (mode,)
    if config.training.train_on != "train_minus_val":
        raise ConfigError(f"{source}: training.train_on = '{config.training.train_on}': a study selects on "
                          f"validation metrics: expected train_minus_val")
    epochs, every = config.training.epochs, config.evaluation.eval_every
    if epochs % every:
        raise ConfigError(f"{source}: training.epochs = {epochs}: expected a multiple of evaluation.eval_every "
                          f"({every}) so that the last epoch is evaluated")
    asha = None
    asha_raw = d.get("asha")
    if asha_raw is not None:
        if not isinstance(asha_raw, Mapping):
            raise ConfigError(f"{where}.asha = {asha_raw!r}: expected a mapping (grace_period, reduction_factor, "
                              f"brackets) or null")
        _check_keys(asha_raw, _ASHA_KEYS, f"{where}.asha")
        if "grace_period" not in asha_raw:
            raise ConfigError(f"{where}.asha.grace_period: missing: expected a number of epochs, a multiple of "
                              f"evaluation.eval_every ({every})")
        grace = _int(asha_raw, "grace_period", None, f"{where}.asha", minimum=1)
        if grace % every or grace > epochs:
            raise ConfigError(f"{where}.asha.grace_period = {grace}: expected a multiple of evaluation.eval_every "
                              f"({every}) and <= training.epochs ({epochs})")
        rf = asha_raw.get("reduction_factor", 3.0)
        if isinstance(rf, bool) or not isinstance(rf, int | float) or not rf > 1:
            raise ConfigError(f"{where}.asha.reduction_factor = {rf!r}: expected a number > 1")
        asha = Asha(grace, float(rf), _int(asha_raw, "brackets", 1, f"{where}.asha", minimum=1))
    res_raw = d.get("resources") or {}
    if not isinstance(res_raw, Mapping):
        raise ConfigError(f"{where}.resources = {res_raw!r}: expected a mapping (num_workers, use_gpu, "
                          f"cpus_per_worker)")
    _check_keys(res_raw, _RESOURCE_KEYS, f"{where}.resources")
    use_gpu = res_raw.get("use_gpu", False)
    if not isinstance(use_gpu, bool):
        raise ConfigError(f"{where}.resources.use_gpu = {use_gpu!r}: expected true or false")
    cpus = res_raw.get("cpus_per_worker", 1.0)
    if isinstance(cpus, bool) or not isinstance(cpus, int | float) or not cpus > 0:
        raise ConfigError(f"{where}.resources.cpus_per_worker = {cpus!r}: expected a number > 0")
    if use_gpu and config.training.device == "cpu":
        raise ConfigError(f"{source}: training.device = 'cpu' with study.resources.use_gpu = true: expected auto "
                          f"or cuda")
    resources = Resources(_int(res_raw, "num_workers", 1, f"{where}.resources", minimum=1), use_gpu, float(cpus))
    seed = _int(d, "seed", 0, where, minimum=0)
    settings = StudySettings(
        num_samples=num_samples or 0,
        max_concurrent_trials=_int(d, "max_concurrent_trials", 1, where, minimum=1),
        searcher=searcher,
        objective=objective,
        mode=mode,
        asha=asha,
        seed=seed,
        resources=resources,
        max_failures=_int(d, "max_failures", 2, where, minimum=0),
        checkpoints_to_keep=_int(d, "checkpoints_to_keep", 2, where, minimum=1),
        objectives=objectives,
        modes=modes,
    )
    return settings


def _validation_metric(d: Mapping[str, Any], key: str, default: str, where: str) -> str:
    value = d.get(key, default)
    if isinstance(value, str) and value.startswith("test_"):
        raise ConfigError(f"{where}.{key} = '{value}': test metrics are never optimised: expected a "
                          f"validation metric ({', '.join(VALIDATION_METRICS)})")
    return _choice(d, key, default, VALIDATION_METRICS, where)


def _parse_objectives(d: Mapping[str, Any], where: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``objectives``/``modes`` of a multi-objective study (empty tuples when not given); ``prune_on``
    only with several objectives, ``objective``/``mode`` only without."""
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
    names = tuple(_validation_metric({"objectives": v}, "objectives", "", where) for v in raw)
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.objectives = {raw!r}: expected distinct metrics")
    modes_raw = d.get("modes", ["min"] * len(names))
    if not isinstance(modes_raw, list) or len(modes_raw) != len(names):
        raise ConfigError(f"{where}.modes = {modes_raw!r}: expected a list of min/max, one per objective "
                          f"({len(names)})")
    modes = tuple(_choice({"modes": m}, "modes", "min", ("min", "max"), where) for m in modes_raw)
    for name, mode in zip(names, modes):
        if name in ERROR_METRICS and mode != "min":
            raise ConfigError(f"{where}.modes: {name} is an error (lower is better): expected min")
    return names, modes


def _check_grid(space: SearchSpace, study_raw: Mapping[str, Any]) -> None:
    where = f"{space.source}: search"
    for p in space.params:
        dists = [p.dist] if p.dist is not None else list(p.cases.values())
        for dist in dists:
            if dist.kind not in ("choice", "int", "fixed") or (p.dist is None and dist.kind != "fixed"):
                raise ConfigError(f"{where}.{p.key}: the grid searcher takes choice, int (and fixed cases) only: "
                                  f"found {dist.kind}{' in a conditional case' if p.dist is None else ''}")
    size = space.grid_size()
    if study_raw.get("num_samples") is not None and space.study.num_samples != size:
        raise ConfigError(f"{space.source}: study.num_samples = {space.study.num_samples}: the grid has {size} "
                          f"points: expected {size} (or leave num_samples out)")
    space.study = dataclasses.replace(space.study, num_samples=size)


#: at most this many choice combinations are validated (numeric parameters at each bound in each)
_MAX_SKELETONS = 2000


def _extreme_samples(space: SearchSpace) -> list[dict[str, Any]]:
    """Sampled-parameter dicts covering every combination of the choices that apply (walking the
    conditional tree), with the numeric parameters at their low bound, plus, for each combination,
    each numeric parameter at its high bound in turn."""
    skeletons: list[tuple[dict[str, Any], list[tuple[str, Any]]]] = []

    def walk(i: int, values: dict[str, Any], sample: dict[str, Any], highs: list[tuple[str, Any]]) -> None:
        if len(skeletons) >= _MAX_SKELETONS:
            return
        if i == len(space.params):
            skeletons.append((dict(sample), list(highs)))
            return
        p = space.params[i]
        dist, name = p.active(values)
        if dist is None:
            walk(i + 1, values, sample, highs)
            return
        if dist.kind in ("choice", "fixed"):
            for v in (dist.values if dist.kind == "choice" else (dist.value,)):
                if dist.kind == "choice":
                    sample[name] = v
                walk(i + 1, {**values, p.key: v}, sample, highs)
                sample.pop(name, None)
            return
        sample[name] = dist.low
        walk(i + 1, {**values, p.key: dist.low}, sample, [*highs, (name, dist.high)])
        sample.pop(name, None)

    walk(0, {}, {}, [])
    samples = []
    for sample, highs in skeletons:
        samples.append(sample)
        samples.extend({**sample, name: high} for name, high in highs)
    return samples


def _check_extremes(space: SearchSpace) -> None:
    for sample in _extreme_samples(space):
        shown = ", ".join(f"{k}={v!r}" for k, v in space.overrides(sample).items())
        try:
            cfgmod.config_from_dict(space.trial_dict(sample), space.source, expand_env=False)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in the searched configuration {shown})") from None


def _suggest(trial: Any, name: str, d: Dist) -> Any:
    if d.kind == "loguniform":
        return trial.suggest_float(name, d.low, d.high, log=True)
    if d.kind == "uniform":
        return trial.suggest_float(name, d.low, d.high)
    if d.kind == "int":
        return trial.suggest_int(name, int(d.low), int(d.high))
    return trial.suggest_categorical(name, list(d.values))



def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    node = d
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def grid_points(space: SearchSpace) -> list[dict[str, Any]]:
    """Every point of the grid (for messages and tests)."""
    grid = space.grid()
    return [dict(zip(grid, values)) for values in product(*grid.values())]
