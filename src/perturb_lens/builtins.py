"""The built-in entries of every registry: for each kind, the modules that register them when
imported (each ends with its ``register_*`` calls). Adding a built-in direction, experiment,
metric, model family, figure set or claim is its module plus one line here. The package's
``__init__`` installs this list; a kind's modules are imported at its first lookup."""

from __future__ import annotations

BUILTINS: dict[str, tuple[str, ...]] = {
    "direction": (
        "perturb_lens.directions.base",
        "perturb_lens.directions.sae",
        "perturb_lens.directions.synthetic",
    ),
    "scale": ("perturb_lens.directions.sae",),
    "metric": ("perturb_lens.metrics.builtin",),
    "model family": (
        "perturb_lens.models.generic",
        "perturb_lens.models.gpt2",
        "perturb_lens.models.llama",
        "perturb_lens.models.neox",
        "perturb_lens.models.qwen2",
        "perturb_lens.models.gemma",
    ),
    "experiment": ("perturb_lens.experiments.builtin",),
    "figure set": ("perturb_lens.plots.sets", "perturb_lens.plots.same_cosine"),
    "claim": ("perturb_lens.analysis.verdicts",),
    "replication claim": ("perturb_lens.replication.claims",),
}
"""kind -> the modules registering its built-ins, in registration order."""
