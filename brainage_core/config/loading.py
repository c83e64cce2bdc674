"""Reading an experiment YAML and validating a dict into an :class:`ExperimentConfig`.

The order is fixed: read (``yaml.safe_load``) -> dotted overrides -> ``${VAR}`` expansion ->
method-dependent defaults (``rules.py``) -> the key-by-key check of the schema (``validate.py``) ->
the cross-field rules (``rules.py``). Every mistake is ONE ConfigError naming the file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from brainage_core.config.env import expand_env_vars
from brainage_core.config.overrides import apply_overrides
from brainage_core.config.rules import check_cross_fields, method_defaults
from brainage_core.config.schema import ExperimentConfig
from brainage_core.config.validate import build, where
from brainage_core.errors import ConfigError

__all__ = ["config_from_dict", "load_config", "load_yaml"]


def config_from_dict(
    d: Mapping[str, Any] | None,
    source: str = "<dict>",
    *,
    expand_env: bool = True,
    ignore_sections: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> ExperimentConfig:
    """Validate a plain nested dict into an :class:`ExperimentConfig` (missing keys take defaults).

    ``ignore_sections``: top-level keys to drop before validation (e.g. ``("search", "study")`` for a
    search-space YAML). ``source`` names the file (or origin) in error messages.
    """
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where(source)}expected a mapping of sections at the top level, found {type(d).__name__}")
    ignored = set(ignore_sections)
    d = {k: v for k, v in d.items() if k not in ignored}
    if expand_env:
        d = expand_env_vars(d, source=source, environ=environ)
    d = method_defaults(d)
    cfg = build(ExperimentConfig, d, "", source)
    check_cross_fields(cfg, source)
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load``; ConfigError naming the file when unreadable or not a mapping."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, found {type(d).__name__}")
    return d


def load_config(
    path: str | Path,
    overrides: Iterable[str] = (),
    *,
    expand_env: bool = True,
    ignore_sections: Iterable[str] = (),
) -> ExperimentConfig:
    """Load, override and validate an experiment YAML. Errors name ``path`` and the key at fault."""
    source = str(path)
    d = load_yaml(path)
    d = apply_overrides(d, overrides, source=source)
    return config_from_dict(d, source, expand_env=expand_env, ignore_sections=ignore_sections)
