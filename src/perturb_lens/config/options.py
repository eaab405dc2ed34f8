"""The allowed values of a model's settings, in one place (the config validates against these).

Torch-free on purpose: ``config.py`` imports it without loading a model stack.
"""

from __future__ import annotations

FRAMES = ("centered", "raw")  # centered: writing weights minus their mean over d_model
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")  # torch dtype names
PRECISIONS = ("auto", "float32", "tf32", "bf16-matmul")  # block matmuls of native models
NORMS = ("layernorm", "rmsnorm")


def default_frame(norm: str) -> str:
    """``centered`` where LayerNorm hides the mean over d_model (GPT-2, GPT-NeoX), else ``raw``."""
    return "centered" if norm == "layernorm" else "raw"
