"""Sensitive directions (Lee & Heimersheim): perturb activations along baseline and SAE directions
by a grid of lengths and measure how the output changes (the plain sweep)."""

from __future__ import annotations

from perturb_lens.engine.run import compute_shard
from perturb_lens.experiments.registry import register_experiment

register_experiment(
    "sensitive-directions",
    compute_shard,
    description="the sweep: every direction x length at every position of the scope",
    figures="sensitive-directions",
)
