"""Imported at start-up by every Python process that has this folder on its PYTHONPATH (tests only).

When a ``BRAINAGE_FAULT_*`` variable is set, it arranges for :func:`fault_hooks.install` to run as soon as
``brainage_core.training.loop`` is imported; otherwise it does nothing (and imports nothing heavy).
"""

import os

if any(key.startswith("BRAINAGE_FAULT_") and key != "BRAINAGE_FAULT_KILL_DRIVER_AFTER_RESULTS" for key in os.environ):
    import importlib.abc
    import importlib.util
    import sys

    class _InstallFaultHooks(importlib.abc.MetaPathFinder):
        target = "brainage_core.training.loop"

        def find_spec(self, name, path=None, target=None):
            if name != self.target:
                return None
            sys.meta_path.remove(self)  # find the real module with the other finders
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                return spec
            run_module = spec.loader.exec_module

            def exec_module(module):
                run_module(module)
                import fault_hooks

                fault_hooks.install(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _InstallFaultHooks())
