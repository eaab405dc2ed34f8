"""The tests behind the replication verdicts: paired differences with bootstrap intervals over
prompts (the unit whose tokens are independent of the others';
:func:`~perturb_lens.statistics.bootstrap.bootstrap_interval`), a sign test over matched pairs,
and the verdict word an interval gives."""

from __future__ import annotations

import numpy as np

from perturb_lens.analysis.verdicts import MIN_SEQS
from perturb_lens.replication.registry import Verdict
from perturb_lens.statistics.bootstrap import bootstrap_interval

CI = 0.95
CI_WORD = f"{CI:.0%}"  # how the interval is named in the table
ALPHA = 0.05  # the sign test's level
N_BOOT = 2000


def paired_difference(
    a: np.ndarray, b: np.ndarray, **options: float
) -> tuple[float, float, float, int]:
    """Mean of ``a - b`` over the units where both are finite, its interval
    (:func:`bootstrap_interval`), and that unit count: ``(diff, low, high, n)``; NaN interval
    below :data:`MIN_SEQS` units."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    if d.size < MIN_SEQS:
        return float(d.mean()) if d.size else np.nan, np.nan, np.nan, int(d.size)
    low, high = bootstrap_interval(lambda i: d[i].mean(), d.size, **options)  # type: ignore
    return float(d.mean()), float(low[0]), float(high[0]), int(d.size)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance ``max_x |F_a(x) - F_b(x)|`` (the statistic of
    ``scipy.stats.ks_2samp`` without its p-value, which costs more than the bootstrap needs)."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    grid = np.concatenate([a, b])
    f_a = np.searchsorted(a, grid, side="right") / a.size
    f_b = np.searchsorted(b, grid, side="right") / b.size
    return float(np.abs(f_a - f_b).max())


def sign_test(wins: int, n: int) -> float:
    """One-sided p-value of ``wins`` or more successes in ``n`` fair coin flips (1.0 if n = 0)."""
    if n == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(wins, n, 0.5, alternative="greater").pvalue)


def above(low: float, high: float, null: float) -> Verdict:
    """``replicated`` where the interval lies above ``null`` (the claim's direction), ``not
    replicated`` where it lies below, ``inconclusive`` where it straddles it or is NaN."""
    if np.isnan(low) or np.isnan(high):
        return "inconclusive"
    return "replicated" if low > null else "not replicated" if high < null else "inconclusive"


def combine(verdicts: list[Verdict]) -> Verdict:
    """A claim made of several parts: replicated if every part is, not replicated if any part is,
    else inconclusive."""
    if verdicts and all(v == "replicated" for v in verdicts):
        return "replicated"
    return "not replicated" if "not replicated" in verdicts else "inconclusive"
