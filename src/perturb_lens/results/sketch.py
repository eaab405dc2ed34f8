"""A mergeable relative-error quantile sketch (DDSketch-style), for many groups at once.

A value ``x != 0`` falls in bucket ``k = ceil(log_gamma |x|)`` of its sign, i.e.
``gamma^(k-1) < |x| <= gamma^k`` with ``gamma = (1 + a) / (1 - a)``; zeros are counted apart. A
bucket stands for ``sign * 2 gamma^k / (gamma + 1)``, which lies within relative error ``a`` of
every value in it: ``|rep - x| <= a |x|`` (up to the rounding of ``log``, ~1e-15 relative, which
can move a value on a bucket edge to its neighbour). Default ``a = 0.005`` (0.5 %): invisible in
the figures' quantile bands, and a KL spread over ten decades spans ~4,600 buckets per group.

A sketch is a sparse table ``(group, sign, bucket, count)``; merging two is adding their counts
(exact, in any order). :func:`counted_quantiles` gives numpy's ``linear`` quantile of the values
the counts stand for: at position ``h = q (n - 1)`` between order statistics ``x_(i)`` and
``x_(i+1)`` (``i = floor h``, ``f = h - i``) it returns ``(1 - f) r_(i) + f r_(i+1)`` of their
buckets' representatives, so its error is at most ``a ((1 - f) |x_(i)| + f |x_(i+1)|)``: at most
``a`` times the true quantile when both order statistics have the same sign (or one is 0); only
where the quantile falls between a negative and a positive value is the bound that absolute one.
The ends ``q = 0, 1`` and every answer are clamped to the exact group min/max when given.
(DDSketch itself answers with the bucket of one rank, ``floor(q (n - 1))``, without interpolating;
interpolating as numpy and pandas do keeps a rows run's exact quantiles and these within ``a``.)

Our own code rather than the ``ddsketch`` package: that adds values one at a time in Python
(about a microsecond each, minutes for the 10^8 values of a paper-scale run); here a shard's
values are bucketed and counted per group in a few numpy/pandas calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

DEFAULT_ALPHA = 0.005
_SIDE = np.int64(1) << 32  # ordinal offset: buckets (int32) of either sign never meet


def gamma(alpha: float = DEFAULT_ALPHA) -> float:
    """The bucket ratio ``(1 + alpha) / (1 - alpha)`` of relative accuracy ``alpha``."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"sketch accuracy alpha must be in (0, 1), got {alpha}")
    return (1.0 + alpha) / (1.0 - alpha)


