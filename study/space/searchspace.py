"""A validated search space (:class:`SearchSpace`) and the functions that read one.

:func:`parse_search_space` splits the file into the base experiment config (validated by
``brainage_core.config``, command-line overrides applied), the ``search:`` block (``params.py``) and the
``study:`` block (``settings.py``), then validates the extreme configurations of the space as whole
experiment configs: every combination of the choices that apply (walking the conditional tree), with
the numeric parameters at their bounds, goes through ``config_from_dict`` (the cross-field rules).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from brainage_core import config as cfgmod
from brainage_core.config.overrides import override_value, split_override
from brainage_core.config.tree import set_dotted
from brainage_core.errors import ConfigError
from study.space.params import Param, parse_search, suggest
from study.space.settings import StudySettings, parse_study

__all__ = ["SearchSpace", "grid_points", "load_search_space", "parse_search_space"]


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
                chosen[p.key] = dist.value if dist.kind == "fixed" else suggest(trial, name, dist)

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
            set_dotted(d, key, value)
        return d


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
    """Validate a search-space dict (see ``study/space/__init__.py``); ConfigError naming ``source`` and the key."""
    raw = cfgmod.plain_copy(dict(raw))
    search_raw = raw.pop("search", None)
    study_raw = raw.pop("study", None)
    base_overrides, study_overrides = _split_overrides(overrides, source)
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
    params = parse_search(search_raw, source)
    study = parse_study(study_raw, config, source)
    space = SearchSpace(base=base, config=config, params=params, study=study, source=source, raw=dict(raw))
    _check_extremes(space)
    if study.searcher == "grid":
        _check_grid(space, study_raw)
    return space


def _split_overrides(overrides: Iterable[str], source: str) -> tuple[list[str], list[str]]:
    """(experiment overrides, ``study.*`` overrides); ConfigError for a ``search.*`` one."""
    base_overrides, study_overrides = [], []
    for o in overrides:
        key = o.partition("=")[0].strip()
        if key.startswith("search.") or key == "search":
            raise ConfigError(f"{source}: override {o!r}: the search block cannot be overridden on the command line")
        (study_overrides if key.startswith("study.") else base_overrides).append(o)
    return base_overrides, study_overrides


def _apply_study_overrides(study: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """``study`` with each ``study.a.b=c`` override set (the values are checked with the block)."""
    for o in overrides:
        key, text = split_override(o, source=source)
        set_dotted(study, key.partition(".")[2], override_value(o, text, source=source))
    return study


def _check_grid(space: SearchSpace, study_raw: Mapping[str, Any]) -> None:
    where = f"{space.source}: search"
    for p in space.params:
        for dist in p.dists():
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


def grid_points(space: SearchSpace) -> list[dict[str, Any]]:
    """Every point of the grid (for messages and tests)."""
    grid = space.grid()
    return [dict(zip(grid, values)) for values in product(*grid.values())]
