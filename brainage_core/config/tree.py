"""Small operations on YAML-like trees (nested mappings of plain values), shared by the config and the
search spaces: a plain deep copy, setting a dotted key, and the leaf-by-leaf difference of two trees."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["config_differences", "plain_copy", "set_dotted"]


def plain_copy(d: Any) -> Any:
    """Deep copy of a YAML-like tree, every mapping turned into a plain ``dict`` (lists copied too)."""
    if isinstance(d, Mapping):
        return {k: plain_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [plain_copy(v) for v in d]
    return d


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``d[a][b][c] = value`` for ``dotted = "a.b.c"`` in place, creating (or replacing anything that
    is not a dict by) an empty dict at each intermediate level."""
    node = d
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def config_differences(a: Any, b: Any, *, close_floats: bool = False) -> list[tuple[str, Any, Any]]:
    """``(dotted key, value in a, value in b)`` for every leaf where two nested mappings differ, sorted by
    key; a key missing on one side has None there. ``close_floats``: two floats equal within
    ``math.isclose`` count as equal. Used to name what changed between a saved and a current config."""
    out: list[tuple[str, Any, Any]] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            for key in sorted(set(x) | set(y), key=str):
                walk(x.get(key), y.get(key), f"{path}.{key}" if path else str(key))
        elif x != y and not (close_floats and isinstance(x, float) and isinstance(y, float) and math.isclose(x, y)):
            out.append((path, x, y))

    walk(a, b, "")
    return out
