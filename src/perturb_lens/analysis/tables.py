"""Summaries of a results frame (one row per token x direction x length), as pandas DataFrames.

The published measure is the mean over tokens; the mean hides the curve shapes, so alongside it:
medians and quantiles (:func:`curves`), bootstrap confidence intervals of the mean, the length at
which a token's metric first exceeds a threshold (:func:`threshold_lengths`,
:func:`threshold_summary`), and a few individual token curves (:func:`token_curves`).

Only ``direction``, ``length`` and the metric column named by the caller are assumed; any other
grouping column (``sae``, ``layer``, ...) can be added through ``by``. Rows whose metric is NaN are
left out of every statistic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from perturb_lens.results.frames import (  # noqa: F401  (MissingColumnError, pick_lengths: re-exported)
    MissingColumnError,
    _quantile,
    _require,
    pick_lengths,
)
from perturb_lens.statistics.bootstrap import mean_intervals

STATS = ("mean", "median", "std", "min", "max")


def _group_stats(g: pd.core.groupby.SeriesGroupBy, stat: Sequence[str]) -> pd.DataFrame:
    """``n`` and each statistic named in ``stat`` (one of :data:`STATS` or ``qXX``) per group."""
    cols = {"n": g.count()}
    for name in stat:
        q = _quantile(name)
        if q is not None:
            cols[name] = g.quantile(q)
        elif name in STATS:
            cols[name] = g.agg(name)
        else:
            raise ValueError(f"unknown statistic {name!r}: use one of {STATS} or qXX (q05, q975)")
    return pd.DataFrame(cols)


def _indexed_out(out: pd.DataFrame | pd.Series, **attrs: object) -> pd.DataFrame:
    """``out`` with its group index as columns and ``attrs`` (the parameters that made it)."""
    out = out.reset_index()
    out.attrs.update(attrs)
    return out


def curves(
    df: pd.DataFrame,
    metric: str = "kl",
    *,
    by: Sequence[str] = ("direction", "length"),
    stat: Sequence[str] = ("mean", "median", "q05", "q25", "q75", "q95"),
    ci: float | None = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    boot_max_n: int = 10_000,
) -> pd.DataFrame:
    """Per group of ``by``: ``n``, the statistics in ``stat``, and a ``ci`` interval of the mean.

    Statistics: ``mean``, ``median``, ``std``, ``min``, ``max`` and quantiles ``qXX`` (``q05`` is
    the 5 % quantile, numpy's linear interpolation). ``ci_low``/``ci_high``: a percentile bootstrap
    of the mean (``n_boot`` resamples, reproducible from ``seed``) for groups of at most
    ``boot_max_n`` rows, and the normal approximation mean +- z s/sqrt(n) for bigger groups;
    column ``ci_method`` says which ("bootstrap" or "normal"). The bootstrap costs ``n_boot``
    random draws per row (~15 s per million bootstrapped rows at ``n_boot=1000``), hence the
    default cap; raise ``boot_max_n`` to bootstrap bigger groups, or pass ``ci=None`` to skip.
    Several metrics: :func:`curves_of`.
    """
    options = {"ci": ci, "n_boot": n_boot, "seed": seed, "boot_max_n": boot_max_n}
    return curves_of(df, [metric], by=by, stat=stat, **options)[metric]


def curves_of(
    df: pd.DataFrame,
    metrics: Sequence[str],
    *,
    by: Sequence[str] = ("direction", "length"),
    stat: Sequence[str] = ("mean", "median", "q05", "q25", "q75", "q95"),
    ci: float | None = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    boot_max_n: int = 10_000,
) -> dict[str, pd.DataFrame]:
    """:func:`curves` of each metric in ``metrics`` (metric -> frame), each equal to its own
    :func:`curves` call; metrics defined on the same rows (NaN in the same places) share the
    group-by and the bootstrap's draws, which are most of the cost."""
    by = list(by)
    metrics = list(dict.fromkeys(metrics))
    _require(df, [*by, *metrics])
    if ci is not None and not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    keys = df[by].notna().all(axis=1).to_numpy()
    shared: list[tuple[np.ndarray, list[str]]] = []  # (rows kept, the metrics defined on them)
    for metric in metrics:
        keep = keys & df[metric].notna().to_numpy()
        same = next((names for rows, names in shared if np.array_equal(rows, keep)), None)
        if same is None:
            shared.append((keep, [metric]))
        else:
            same.append(metric)
    out = {}
    for keep, names in shared:
        data = df.loc[keep, [*by, *names]].astype(dict.fromkeys(names, np.float64))
        g = data.groupby(by, observed=True, sort=True)
        frames = {m: _group_stats(g[m], stat) for m in names}
        if ci is not None:
            values = [data[m].to_numpy() for m in names]
            bounds = mean_intervals(values, g.ngroup().to_numpy(), ci, n_boot, seed, boot_max_n)
            for m, (lo, hi, method) in zip(names, bounds, strict=True):
                frames[m]["ci_low"], frames[m]["ci_high"], frames[m]["ci_method"] = lo, hi, method
        for m, frame in frames.items():
            attrs = {"ci": ci, "n_boot": n_boot, "seed": seed, "boot_max_n": boot_max_n}
            out[m] = _indexed_out(frame, metric=m, **attrs)
    return {m: out[m] for m in metrics}


def threshold_lengths(
    df: pd.DataFrame,
    metric: str = "kl",
    *,
    threshold: float,
    unit: Sequence[str] = ("seq", "pos", "direction"),
) -> pd.DataFrame:
    """Per ``unit`` (a token and its direction): the smallest length whose metric is > threshold.

    Column ``threshold_length`` is NaN where the metric never exceeds the threshold on the grid.
    Add grouping columns such as ``sae`` or ``layer`` to ``unit`` when the frame holds several.
    """
    unit = list(unit)
    _require(df, [*unit, "length", metric])
    crossed = df["length"].astype(np.float64).where(df[metric] > threshold)
    out = crossed.groupby([df[c] for c in unit], observed=True, sort=True).min()
    return _indexed_out(out.rename("threshold_length"), metric=metric, threshold=threshold)


def threshold_summary(
    df: pd.DataFrame,
    metric: str = "kl",
    *,
    threshold: float,
    unit: Sequence[str] = ("seq", "pos", "direction"),
    by: Sequence[str] = ("direction",),
    stat: Sequence[str] = ("median", "q05", "q25", "q75", "q95"),
) -> pd.DataFrame:
    """Per ``by`` group: ``n`` units, ``frac_never`` (never exceed the threshold) and ``stat``
    of :func:`threshold_lengths` over the units that do exceed it (``n_crossed`` of them)."""
    tl = threshold_lengths(df, metric, threshold=threshold, unit=unit)
    g = tl.groupby(list(by), observed=True, sort=True)["threshold_length"]
    out = _group_stats(g, stat).rename(columns={"n": "n_crossed"})
    out.insert(0, "n", g.size())
    out.insert(1, "frac_never", 1.0 - out["n_crossed"] / out["n"])
    return _indexed_out(out, metric=metric, threshold=threshold)


def summary_table(
    df: pd.DataFrame,
    metrics: Sequence[str] = ("kl", "l2"),
    lengths: Sequence[float] | None = None,
    *,
    by: Sequence[str] = ("direction",),
) -> pd.DataFrame:
    """Mean of each metric per direction at a few lengths, wide: columns ``kl@20``, ``l2@20``, ...

    Each requested length is replaced by the nearest length in the frame (the column label shows
    the one used); ``lengths=None`` picks four (see :func:`pick_lengths`).
    """
    by = list(by)
    metrics = list(metrics)
    _require(df, [*by, "length", *metrics])
    picked = pick_lengths(df, lengths)
    sub = df.loc[df["length"].isin(picked), [*by, "length", *metrics]]
    sub = sub.astype(dict.fromkeys(metrics, np.float64))
    means = sub.groupby([*by, "length"], observed=True, sort=True)[metrics].mean().unstack("length")
    out = pd.DataFrame(
        {f"{m}@{float(x):g}": means[(m, x)] for m in metrics for x in picked}, index=means.index
    )
    return out


def token_curves(
    df: pd.DataFrame,
    n: int = 5,
    seed: int = 0,
    metric: str = "kl",
    *,
    token: Sequence[str] = ("seq", "pos"),
    by: Sequence[str] = ("direction",),
) -> pd.DataFrame:
    """The whole curves of ``n`` randomly chosen tokens per direction, long format.

    Columns: ``by``, ``token``, ``length`` and ``metric``, sorted; reproducible from ``seed``.
    """
    by, token = list(by), list(token)
    _require(df, [*by, *token, "length", metric])
    units = df[[*by, *token]].drop_duplicates(ignore_index=True)
    units["_key"] = np.random.default_rng(seed).random(len(units))
    units = units.sort_values([*by, "_key"])
    chosen = units[units.groupby(by, observed=True).cumcount() < n].drop(columns="_key")
    out = df[[*by, *token, "length", metric]].merge(chosen, on=[*by, *token])
    return out.sort_values([*by, *token, "length"], ignore_index=True)


def _finite(values: pd.Series) -> np.ndarray:
    """The finite values of a column as float64 (NaN and inf left out)."""
    v = values.to_numpy(np.float64)
    return v[np.isfinite(v)]


def _keyed(frame: pd.DataFrame, by: Sequence[str], key: tuple) -> pd.DataFrame:
    """``frame`` with the group's ``by`` columns (values from ``key``) inserted in front."""
    for i, (name, value) in enumerate(zip(by, key, strict=True)):
        frame.insert(i, name, value)
    return frame


def bars(
    df: pd.DataFrame,
    metric: str = "kl",
    lengths: Sequence[float] | None = None,
    *,
    by: Sequence[str] = ("direction",),
    **curve_options: object,
) -> pd.DataFrame:
    """:func:`curves` at a few lengths (nearest grid lengths, :func:`pick_lengths`) per ``by``.

    The bars of Lee & Heimersheim figures 7-8 (alpha = 20, 40, 61): one row per ``by`` group and
    length with ``n``, the statistics and the bootstrap interval; ``curve_options`` go to
    :func:`curves`.
    """
    picked = pick_lengths(df, lengths)
    sub = df[df["length"].isin(picked)]
    out = curves(sub, metric, by=[*by, "length"], **curve_options)  # type: ignore[arg-type]
    out.attrs["lengths"] = picked
    return out


def scatter_points(
    df: pd.DataFrame,
    x: str = "size",
    y: str = "kl",
    *,
    by: Sequence[str] = ("direction",),
    **curve_options: object,
) -> pd.DataFrame:
    """Per ``by`` group the mean (and bootstrap interval) of two columns, side by side.

    Lee & Heimersheim supplementary figure 3: mean reconstruction error ``||SAE(x) - x||`` (column
    ``size``) against mean KL per SAE. Columns: ``by``, ``n``, then ``{x}_mean``, ``{x}_ci_low``,
    ``{x}_ci_high`` and the same for ``y``.
    """
    by = list(by)
    parts = []
    for col in (x, y):
        c = curves(df, col, by=by, stat=("mean",), **curve_options)  # type: ignore[arg-type]
        c = c.drop(columns=[k for k in ("ci_method",) if k in c.columns])
        keep = [k for k in c.columns if k not in (*by, "n")]
        parts.append(c.rename(columns={k: f"{col}_{k}" for k in keep}))
    out = parts[0].merge(parts[1].drop(columns="n"), on=by)
    out.attrs.update(x=x, y=y)
    return out


def histograms(
    df: pd.DataFrame,
    column: str,
    *,
    by: Sequence[str] = ("direction",),
    bins: int | Sequence[float] = 30,
    right: bool = False,
) -> pd.DataFrame:
    """Histogram of ``column`` per ``by`` group on bins shared by all groups, long format.

    ``bins``: a number of equal bins over the range of all groups' values, or explicit edges.
    Bins are ``[left, right)`` (numpy's rule, the last one closed), or ``(left, right]`` with
    ``right=True``: with the grid lengths as edges, a first-crossing length L then counts in
    the bin from the previous grid length to L, where the crossing happened.
    Columns: ``by``, ``bin_left``, ``bin_right``, ``count``, ``n`` (the group's non-NaN values),
    ``n_total`` (its rows, NaN included: e.g. tokens that never cross a threshold), ``fraction``
    (count / n_total) and ``density`` (count / (n * bin width), integrates to 1 over the bins).
    """
    by = list(by)
    _require(df, [*by, column])
    finite = _finite(df[column])
    if isinstance(bins, int):
        lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        edges = np.histogram_bin_edges(finite, bins=bins, range=(lo, hi if hi > lo else lo + 1))
    else:
        edges = np.asarray(bins, dtype=np.float64)
    rows = []
    for key, group in df.groupby(by, observed=True, sort=True):
        v = _finite(group[column])
        if right:
            idx = np.searchsorted(edges, v, side="left") - 1
            idx = idx[(idx >= 0) & (idx < edges.size - 1)]
            count = np.bincount(idx, minlength=edges.size - 1)
        else:
            count, _ = np.histogram(v, bins=edges)
        frame = pd.DataFrame(
            {"bin_left": edges[:-1], "bin_right": edges[1:], "count": count, "n": v.size}
        )
        frame["n_total"] = len(group)
        rows.append(_keyed(frame, by, key))
    out = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=[*by, "count"])
    width = out["bin_right"] - out["bin_left"]
    out["fraction"] = out["count"] / out["n_total"]
    out["density"] = (out["count"] / (out["n"] * width)).where(out["n"] > 0, 0.0)
    out.attrs["column"] = column
    return out


