"""The one registration mechanism: a :class:`Registry` of named entries per kind (direction, scale,
experiment, metric, model family, figure set, claim, replication claim).

A stage defines the typed ``register_*`` function of its kind and keeps its entries in
``registry(kind)``. The built-in entries live in modules of their own stage and register
themselves when imported. Which modules those are is one list,
:data:`perturb_lens.builtins.BUILTINS`, installed here by the package's ``__init__`` (so that no
stage names a module of a later one, not even as a string) and imported at a kind's first lookup,
which keeps ``import perturb_lens`` light. A stage that must consult a later stage's kind (the
config validates an experiment's name and options) looks it up by kind here, without importing
that stage.

Imports nothing of the package.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_BUILTIN_MODULES: dict[str, tuple[str, ...]] = {}


def install_builtins(modules: dict[str, tuple[str, ...]]) -> None:
    """Set the modules that register each kind's built-ins (called once, by the package)."""
    _BUILTIN_MODULES.update(modules)


class Registry(Generic[T]):
    """Named entries of one ``kind``; ``how`` tells a user how to add one (for errors)."""

    def __init__(self, kind: str, how: str = "") -> None:
        self.kind = kind
        self.how = how
        self._entries: dict[str, T] = {}
        self._loaded = False

    def load(self) -> None:
        """Import the modules that register this kind's built-ins, once (again after a failed
        import). A registry whose user entries must replace a built-in of the same name calls
        this before :meth:`register`."""
        if self._loaded:
            return
        self._loaded = True  # first: the modules register into this registry while importing
        try:
            for module in _BUILTIN_MODULES.get(self.kind, ()):
                importlib.import_module(module)
        except BaseException:
            self._loaded = False
            raise

    def register(self, name: str, entry: T) -> T:
        """Add (or replace) ``name`` (the built-ins are not loaded first: built-in modules register
        while they load)."""
        self._entries[name] = entry
        return entry

    def registered(self, name: str) -> bool:
        """Whether ``name`` is registered already, without loading the built-ins (for checks
        made while registering, which may run while the built-ins load)."""
        return name in self._entries

    def unregister(self, name: str) -> None:
        """Remove ``name`` if registered (tests and user code that replace a built-in)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry ``name``; the error lists the registered names and how to add one."""
        self.load()
        if name not in self._entries:
            hint = f" ({self.how})" if self.how else ""
            raise KeyError(
                f"Unknown {self.kind} {name!r}; choose from {', '.join(self._entries)}{hint}."
            )
        return self._entries[name]

    def find(self, name: str) -> T | None:
        """The entry ``name``, or None."""
        self.load()
        return self._entries.get(name)

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        self.load()
        return list(self._entries)

    def values(self) -> list[T]:
        """Registered entries, in registration order."""
        self.load()
        return list(self._entries.values())

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs, in registration order."""
        self.load()
        return list(self._entries.items())

    def snapshot(self) -> dict[str, T]:
        """A copy of the entries (with the built-ins loaded), for :meth:`restore`."""
        self.load()
        return dict(self._entries)

    def restore(self, entries: dict[str, T]) -> None:
        """Put back the entries of a :meth:`snapshot` (tests that register temporary entries)."""
        self._entries = dict(entries)

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


_REGISTRIES: dict[str, Registry[Any]] = {}


def registry(kind: str, how: str = "") -> Registry[Any]:
    """The registry of ``kind`` (made at its first mention; ``how`` is kept from the first call
    that gives one)."""
    reg = _REGISTRIES.setdefault(kind, Registry(kind, how))
    if how and not reg.how:
        reg.how = how
    return reg
