"""The experiments perturb-lens ships; importing this module registers them."""

from perturb_lens.experiments import (  # noqa: F401  (each module registers its experiment)
    plateaus,
    same_cosine,
    sensitive_directions,
    stable_regions,
    synthetic_activations,
)
