"""Experiment types: the plain sweep (sensitive directions), synthetic activations (Giglemiani et
al.), activation plateaus (Heimersheim) and stable regions (Janiak et al.).

Each experiment is one module with one :func:`register_experiment` call (its options model, scope,
shard function, printed tables and figure set); :mod:`perturb_lens.experiments.builtin` imports
the built-in ones. This package itself only exposes the registry, so that the config can validate
``experiment`` without importing any experiment's code.
"""

from __future__ import annotations

from perturb_lens.experiments.registry import (
    ExperimentInfo,
    find_experiment,
    get_experiment,
    list_experiments,
    register_experiment,
)

__all__ = [
    "ExperimentInfo",
    "find_experiment",
    "get_experiment",
    "list_experiments",
    "register_experiment",
]
