"""Modules that register a registry's built-ins when imported, imported once at that registry's
first use (so that importing the package stays light). Imports nothing of the package, so any
registry module can use it."""

from __future__ import annotations

import importlib


class BuiltinModules:
    """``modules`` (dotted names) that register built-ins on import; :meth:`load` imports them
    once."""

    def __init__(self, *modules: str) -> None:
        self.modules = modules
        self.loaded = False

    def load(self) -> None:
        """Import the modules, once; after a failed import the next call tries again."""
        if self.loaded:
            return
        self.loaded = True  # before: their registrations may consult the registry again
        try:
            for module in self.modules:
                importlib.import_module(module)
        except BaseException:
            self.loaded = False
            raise
