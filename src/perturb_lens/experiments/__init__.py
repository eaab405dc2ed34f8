"""The published experiments beyond the plain sweep: synthetic activations (Giglemiani et al.),
activation plateaus (Heimersheim) and stable regions (Janiak et al.).

Importing this package registers the SAE-latent direction generators (``synthetic``,
``sae-latent``, ``sae-reconstruction``); :func:`shard_function` gives each experiment type's shard
computation for :func:`~perturb_lens.engine.run.run_experiment`; :func:`curve_tables` its summaries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from perturb_lens.experiments import synthetic  # noqa: F401  (registers the directions)

if TYPE_CHECKING:
    import pandas as pd

    from perturb_lens.config import ExperimentConfig
    from perturb_lens.executors import ShardFn


def shard_function(experiment: str) -> ShardFn:
    """The function computing one shard's rows for an ``experiment`` type of the config."""
    from perturb_lens.engine.run import compute_shard
    from perturb_lens.experiments.plateaus import plateau_shard
    from perturb_lens.experiments.stable_regions import stable_region_shard

    table: dict[str, ShardFn] = {
        "sensitive-directions": compute_shard,
        "synthetic-activations": compute_shard,
        "plateaus": plateau_shard,
        "stable-regions": stable_region_shard,
    }
    if experiment not in table:
        raise ValueError(f"Unknown experiment {experiment!r}; known: {', '.join(table)}.")
    return table[experiment]


def curve_tables(df: pd.DataFrame, cfg: ExperimentConfig) -> dict[str, pd.DataFrame]:
    """The per-curve summaries an interpolation experiment reports, by title: max-slope step
    (mean, sd, KS against the first target), plateau lengths, or sharpness quartiles."""
    from perturb_lens.results.curve_stats import (
        curve_statistics,
        ks_vs_reference,
        statistic_summary,
    )

    metric = "l2" if "l2" in cfg.metrics else cfg.metrics[0]
    stats = curve_statistics(df, metric)
    if cfg.experiment == "stable-regions":
        quartiles = ("q25", "median", "q75", "mean")
        return {f"sharpness ({metric})": statistic_summary(stats, "sharpness", stat=quartiles)}
    if cfg.experiment == "plateaus":
        return {
            f"plateau length in steps ({metric}, 10% of the end value)": statistic_summary(
                stats, "plateau_length", by=("base", "direction")
            )
        }
    ref = cfg.directions[0].label
    return {
        f"max-slope step ({metric}) with KS vs {ref}": ks_vs_reference(stats, reference=ref),
        f"plateau length in steps ({metric}, 10% of the end value)": statistic_summary(
            stats, "plateau_length"
        ),
    }
