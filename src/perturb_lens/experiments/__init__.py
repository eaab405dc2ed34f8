"""Experiment types: the plain sweep (sensitive directions), synthetic activations (Giglemiani et
al.), activation plateaus (Heimersheim) and stable regions (Janiak et al.).

Each experiment is one module (its options model, shard function and printed tables) with one
:func:`register_experiment` call naming them, its scope and figure set; the built-ins' calls are
in :mod:`perturb_lens.experiments.builtin`, by reference, registered at the registry's first
lookup. This package itself only exposes the registry, so that the config can validate
``experiment`` (and a report find its figures) without importing any experiment's code.
"""

from __future__ import annotations

from perturb_lens.experiments.registry import (
    ExperimentInfo,
    declared_experiment,
    find_experiment,
    get_experiment,
    list_experiments,
    register_experiment,
)

__all__ = [
    "ExperimentInfo",
    "declared_experiment",
    "find_experiment",
    "get_experiment",
    "list_experiments",
    "register_experiment",
]
