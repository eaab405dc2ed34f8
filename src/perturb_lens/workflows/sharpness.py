"""Janiak et al.'s across-models question: the stable-regions experiment run on several models
(sizes, training checkpoints), with each model's per-curve sharpness in one table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from torch import Tensor

from perturb_lens.analysis.curve_shape import curve_statistics
from perturb_lens.models.base import LensModel
from perturb_lens.results.store import load_results
from perturb_lens.workflows.experiment import run_experiment


def stable_region_sharpness(
    models: Sequence[str | LensModel],
    config: Mapping[str, Any],
    out: str | Path,
    *,
    resume: bool = False,
    tokens: Tensor | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Run the stable-regions ``config`` on each model (names, paths or loaded models; e.g.
    several sizes or training checkpoints) into ``out/<i>-<name>``; one row per curve with a
    ``model`` column, ``sharpness``, ``max_slope_step`` and ``plateau_length``. ``tokens``: the
    prompts [N, T] for every model instead of ``config.data`` (only for one shared tokenizer)."""
    frames = []
    for i, m in enumerate(models):
        name = m if isinstance(m, str) else m.source
        cfg = {**config, "experiment": "stable-regions", "model": name}
        run_dir = run_experiment(
            cfg,
            Path(out) / f"{i:02d}-{Path(str(name)).name}",
            resume=resume,
            model=None if isinstance(m, str) else m,
            tokens=tokens,
            progress=progress,
        )
        stats = curve_statistics(load_results(run_dir), "l2")
        stats.insert(0, "model", str(name))
        frames.append(stats)
    return pd.concat(frames, ignore_index=True)
