"""The ``search:`` block of a search space: distributions and (conditional) parameters.

Every searched key must exist in the experiment schema, and every bound, choice value and fixed value
is checked against that key's type and range by the config's own engine
(``brainage_core.config.check_value`` / ``field_info``); only what is specific to a search space
(the distribution kinds, ``depends_on`` / ``cases`` / ``when``) is checked here. Optuna parameter
names are the dotted keys, or ``key[case]`` for a conditional parameter (``loss.sigma[rbf]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from brainage_core import config as cfgmod
from brainage_core.config.validate import did_you_mean, scalar
from brainage_core.errors import ConfigError

__all__ = ["DISTRIBUTIONS", "Dist", "Param", "parse_search", "suggest"]

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")


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

    def dists(self) -> list[Dist]:
        """Its distribution, or the distributions of its cases."""
        return [self.dist] if self.dist is not None else list(self.cases.values())


def suggest(trial: Any, name: str, d: Dist) -> Any:
    """One value of ``d`` from an Optuna trial (``trial.suggest_*``) under the parameter name ``name``."""
    if d.kind == "loguniform":
        return trial.suggest_float(name, d.low, d.high, log=True)
    if d.kind == "uniform":
        return trial.suggest_float(name, d.low, d.high)
    if d.kind == "int":
        return trial.suggest_int(name, int(d.low), int(d.high))
    return trial.suggest_categorical(name, list(d.values))


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


def _parse_range(key: str, kind: str, args: Any, where: str) -> Dist:
    """``{uniform|loguniform|int: [low, high]}`` for config key ``key``; ``where`` names it in messages."""
    where_k = f"{where}.{kind}"
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
            raise ConfigError(f"{where_k}: {key} takes {info.expected()}, not a real range: use {hint} instead")
        low, high = (scalar(v, float, where_k) for v in args)
    if not low < high:
        raise ConfigError(f"{where_k} = {args!r}: empty range: expected low < high")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where_k} = {args!r}: a log range needs low > 0")
    for v in (low, high):
        cfgmod.check_value(key, v, source=where_k)
    return Dist(kind, low=low, high=high)


def _parse_dist(key: str, spec: Any, where: str, *, allow_fixed: bool) -> Dist:
    kinds = DISTRIBUTIONS + (("fixed",) if allow_fixed else ())
    expected = "a mapping with one key among " + ", ".join(kinds) + ", e.g. {loguniform: [0.03, 1.0]}"
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(f"{where} = {spec!r}: expected {expected}")
    (kind, args), = spec.items()
    if kind not in kinds:
        raise ConfigError(f"{where}: unknown distribution '{kind}'{did_you_mean(str(kind), kinds)}: expected one of "
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
    return _parse_range(key, kind, args, where)


def _discrete_values(param: Param | None) -> set[str] | None:
    """The ``str`` values a parameter can take, or None unless every distribution is choice/fixed."""
    if param is None:
        return None
    dists = param.dists()
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


def _parse_conditional(key: str, spec: Mapping[str, Any], by_key: Mapping[str, Param], where: str) -> Param:
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
    return Param(key=key, depends_on=parent_key, cases=cases,
                 when=_parse_when(spec.get("when"), by_key, f"{where}.when"))


def parse_search(search: Mapping[str, Any], source: str) -> list[Param]:
    """The parameters of a ``search:`` mapping, in file order; ConfigError naming ``source`` and the key."""
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
            param = _parse_conditional(key, spec, by_key, where)
        else:
            param = Param(key=key, dist=_parse_dist(key, spec, where, allow_fixed=False))
        params.append(param)
        by_key[key] = param
    return params
