"""``${VAR}`` and ``${VAR:-default}`` in the string values of a config, expanded from the environment.

An unset variable without a default is ONE ConfigError naming the variable, the key and the source;
a malformed reference (``${1X}``, ``${}``) likewise. ``brainage_core.config.loading`` calls this before
validation when ``expand_env=True``; a study runner may validate with ``expand_env=False`` first.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from brainage_core.config.validate import where
from brainage_core.errors import ConfigError

__all__ = ["expand_env_vars"]

_ENV_PATTERN = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _expand_string(text: str, key: str, source: str | None, environ: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        body = match.group(1)
        name, has_default, default = body.partition(":-")
        if not _ENV_NAME.fullmatch(name):
            raise ConfigError(
                f"{where(source)}{key} = '{text}': invalid environment reference '${{{body}}}' "
                f"(expected ${{NAME}} or ${{NAME:-default}})"
            )
        if name in environ:
            return environ[name]
        if has_default:
            return default
        raise ConfigError(
            f"{where(source)}{key} = '{text}': environment variable {name} is not set "
            f"(set it, e.g. export {name}=/path, or override {key}=...)"
        )

    return _ENV_PATTERN.sub(replace, text)


def expand_env_vars(
    d: Any, *, source: str | None = None, environ: Mapping[str, str] | None = None, _prefix: str = ""
) -> Any:
    """A copy of ``d`` with ``${VAR}`` / ``${VAR:-default}`` expanded in every string value.

    ConfigError naming the variable and the key when a variable is unset and has no default.
    """
    env = os.environ if environ is None else environ
    if isinstance(d, Mapping):
        return {k: expand_env_vars(v, source=source, environ=env, _prefix=f"{_prefix}{k}.") for k, v in d.items()}
    if isinstance(d, list):
        return [expand_env_vars(v, source=source, environ=env, _prefix=_prefix) for v in d]
    if isinstance(d, str):
        return _expand_string(d, _prefix[:-1] or "<value>", source, env)
    return d
