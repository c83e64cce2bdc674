"""The validation engine: one way to check a YAML-like tree against a schema of dataclasses.

A schema is a tree of dataclasses whose fields carry their constraints (:func:`setting`): the base type
from the annotation (``int``, ``float``, ``bool``, ``str``, or a nested dataclass for a section;
``X | None`` allows null), and ``choices`` and/or numeric bounds ``gt``/``ge``/``lt``/``le`` from the
field's metadata. The experiment config (``brainage_core.config.schema``) and the study block of a
search space (``study.space.settings``) are both such schemas, and both are checked here.

Contracts:

- :func:`build` turns a mapping into the dataclass, each value converted (an int for a float key
  becomes a float; numeric text such as ``"1e-4"``, which PyYAML's YAML 1.1 reads as a string, is
  accepted for a float key); a field without a default is required.
- :func:`lookup` finds the :class:`FieldInfo` of a dotted key below a root dataclass.
- Every mistake raises ONE :class:`~brainage_core.errors.ConfigError` line:
  ``<source>: <dotted key> = <value>[ is out of range | is not finite]: expected <what>`` for a bad
  value, ``<source>: unknown key '<dotted key>'; did you mean '<closest>'? (valid keys of <section>:
  ...)`` for an unknown key (:func:`did_you_mean` is the one did-you-mean helper of the project's
  validation), ``<source>: <dotted key>: missing: expected <what>`` for a required key left out.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from brainage_core.errors import ConfigError

__all__ = ["FieldInfo", "build", "check", "check_known_keys", "did_you_mean", "field_names", "info_of",
           "invalid", "lookup", "scalar", "section", "setting", "where"]


# --------------------------------------------------------------------------------------------------
# Declaring a schema
# --------------------------------------------------------------------------------------------------


def _constraints(
    choices: Sequence[Any] | None = None,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> dict[str, Any]:
    return {"choices": tuple(choices) if choices is not None else None, "gt": gt, "ge": ge, "lt": lt, "le": le}


def setting(
    default: Any = dataclasses.MISSING,
    *,
    choices: Sequence[Any] | None = None,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> Any:
    """A schema field: its default (none: the key is required), allowed ``choices`` and/or bounds."""
    return field(default=default, metadata=_constraints(choices, gt, ge, lt, le))


def section(cls: type) -> Any:
    """A schema field holding a nested section that defaults to ``cls()``."""
    return field(default_factory=cls, metadata=_constraints())


# --------------------------------------------------------------------------------------------------
# Reading a schema
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldInfo:
    """What the schema says about one dotted key.

    ``type`` is the base type (``int``, ``float``, ``bool``, ``str`` or a section dataclass);
    ``optional`` whether null is allowed; ``required`` whether the key has no default;
    ``choices``/bounds as validated.
    """

    key: str
    type: type
    optional: bool
    default: Any
    choices: tuple[Any, ...] | None = None
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    required: bool = False

    @property
    def is_section(self) -> bool:
        return dataclasses.is_dataclass(self.type)

    def expected(self) -> str:
        """Human-readable statement of the accepted values, used in error messages."""
        if self.is_section:
            text = f"a mapping with keys {', '.join(field_names(self.type))}"
        elif self.choices is not None:
            text = "one of " + ", ".join(str(c) for c in self.choices)
        else:
            text = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[self.type]
            bounds = [f"{op} {bound:g}" for op, bound in
                      ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le)) if bound is not None]
            if bounds:
                text += " " + " and ".join(bounds)
        if self.optional:
            text += " (or null)"
        return text


def field_names(cls: type) -> list[str]:
    """The keys of a section, in declaration order."""
    return [f.name for f in dataclasses.fields(cls)]


_HINTS_CACHE: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS_CACHE:
        _HINTS_CACHE[cls] = typing.get_type_hints(cls)
    return _HINTS_CACHE[cls]


def _unwrap(annotation: Any) -> tuple[type, bool]:
    """``int | None`` -> (int, True); ``float`` -> (float, False)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:  # pragma: no cover - no schema has such a field
            raise TypeError(f"unsupported annotation {annotation!r}")
        return args[0], True
    return annotation, False


