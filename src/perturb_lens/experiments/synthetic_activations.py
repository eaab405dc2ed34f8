"""Synthetic activations (Giglemiani et al.): interpolate from real activations towards real,
cov-random and SAE-composed synthetic targets (directions with ``scale: raw``, lengths ``t`` in
[0, 1]) and compare where the output changes fastest and how long it stays flat.

The targets are direction generators (:mod:`perturb_lens.directions.synthetic`); the shards are the
plain sweep's.
"""

from __future__ import annotations

import pandas as pd

from perturb_lens.analysis.curve_shape import (
    curve_metric,
    curve_statistics,
    ks_vs_reference,
    statistic_summary,
)
from perturb_lens.config.schema import ExperimentConfig


def synthetic_tables(rows: pd.DataFrame, cfg: ExperimentConfig) -> dict[str, pd.DataFrame]:
    """Max-slope step (mean, sd, KS against the first target) and plateau lengths per target."""
    metric = curve_metric(cfg.metrics)
    stats = curve_statistics(rows, metric)
    ref = cfg.directions[0].label
    return {
        f"max-slope step ({metric}) with KS vs {ref}": ks_vs_reference(stats, reference=ref),
        f"plateau length in steps ({metric}, 10% of the end value)": statistic_summary(
            stats, "plateau_length"
        ),
    }
