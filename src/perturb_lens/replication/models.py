"""The models the replication table has a column for, and the middle layer each is judged at.

The layer counts are kept here (not read from the weights) so that the table and its commands
are written without loading a model. A run of another model specializes the SmolLM2 presets
with ``model=NAME hook=blocks.K.hook_resid_pre``, K = ``n_layers // 2``.
"""

from __future__ import annotations

PRESET_MODEL = "smollm2-135m"
"""The model the presets name: its runs may also sit directly under the runs root (the
single-model layout of perturb-lens 0.2)."""

MODEL_LAYERS: dict[str, int] = {
    "smollm2-135m": 30,
    "gemma3-270m": 18,
    "qwen2.5-0.5b": 24,
}
"""Model name -> number of transformer blocks, in the table's column order."""


def n_layers(model: str) -> int:
    """The number of blocks of a model the table knows (ValueError naming them otherwise)."""
    if model not in MODEL_LAYERS:
        raise ValueError(
            f"model {model!r} has no replication column; choose from {', '.join(MODEL_LAYERS)} "
            "(or add it with its layer count to perturb_lens.replication.models.MODEL_LAYERS)"
        )
    return MODEL_LAYERS[model]


def middle_layer(model: str) -> int:
    """The middle block of ``model``: ``n_layers // 2``."""
    return n_layers(model) // 2


def middle_hook(model: str) -> str:
    """The residual stream entering the middle block: ``blocks.K.hook_resid_pre``."""
    return f"blocks.{middle_layer(model)}.hook_resid_pre"
