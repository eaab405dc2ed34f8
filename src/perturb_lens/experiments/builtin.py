"""The experiments perturb-lens ships, registered by reference: their code (and torch) is imported
when an entry is first fetched, not when this module is (the registry imports it at its first
lookup). Registration order is the config sections' order."""

from perturb_lens.experiments.registry import LAST_POSITION_CURVES, register_experiment

_PKG = "perturb_lens.experiments"

register_experiment(
    "plateaus",
    f"{_PKG}.plateaus:plateau_shard",
    description="random perturbations around real, synthetic and cov-random base points",
    options=f"{_PKG}.plateaus:PlateauOptions",
    section="plateaus",
    tables=f"{_PKG}.plateaus:plateau_tables",
    **LAST_POSITION_CURVES,
    curve_stats=("plateau_length",),
    judged=False,  # no direction comparison: base points, not directions
)
register_experiment(
    "same-cosine",
    f"{_PKG}.same_cosine:same_cosine_shard",
    description="replace x by targets at a grid of cosines to x and a fixed norm ratio",
    options=f"{_PKG}.same_cosine:SameCosineOptions",
    section="same_cosine",
    tables=f"{_PKG}.same_cosine:same_cosine_tables",
    figures="same-cosine",
    judged=False,  # targets at a cosine, not directions at a length
)
register_experiment(
    "sensitive-directions",
    f"{_PKG}.sensitive_directions:sweep_shard",
    description="the sweep: every direction x length at every position of the scope",
    figures="sensitive-directions",
)
register_experiment(
    "stable-regions",
    f"{_PKG}.stable_regions:stable_region_shard",
    description="interpolation between two prompts differing in their last token (sharpness)",
    options=f"{_PKG}.stable_regions:StableRegionsOptions",
    section="stable_regions",
    tables=f"{_PKG}.stable_regions:stable_region_tables",
    **LAST_POSITION_CURVES,
    curve_stats=("sharpness", "max_slope_step"),
    judged=False,  # prompt pairs, not directions
)
register_experiment(
    "synthetic-activations",
    f"{_PKG}.sensitive_directions:sweep_shard",
    description="interpolation towards real, cov-random and synthetic (SAE-latent) targets",
    tables=f"{_PKG}.synthetic_activations:synthetic_tables",
    figures="interpolation",
    curve_stats=("max_slope_step", "plateau_length"),
)
