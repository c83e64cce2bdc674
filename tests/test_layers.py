"""The layering rule of DESIGN.md: ``brainage_core`` never imports Ray (directly or through a dependency)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import brainage_core

ROOT = Path(__file__).resolve().parents[1]


def _all_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(brainage_core.__path__, prefix="brainage_core."))


def test_every_brainage_core_module_is_found() -> None:
    names = _all_modules()
    for expected in ("brainage_core.losses", "brainage_core.training.loop", "brainage_core.data.store"):
        assert expected in names


def test_importing_all_of_brainage_core_does_not_import_ray() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {_all_modules()!r}:\n"
        "    if not name.endswith('__main__'):\n"
        "        importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print('RAY:' + ','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "RAY:", out.stdout[-2000:]
