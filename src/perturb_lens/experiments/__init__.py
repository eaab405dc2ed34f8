"""Experiment types: the plain sweep (sensitive directions), synthetic activations (Giglemiani et
al.), activation plateaus (Heimersheim) and stable regions (Janiak et al.).

Each experiment is one module with one :func:`register_experiment` call (its options model, scope,
shard function, printed tables and figure set); :mod:`perturb_lens.experiments.builtin` imports
the built-in ones. This package itself only exposes the registry, so that the config can validate
``experiment`` without importing any experiment's code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from perturb_lens.experiments.registry import (
    ExperimentInfo,
    find_experiment,
    get_experiment,
    list_experiments,
    register_experiment,
)

if TYPE_CHECKING:
    import pandas as pd

    from perturb_lens.config import ExperimentConfig
    from perturb_lens.executors import ShardFn

__all__ = [
    "ExperimentInfo",
    "find_experiment",
    "get_experiment",
    "list_experiments",
    "register_experiment",
]


def shard_function(experiment: str) -> ShardFn:
    """The function computing one shard's rows for an ``experiment`` type of the config."""
    from perturb_lens.experiments import builtin  # noqa: F401

    return get_experiment(experiment).shard


def curve_tables(df: pd.DataFrame, cfg: ExperimentConfig) -> dict[str, pd.DataFrame]:
    """The tables an experiment prints after its run (by title)."""
    from perturb_lens.experiments import builtin  # noqa: F401

    tables = get_experiment(cfg.experiment).tables
    return tables(df, cfg) if tables is not None else {}
