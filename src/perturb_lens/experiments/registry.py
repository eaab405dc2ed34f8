"""The experiment registry: one :func:`register_experiment` call per experiment type.

An entry says everything the rest of the package needs to know about an experiment: the config
section holding its options (a pydantic model of its own), the scope it requires, the function
computing one shard's rows, the tables ``perturb-lens run`` prints, and the figure set of its
runs. This module imports nothing of the package, so the config, the runner and the figures can
all look experiments up without importing any experiment's code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from pydantic import BaseModel

TablesFn = Callable[["pd.DataFrame", Any], "dict[str, pd.DataFrame]"]
"""``tables(summary_rows, config) -> {title: frame}``: what ``perturb-lens run`` prints."""


@dataclass(frozen=True)
class ExperimentInfo:
    """A registered experiment type (the config's ``experiment`` value)."""

    name: str
    shard: Callable[..., pd.DataFrame]  # (RunContext, shard_id) -> rows; module-level (pickles)
    description: str = ""
    options: type[BaseModel] | None = None  # the model of its config section
    section: str | None = None  # the config key of that section (e.g. ``plateaus``)
    scope: str | None = None  # the scope it requires (None: any)
    shard_by_direction: bool = True  # whether its shards may be split per direction
    tables: TablesFn | None = None
    figures: str = "curves"  # the figure set (plots.registry) of its runs
    curve_stats: tuple[str, ...] = ()  # per-curve statistics its figures compare (interpolation)


LAST_POSITION_CURVES: dict[str, Any] = {
    "scope": "last-position",
    "shard_by_direction": False,
    "figures": "interpolation",
}
"""Registration settings of an experiment that perturbs only the last position, along directions
its shard function builds for the whole shard (plateau bases, prompt pairs), and compares the
per-curve statistics of its runs (``register_experiment(..., **LAST_POSITION_CURVES)``)."""

_EXPERIMENTS: dict[str, ExperimentInfo] = {}


def register_experiment(
    name: str,
    shard: Callable[..., pd.DataFrame],
    **info: Any,
) -> ExperimentInfo:
    """Register experiment type ``name`` (the other fields: :class:`ExperimentInfo`); an options
    model needs the config ``section`` that holds it. Registering a name again replaces it."""
    entry = ExperimentInfo(name=name, shard=shard, **info)
    if (entry.options is None) != (entry.section is None):
        raise ValueError(f"experiment {name!r}: give both options= and section=, or neither")
    clash = [e.name for e in _EXPERIMENTS.values() if e.section and e.section == entry.section]
    if entry.section and clash and clash != [name]:
        raise ValueError(f"experiment {name!r}: config section {entry.section!r} is {clash[0]}'s")
    _EXPERIMENTS[name] = entry
    return entry


def get_experiment(name: str) -> ExperimentInfo:
    """The registered experiment ``name``; the error lists the known ones."""
    if name not in _EXPERIMENTS:
        raise ValueError(
            f"Unknown experiment {name!r}; choose from {', '.join(_EXPERIMENTS)} (or register "
            "yours with perturb_lens.experiments.register_experiment)."
        )
    return _EXPERIMENTS[name]


def find_experiment(name: str) -> ExperimentInfo | None:
    """The registered experiment ``name``, or None."""
    return _EXPERIMENTS.get(name)


def list_experiments() -> list[ExperimentInfo]:
    """Every registered experiment, in registration order."""
    return list(_EXPERIMENTS.values())
