"""The experiment registry: one :func:`register_experiment` call per experiment type.

An entry says everything the rest of the package needs to know about an experiment: the config
section holding its options (a pydantic model of its own), the scope it requires, the function
computing one shard's rows, the tables ``perturb-lens run`` prints, and the figure set of its
runs, and whether the direction claims judge its runs. Entries live in
``registry("experiment")`` (:mod:`perturb_lens.common.registry`), so that the config and the
figures can look experiments up by kind without importing this stage or any experiment's code.

The code an entry names (``shard``, ``options``, ``tables``) may be given as a ``"module:name"``
reference, imported when the entry is first fetched with :func:`get_experiment`,
:func:`find_experiment` or :func:`list_experiments`; :func:`declared_experiment` reads the rest
(scope, figure set, curve statistics) without importing it. The built-in experiments
(:mod:`perturb_lens.experiments.builtin`, by reference) are registered at the first lookup.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from perturb_lens.common.registry import registry

if TYPE_CHECKING:
    import pandas as pd
    from pydantic import BaseModel

TablesFn = Callable[["pd.DataFrame", Any], "dict[str, pd.DataFrame]"]
"""``tables(summary_rows, config) -> {title: frame}``: what ``perturb-lens run`` prints."""


@dataclass(frozen=True)
class ExperimentInfo:
    """A registered experiment type (the config's ``experiment`` value)."""

    name: str
    shard: Callable[..., pd.DataFrame] | str  # (ShardContext, shard_id) -> rows; module-level
    description: str = ""
    options: type[BaseModel] | str | None = None  # the model of its config section
    section: str | None = None  # the config key of that section (e.g. ``plateaus``)
    scope: str | None = None  # the scope it requires (None: any)
    shard_by_direction: bool = True  # whether its shards may be split per direction
    tables: TablesFn | str | None = None
    figures: str = "curves"  # the figure set (plots.registry) of its runs
    curve_stats: tuple[str, ...] = ()  # per-curve statistics its figures compare (interpolation)
    judged: bool = True  # whether the direction claims (verdicts) judge its runs

    def resolved(self) -> ExperimentInfo:
        """This entry with its ``"module:name"`` references imported (and kept so in the
        registry)."""
        refs = {f: getattr(self, f) for f in _REFERENCES if isinstance(getattr(self, f), str)}
        if not refs:
            return self
        code = {}
        for field_name, ref in refs.items():
            module, _, attr = ref.partition(":")
            code[field_name] = getattr(importlib.import_module(module), attr)
        return EXPERIMENTS.register(self.name, replace(self, **code))


LAST_POSITION_CURVES: dict[str, Any] = {
    "scope": "last-position",
    "shard_by_direction": False,
    "figures": "interpolation",
}
"""Registration settings of an experiment that perturbs only the last position, along directions
its shard function builds for the whole shard (plateau bases, prompt pairs), and compares the
per-curve statistics of its runs (``register_experiment(..., **LAST_POSITION_CURVES)``)."""

EXPERIMENTS = registry("experiment", "register yours with perturb_lens.register_experiment")
"""name -> :class:`ExperimentInfo`; the built-ins (by reference) register at the first lookup or
registration, first, so that a later registration of a built-in's name replaces the built-in."""
_REFERENCES = ("shard", "options", "tables")  # the fields that may name code as "module:name"


def register_experiment(
    name: str,
    shard: Callable[..., pd.DataFrame],
    **info: Any,
) -> ExperimentInfo:
    """Register experiment type ``name`` (the other fields: :class:`ExperimentInfo`); an options
    model needs the config ``section`` that holds it. ``shard``, ``options`` and ``tables`` may be
    ``"module:name"`` references (imported at the first fetch). Registering a name again replaces
    it."""
    EXPERIMENTS.load()
    entry = ExperimentInfo(name=name, shard=shard, **info)
    if (entry.options is None) != (entry.section is None):
        raise ValueError(f"experiment {name!r}: give both options= and section=, or neither")
    clash = [e.name for e in EXPERIMENTS.values() if e.section and e.section == entry.section]
    if entry.section and clash and clash != [name]:
        raise ValueError(f"experiment {name!r}: config section {entry.section!r} is {clash[0]}'s")
    return EXPERIMENTS.register(name, entry)


def get_experiment(name: str) -> ExperimentInfo:
    """The registered experiment ``name``; the error lists the known ones."""
    entry = EXPERIMENTS.find(name)
    if entry is None:
        raise ValueError(
            f"Unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS.names())} (or "
            "register yours with perturb_lens.register_experiment)."
        )
    return entry.resolved()


def find_experiment(name: str) -> ExperimentInfo | None:
    """The registered experiment ``name``, or None."""
    entry = declared_experiment(name)
    return entry.resolved() if entry is not None else None


def declared_experiment(name: str) -> ExperimentInfo | None:
    """The registered experiment ``name`` as registered, or None: its code (``shard``,
    ``options``, ``tables``) may still be ``"module:name"`` references, not imported (figures
    and reports need only its scope, figure set and curve statistics)."""
    return EXPERIMENTS.find(name)


def list_experiments() -> list[ExperimentInfo]:
    """Every registered experiment, in registration order."""
    return [e.resolved() for e in EXPERIMENTS.values()]
