"""How many samples activation statistics are fitted on, and whether that is enough: the
thresholds, the warning, and a stats file's fit size read from its header (numpy only, no torch, so
that reports and verdicts can check it cheaply)."""

from __future__ import annotations

import json
import os

from safetensors import safe_open

from perturb_lens.common.files import regular_file

DEFAULT_FIT_PER_DIM = 20  # default fit size: 20 x d_model non-BOS samples (see README, issue 13)
MIN_FIT_PER_DIM = 10  # below 10 x d_model samples the covariance is unreliable: a loud warning
STATS_FORMAT = "perturb-lens/activation-stats"  # the safetensors metadata key of a stats file


def fit_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(samples fitted, d_model)`` of a file written by ``ActivationStats.save``, read
    from its header alone (no tensor is loaded)."""
    with safe_open(str(regular_file(path, "an activation-stats file")), framework="numpy") as f:
        raw = (f.metadata() or {}).get(STATS_FORMAT)
        if raw is None:
            raise ValueError(
                f"{path} is not an activation-stats file (no '{STATS_FORMAT}' metadata)"
            )
        return int(json.loads(raw)["n_tokens"]), int(f.get_slice("mean").get_shape()[0])


def fit_size_warning(n_samples: int, d_model: int) -> str | None:
    """The warning for statistics fitted on fewer than ``MIN_FIT_PER_DIM x d_model`` samples
    (the covariance of the cov-random directions is then mostly noise), saying how to fix it;
    None when the fit is large enough."""
    need = MIN_FIT_PER_DIM * d_model
    if n_samples >= need:
        return None
    return (
        f"Activation statistics fitted on only {n_samples:,} samples, fewer than "
        f"{MIN_FIT_PER_DIM} x d_model = {need:,}: the covariance (cov-random directions) is "
        f"unreliable. Fit on more: stats.n_tokens={DEFAULT_FIT_PER_DIM * d_model} (the default "
        "when unset), or a bigger source (stats.source=... or more text in data.source)."
    )