def info_of(cls: type, name: str, prefix: str = "") -> FieldInfo:
    """The :class:`FieldInfo` of field ``name`` of section ``cls``, keyed ``prefix + name``."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    base, optional = _unwrap(_hints(cls)[name])
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    default = f.default if f.default is not dataclasses.MISSING else None
    return FieldInfo(key=f"{prefix}{name}", type=base, optional=optional, default=default, required=required,
                     **dict(f.metadata))


def did_you_mean(name: str, options: Iterable[str], prefix: str = "") -> str:
    """``"; did you mean 'loss.temperature'?"`` for the closest option (difflib), or ``""``."""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def where(source: str | None) -> str:
    """The ``"<source>: "`` prefix of a message (empty without a source)."""
    return f"{source}: " if source else ""


def _unknown_key(source: str | None, prefix: str, name: str, names: Sequence[str]) -> ConfigError:
    of = f" of {prefix[:-1]}" if prefix else ""
    return ConfigError(f"{where(source)}unknown key '{prefix}{name}'{did_you_mean(name, names, prefix)} "
                       f"(valid keys{of}: {', '.join(names)})")


def lookup(root: type, dotted_key: str, *, source: str | None = None) -> FieldInfo:
    """The schema entry for ``dotted_key`` below section ``root`` (e.g. ``loss.temperature``).

    Raises ConfigError naming the first unknown component and the closest valid key.
    """
    if not isinstance(dotted_key, str) or not dotted_key or any(not p for p in dotted_key.split(".")):
        raise ConfigError(f"{where(source)}invalid key {dotted_key!r}: expected a dotted path like 'loss.sigma'")
    cls, info = root, None
    parts = dotted_key.split(".")
    for i, part in enumerate(parts):
        if info is not None and not info.is_section:
            raise ConfigError(f"{where(source)}unknown key '{dotted_key}': '{info.key}' is a value "
                              f"({info.expected()}), not a section")
        prefix = ".".join(parts[:i]) + "." if i else ""
        names = field_names(cls)
        if part not in names:
            raise _unknown_key(source, prefix, part, names)
        info = info_of(cls, part, prefix)
        if info.is_section:
            cls = info.type
    assert info is not None
    return info


# --------------------------------------------------------------------------------------------------
# Checking values
# --------------------------------------------------------------------------------------------------


def invalid(source: str | None, key: str, value: Any, expected: str, why: str = "") -> ConfigError:
    """The one-line error ``<source>: <key> = <value><why>: expected <expected>``."""
    shown = repr(value) if not isinstance(value, str) else f"'{value}'"
    return ConfigError(f"{where(source)}{key} = {shown}{why}: expected {expected}")


def _as_number(value: Any, info: FieldInfo, key: str, source: str | None) -> Any:
    """An int for an int key, a finite float for a float key (numeric text accepted), else ConfigError."""
    if info.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(source, key, value, info.expected())
        return value
    if isinstance(value, str):
        try:  # PyYAML (YAML 1.1) reads "1e-4" (no dot) as a string: accept numeric text.
            out = float(value)
        except ValueError:
            raise invalid(source, key, value, info.expected()) from None
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(source, key, value, info.expected())
    else:
        out = float(value)
    if not math.isfinite(out):
        raise invalid(source, key, value, info.expected(), " is not finite")
    return out


def _convert_scalar(value: Any, info: FieldInfo, key: str, source: str | None) -> Any:
    t = info.type
    if t is bool or t is str:
        if not isinstance(value, t):
            raise invalid(source, key, value, info.expected())
        out = value
    elif t in (int, float):
        out = _as_number(value, info, key, source)
    else:  # pragma: no cover - no schema has other scalar types
        raise TypeError(t)
    if info.choices is not None and out not in info.choices:
        raise ConfigError(f"{where(source)}{key} = '{out}': expected {info.expected()}"
                          f"{did_you_mean(str(out), map(str, info.choices))}")
    if t in (int, float) and (
        (info.gt is not None and not out > info.gt)
        or (info.ge is not None and not out >= info.ge)
        or (info.lt is not None and not out < info.lt)
        or (info.le is not None and not out <= info.le)
    ):
        raise invalid(source, key, value, info.expected(), " is out of range")
    return out


def check(info: FieldInfo, value: Any, key: str | None = None, source: str | None = None) -> Any:
    """``value`` checked against ``info`` and converted; a section's mapping is built into its dataclass.

    ``key`` (default ``info.key``) is the dotted key the message names."""
    key = info.key if key is None else key
    if value is None:
        if info.optional:
            return None
        raise invalid(source, key, value, info.expected())
    if info.is_section:
        if not isinstance(value, Mapping):
            raise invalid(source, key, value, info.expected())
        return build(info.type, value, key + ".", source)
    return _convert_scalar(value, info, key, source)


def scalar(
    value: Any,
    type_: type,
    key: str,
    source: str | None = None,
    *,
    optional: bool = False,
    **constraints: Any,
) -> Any:
    """One value checked as if it were a schema key ``key`` of type ``type_`` with ``constraints``
    (``choices``, ``gt``, ``ge``, ``lt``, ``le``, as for :func:`setting`)."""
    info = FieldInfo(key=key, type=type_, optional=optional, default=None, **_constraints(**constraints))
    return check(info, value, key, source)


def check_known_keys(d: Mapping[Any, Any], names: Sequence[str], prefix: str = "", source: str | None = None) -> None:
    """ConfigError naming the first key of ``d`` not in ``names`` (with the closest one)."""
    for k in d:
        if not isinstance(k, str) or k not in names:
            raise _unknown_key(source, prefix, str(k), names)


def build(cls: type, d: Mapping[str, Any], prefix: str = "", source: str | None = None) -> Any:
    """Section ``cls`` from mapping ``d`` (keys of ``d`` named ``prefix + key`` in messages); missing
    keys take their defaults, a missing required key is an error."""
    names = field_names(cls)
    check_known_keys(d, names, prefix, source)
    kwargs = {}
    for name in names:
        info = info_of(cls, name, prefix)
        if name in d:
            kwargs[name] = check(info, d[name], info.key, source)
        elif info.required:
            raise ConfigError(f"{where(source)}{info.key}: missing: expected {info.expected()}")
    return cls(**kwargs)
