"""Imported at start-up by every Python process that has this folder on its PYTHONPATH (tests only).

When a ``BRAINAGE_FAULT_*`` variable is set, it arranges for :mod:`fault_hooks` to install its hook as soon
as the module it hooks is imported (``brainage_core.training.loop`` for the epoch faults, ``study.callback``
for the driver kill); otherwise it does nothing (and imports nothing heavy).
"""

import os

_DRIVER_VAR = "BRAINAGE_FAULT_KILL_DRIVER_AFTER_RESULTS"
#: module to hook -> name of the fault_hooks function that installs the hook, when its variables are set
_TARGETS = {}
if any(key.startswith("BRAINAGE_FAULT_") and key != _DRIVER_VAR for key in os.environ):
    _TARGETS["brainage_core.training.loop"] = "install"
if os.environ.get(_DRIVER_VAR):
    _TARGETS["study.callback"] = "install_driver"

if _TARGETS:
    import importlib.abc
    import importlib.util
    import sys

    class _InstallFaultHooks(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name not in _TARGETS:
                return None
            installer = _TARGETS.pop(name)
            if not _TARGETS:
                sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)  # the real module, found by the other finders
            if spec is None or spec.loader is None:
                return spec
            run_module = spec.loader.exec_module

            def exec_module(module):
                run_module(module)
                import fault_hooks

                getattr(fault_hooks, installer)(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _InstallFaultHooks())
