"""Dotted ``key=value`` overrides (the command line's ``a.b=c``) applied to a config dict.

Contracts: :func:`split_override` checks the syntax and returns ``(key, text)``; :func:`override_value`
parses the text as YAML (empty text: null); :func:`parse_override` also checks the key against the
experiment schema; :func:`apply_overrides` returns a copy of the dict with each value checked against its key's type and
range and set. Every mistake is ONE ConfigError naming the source and the override.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from brainage_core.config.schema import check_value, field_info
from brainage_core.config.tree import plain_copy, set_dotted
from brainage_core.config.validate import where
from brainage_core.errors import ConfigError

__all__ = ["apply_overrides", "override_value", "parse_override", "split_override"]

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def split_override(override: str, *, source: str | None = None) -> tuple[str, str]:
    """``"a.b=c"`` -> (``"a.b"``, ``"c"``); ConfigError unless the key is a dotted path."""
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(f"{where(source)}override {override!r}: expected 'dotted.key=value', e.g. 'loss.sigma=2'")
    key, _, text = override.partition("=")
    key = key.strip()
    if not _DOTTED.fullmatch(key):
        raise ConfigError(
            f"{where(source)}override {override!r}: the key '{key}' is not a dotted path: expected "
            f"'dotted.key=value', e.g. 'loss.sigma=2'"
        )
    return key, text


def override_value(override: str, text: str, *, source: str | None = None) -> Any:
    """The YAML value of an override's text (empty text: null); ConfigError naming the override if invalid."""
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where(source)}override {override!r}: the value is not valid YAML ({exc})") from None


def parse_override(override: str, *, source: str | None = None) -> tuple[str, Any]:
    """``"a.b=c"`` -> (``"a.b"``, value converted to the field's type). ConfigError on bad syntax/key/value."""
    key, text = split_override(override, source=source)
    info = field_info(key, source=f"{where(source)}override {override!r}")
    value = override_value(override, text, source=source)
    if info.type is str and value is not None and not isinstance(value, str):
        value = text.strip()  # e.g. data.store=2024 is the folder "2024", not an int
    return key, value


def apply_overrides(d: Mapping[str, Any] | None, overrides: Iterable[str], *, source: str | None = None) -> dict:
    """A copy of ``d`` with each ``"a.b=c"`` override set (intermediate sections created as needed).

    Keys are checked against the schema (unknown key -> ConfigError with the closest valid key); the
    value is parsed as a YAML scalar and checked against the field's type and range.
    """
    out: dict[str, Any] = plain_copy(d or {})
    for override in overrides:
        key, value = parse_override(override, source=source)
        # Validate the value now so that the error names the override, not a later config line.
        checked = check_value(key, value, source=f"{where(source)}override {override!r}")
        if not dataclasses.is_dataclass(checked):
            value = checked
        set_dotted(out, key, value)
    return out