def buckets(values: np.ndarray, alpha: float = DEFAULT_ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """``(sign int8, bucket int32)`` of finite ``values`` (bucket 0 for zeros)."""
    v = np.asarray(values, np.float64)
    sign = np.sign(v).astype(np.int8)
    k = np.zeros(v.shape, np.int32)
    nz = sign != 0
    k[nz] = np.ceil(np.log(np.abs(v[nz])) / np.log(gamma(alpha))).astype(np.int32)
    return sign, k


def representatives(
    sign: np.ndarray, bucket: np.ndarray, alpha: float = DEFAULT_ALPHA
) -> np.ndarray:
    """The value each bucket stands for: ``sign * 2 gamma^k / (gamma + 1)`` (0 for zeros)."""
    g = gamma(alpha)
    mag = np.exp(np.asarray(bucket, np.float64) * np.log(g) + np.log(2.0 / (g + 1.0)))
    return np.asarray(sign, np.float64) * mag


def ordinals(sign: np.ndarray, bucket: np.ndarray) -> np.ndarray:
    """An int64 per bucket that sorts like the values it holds (negatives, zero, positives)."""
    s = np.asarray(sign, np.int64)
    return s * (_SIDE + np.asarray(bucket, np.int64))


def sketch(codes: np.ndarray, values: np.ndarray, alpha: float = DEFAULT_ALPHA) -> pd.DataFrame:
    """The sketch of finite ``values`` per group ``codes`` (ints >= 0, one per value): columns
    ``code``, ``sign``, ``bucket``, ``count``, sorted by code and value (one sort of the values'
    packed (code, bucket ordinal) keys)."""
    sign, bucket = buckets(values, alpha)
    if sign.size == 0:
        return pd.DataFrame({"code": codes[:0], "sign": sign, "bucket": bucket, "count": codes[:0]})
    order = ordinals(sign, bucket)
    low = order.min()
    span = order.max() - low + 1
    keys, count = np.unique(np.asarray(codes, np.int64) * span + (order - low), return_counts=True)
    order = keys % span + low
    sign = np.sign(order).astype(np.int8)
    bucket = np.where(sign != 0, np.abs(order) - _SIDE, 0).astype(np.int32)
    return pd.DataFrame({"code": keys // span, "sign": sign, "bucket": bucket, "count": count})


def sort_sketch(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """``frame`` sorted by its group ``keys`` and then by value (bucket ordinal)."""
    order = ordinals(frame["sign"].to_numpy(), frame["bucket"].to_numpy())
    return (
        frame.assign(_ord=order)
        .sort_values([*keys, "_ord"], kind="stable", ignore_index=True)
        .drop(columns="_ord")
    )


def merge_sketches(frames: Sequence[pd.DataFrame], keys: Sequence[str]) -> pd.DataFrame:
    """Sketches (of the same ``alpha``) merged: counts of equal (key, sign, bucket) added."""
    keys = list(keys)
    both = pd.concat(frames, ignore_index=True)
    out = both.groupby([*keys, "sign", "bucket"], sort=False, observed=True)["count"].sum()
    return sort_sketch(out.reset_index(), keys)


def counted_quantiles(
    groups: np.ndarray, values: np.ndarray, counts: np.ndarray, qs: Sequence[float], n_groups: int
) -> np.ndarray:
    """``[n_groups, len(qs)]`` numpy-``linear`` quantiles of values given with multiplicities.

    Rows are sorted by (group code, value); ``values[i]`` occurs ``counts[i]`` times in group
    ``groups[i]``. Exact for exact values (a histogram on a grid); NaN for empty groups.
    """
    counts = np.asarray(counts, np.int64)
    values = np.asarray(values, np.float64)
    total = np.bincount(groups, weights=counts, minlength=n_groups).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(total)[:-1]])
    cum = np.cumsum(counts)
    out = np.full((n_groups, len(qs)), np.nan)
    has = total > 0
    for j, q in enumerate(qs):
        h = q * (total[has] - 1)
        lo = np.floor(h).astype(np.int64)
        hi = np.minimum(lo + 1, total[has] - 1)
        v_lo = values[np.searchsorted(cum, start[has] + lo, side="right")]
        v_hi = values[np.searchsorted(cum, start[has] + hi, side="right")]
        out[has, j] = v_lo + (h - lo) * (v_hi - v_lo)
    return out


def sketch_quantiles(
    frame: pd.DataFrame,
    keys: Sequence[str],
    qs: Sequence[float],
    alpha: float = DEFAULT_ALPHA,
    *,
    bounds: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Quantiles ``qs`` per group of a sketch (see the module docstring for the error bound):
    one row per group of ``keys``, a column per quantile. ``bounds``: exact ``min``/``max`` per
    group (indexed by ``keys``) to clamp to."""
    keys = list(keys)
    frame = sort_sketch(frame, keys)
    codes = frame.groupby(keys, sort=False, observed=True).ngroup().to_numpy()
    index = frame.drop_duplicates(keys)[keys].reset_index(drop=True)
    reps = representatives(frame["sign"].to_numpy(), frame["bucket"].to_numpy(), alpha)
    q = counted_quantiles(codes, reps, frame["count"].to_numpy(), qs, len(index))
    out = pd.DataFrame(q, columns=[str(x) for x in qs])
    if bounds is not None:
        b = bounds.reindex(pd.MultiIndex.from_frame(index) if len(keys) > 1 else index[keys[0]])
        lo, hi = b["min"].to_numpy()[:, None], b["max"].to_numpy()[:, None]
        out[:] = np.clip(out.to_numpy(), lo, hi)
        for j, x in enumerate(qs):
            if x == 0.0:
                out.iloc[:, j] = lo[:, 0]
            elif x == 1.0:
                out.iloc[:, j] = hi[:, 0]
    return pd.concat([index, out], axis=1)
