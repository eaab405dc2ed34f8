"""The tests behind the replication verdicts: paired differences with bootstrap intervals over
prompts (the unit whose tokens are independent of the others';
:func:`~perturb_lens.statistics.bootstrap.bootstrap_interval`), a sign test over matched pairs,
and the verdict word an interval gives."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from perturb_lens.analysis.verdicts import MIN_SEQS
from perturb_lens.replication.registry import Undecided, Verdict
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


# ---------------------------------------------------------------------------------------------
# The sample size that would decide an inconclusive claim

SIZE_RULE = (
    "n' = n (h / |estimate - bound|)^2, with h the half-width of the CI (high - low) / 2 on n "
    "units: a CI's half-width shrinks as 1 / sqrt(n), so at n' the interval would just reach the "
    "bound. An approximation: the estimate is taken as it is, and a new sample moves it too."
)


def needed_size(part: Undecided) -> int | None:
    """The units at which ``part``'s interval would exclude its bound (:data:`SIZE_RULE`),
    at least ``part.min_n``; None where no size decides it (NaN interval, estimate on the
    bound, or an interval that does not contain the bound and is judged already)."""
    values = (part.estimate, part.low, part.high, part.bound)
    if not all(np.isfinite(v) for v in values):
        return None
    if not part.low <= part.bound <= part.high:
        return part.min_n if part.n < part.min_n else None
    gap = abs(part.estimate - part.bound)
    if gap == 0.0:
        return None
    half = (part.high - part.low) / 2.0
    return max(math.ceil(part.n * (half / gap) ** 2), part.min_n)


def deciding_size(parts: Sequence[Undecided]) -> tuple[int, Undecided] | None:
    """The sample size that would decide a claim left inconclusive by ``parts``, and the part it
    comes from: per group its smallest :func:`needed_size` (one decided part decides a group);
    then the smallest over the groups leaning ``against`` (one decides the claim), else the
    largest over all groups (each must be decided). None where no size decides it (a group
    that no size decides, and none against)."""
    groups: dict[str, list[tuple[int | None, Undecided]]] = {}
    for p in parts:
        groups.setdefault(p.group, []).append((needed_size(p), p))
    best: list[tuple[int, Undecided]] = []
    stuck = False
    for members in groups.values():
        sized = [(n, p) for n, p in members if n is not None]
        if not sized:
            stuck = True
            continue
        best.append(min(sized, key=lambda x: x[0]))
    against = [b for b in best if b[1].against]
    if against:
        return min(against, key=lambda x: x[0])
    if stuck or not best:
        return None
    return max(best, key=lambda x: x[0])


def ratio_part(
    label: str,
    ratio: float,
    low: float,
    high: float,
    n: int,
    *,
    op: str = ">",
    band: tuple[float, float] = (0.8, 1.25),
    group: str = "",
    min_n: int = 0,
    below: bool = False,
) -> Undecided:
    """The :class:`Undecided` of a ratio interval judged against 1 (``op`` ``>``; ``below``:
    the claim is the ratio below 1) or, for ``~``, against the band edge nearest the ratio."""
    if op == "~":
        bound = min(band, key=lambda edge: abs(ratio - edge))
        against = not band[0] <= ratio <= band[1]
    else:
        bound, against = 1.0, (ratio > 1.0) if below else (ratio < 1.0)
    return Undecided(label, ratio, low, high, bound, n, "seqs", group, bool(against), min_n)
