"""Resampling sequences: the draws shared by the curves' confidence intervals and the verdicts."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

BOOT_ELEMENTS = 1 << 21  # draws per chunk of resamples (three int64/float64 arrays of 16 MiB)


def resample_weights(
    k: int, n_boot: int, seed: int, max_elements: int = BOOT_ELEMENTS
) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, w)`` chunks of ``n_boot`` resamples of ``k`` sequences drawn with replacement
    (reproducible from ``seed``): ``w[c, k]`` counts how often each sequence is drawn in
    resamples ``start .. start + c``, so a resample's sums of per-sequence sums ``S [k, m]`` are
    ``w @ S``."""
    rng = np.random.default_rng(seed)
    step = max(1, max_elements // k)
    for start in range(0, n_boot, step):
        c = min(step, n_boot - start)
        draws = rng.integers(0, k, size=(c, k)) + k * np.arange(c)[:, None]
        w = np.bincount(draws.ravel(), minlength=c * k).reshape(c, k).astype(np.float64)
        yield start, w