def kde_curves(
    df: pd.DataFrame,
    column: str,
    *,
    by: Sequence[str] = ("direction",),
    points: int = 200,
) -> pd.DataFrame:
    """Gaussian kernel density estimate (Scott's bandwidth) of ``column`` per ``by`` group.

    Evaluated on ``points`` values spanning all groups' range; columns ``by``, ``x``,
    ``density``. Groups with fewer than two distinct values are left out.
    """
    from scipy.stats import gaussian_kde

    by = list(by)
    _require(df, [*by, column])
    finite = _finite(df[column])
    if finite.size == 0:
        return pd.DataFrame(columns=[*by, "x", "density"])
    pad = 0.05 * (finite.max() - finite.min() or 1.0)
    x = np.linspace(finite.min() - pad, finite.max() + pad, points)
    rows = []
    for key, group in df.groupby(by, observed=True, sort=True):
        v = _finite(group[column])
        if np.unique(v).size < 2:
            continue
        frame = pd.DataFrame({"x": x, "density": gaussian_kde(v)(x)})
        rows.append(_keyed(frame, by, key))
    out = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=[*by, "x"])
    out.attrs["column"] = column
    return out


def ks_distances(df: pd.DataFrame, column: str, *, by: str = "direction") -> pd.DataFrame:
    """Two-sample Kolmogorov-Smirnov distance of ``column`` between every pair of ``by`` groups.

    Giglemiani et al. compare the distributions of a per-curve statistic (step of maximal slope,
    plateau length) for real, synthetic and random targets this way. Columns ``a``, ``b``,
    ``n_a``, ``n_b``, ``ks`` (the statistic) and ``pvalue``.
    """
    from scipy.stats import ks_2samp

    _require(df, [by, column])
    samples = {k: _finite(g) for k, g in df.groupby(by, observed=True, sort=True)[column]}
    names = list(samples)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            sa, sb = samples[a], samples[b]
            res = ks_2samp(sa, sb) if sa.size and sb.size else None
            rows.append(
                {
                    "a": a,
                    "b": b,
                    "n_a": sa.size,
                    "n_b": sb.size,
                    "ks": float(res.statistic) if res else np.nan,
                    "pvalue": float(res.pvalue) if res else np.nan,
                }
            )
    out = pd.DataFrame(rows, columns=["a", "b", "n_a", "n_b", "ks", "pvalue"])
    out.attrs["column"] = column
    return out
