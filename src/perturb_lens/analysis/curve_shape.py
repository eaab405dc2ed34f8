"""Shape statistics of perturbation curves (one curve = one token's metric along the length grid).

The interpolation experiments (Giglemiani et al.; Heimersheim's activation plateaus; Janiak et
al.'s stable regions) summarise each curve ``y_0, ..., y_{L-1}`` (the metric at grid steps
``0..L-1``) by a few numbers:

- **max-slope step**: the step ``i`` in ``1..L-1`` whose increase ``y_i - y_{i-1}`` is the largest
  (the first such step on ties);
- **plateau length**: the first step ``i`` with ``y_i > threshold`` (``threshold`` absolute, or
  times the end-point value ``y_{L-1}`` when ``relative``); NaN if the curve never exceeds it;
- **sharpness**: the largest step-to-step increase divided by the end-point value,
  ``max_i (y_i - y_{i-1}) / y_{L-1}`` (Janiak et al.); NaN when ``y_{L-1} = 0``.

Array functions work on ``[..., L]``; :func:`curve_statistics` turns a results frame into one row
per curve; :func:`statistic_summary` and :func:`ks_vs_reference` compare target types.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from perturb_lens.analysis.tables import _group_stats, _require, ks_distances

CURVE_STATISTICS = ("max_slope_step", "plateau_length", "sharpness")


def _as_curves(y: np.ndarray | Sequence[float]) -> np.ndarray:
    arr = np.asarray(y, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[-1] < 2:
        raise ValueError(f"curves need at least 2 points along the last axis; got {arr.shape}")
    return arr


def max_slope_step(y: np.ndarray | Sequence[float]) -> np.ndarray:
    """Step ``i`` (1..L-1) of the largest increase ``y_i - y_{i-1}`` per curve ``[..., L]``."""
    return np.argmax(np.diff(_as_curves(y), axis=-1), axis=-1) + 1


def plateau_length(
    y: np.ndarray | Sequence[float], threshold: float, *, relative: bool = False
) -> np.ndarray:
    """First step ``i`` with ``y_i > threshold`` (times ``y_{L-1}`` if ``relative``), else NaN."""
    arr = _as_curves(y)
    thr = threshold * arr[..., -1:] if relative else threshold
    above = arr > thr
    first = np.argmax(above, axis=-1).astype(np.float64)
    return np.where(above.any(axis=-1), first, np.nan)


def sharpness(y: np.ndarray | Sequence[float]) -> np.ndarray:
    """Largest step-to-step increase over the end-point value, per curve; NaN if that is 0."""
    arr = _as_curves(y)
    end = arr[..., -1]
    jump = np.diff(arr, axis=-1).max(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(end != 0, jump / np.where(end != 0, end, 1.0), np.nan)


def curve_matrix(
    df: pd.DataFrame, metric: str, unit: Sequence[str] = ("seq", "pos", "direction")
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """``(units, lengths [L], values [n_units, L])``: each unit's curve sorted by length.

    Every unit must have the same length grid (one row per length).
    """
    unit = list(unit)
    _require(df, [*unit, "length", metric])
    data = df[[*unit, "length", metric]].sort_values([*unit, "length"], kind="stable")
    sizes = data.groupby(unit, observed=True, sort=False).size()
    n_len = int(sizes.iloc[0]) if len(sizes) else 0
    if len(sizes) == 0 or (sizes != n_len).any():
        raise ValueError(
            f"every curve needs the same number of lengths; got {sorted(set(sizes.tolist()))} "
            f"per {unit} (filter the frame to one grid, or add the distinguishing column to unit)"
        )
    lengths = data["length"].to_numpy(np.float64).reshape(-1, n_len)
    if not np.allclose(lengths, lengths[:1]):
        raise ValueError(f"curves per {unit} do not share one length grid")
    values = data[metric].to_numpy(np.float64).reshape(-1, n_len)
    units = data[unit].iloc[::n_len].reset_index(drop=True)
    return units, lengths[0], values


def curve_metric(metrics: Sequence[str]) -> str:
    """The metric whose curves the interpolation experiments summarise: L2 if measured, else the
    first one."""
    return "l2" if "l2" in metrics else metrics[0]


def curve_statistics(
    df: pd.DataFrame,
    metric: str = "l2",
    *,
    unit: Sequence[str] | None = None,
    threshold: float = 0.1,
    relative: bool = True,
) -> pd.DataFrame:
    """One row per curve: ``unit`` columns, ``max_slope_step``, ``plateau_length``,
    ``sharpness`` and ``end_value`` (the metric at the last length).

    ``unit`` defaults to ``seq, pos, direction`` (plus ``base`` for plateau runs);
    ``threshold``/``relative``: the plateau threshold (default: 10% of the end-point value).
    """
    if unit is None:
        unit = ["seq", "pos", *(["base"] if "base" in df.columns else []), "direction"]
    units, _, values = curve_matrix(df, metric, unit)
    out = units.copy()
    out["max_slope_step"] = max_slope_step(values)
    out["plateau_length"] = plateau_length(values, threshold, relative=relative)
    out["sharpness"] = sharpness(values)
    out["end_value"] = values[:, -1]
    out.attrs.update(metric=metric, threshold=threshold, relative=relative)
    return out


def statistic_summary(
    stats: pd.DataFrame,
    statistic: str = "max_slope_step",
    *,
    by: Sequence[str] = ("direction",),
    stat: Sequence[str] = ("mean", "std", "q25", "median", "q75"),
) -> pd.DataFrame:
    """``n`` and ``stat`` (mean, std, quantiles ``qXX``...) of one curve statistic per group."""
    _require(stats, [*by, statistic])
    g = stats.groupby(list(by), observed=True, sort=True)[statistic]
    out = _group_stats(g, stat).reset_index()
    out.attrs.update(statistic=statistic)
    return out


def ks_vs_reference(
    stats: pd.DataFrame,
    statistic: str = "max_slope_step",
    *,
    reference: str,
    by: str = "direction",
) -> pd.DataFrame:
    """Per group of ``by``: ``n``, ``mean``, ``std`` of ``statistic`` and its two-sample
    Kolmogorov-Smirnov distance (``ks``, ``pvalue``) to the ``reference`` group (Giglemiani et
    al.'s table; NaN values left out)."""
    summary = statistic_summary(stats, statistic, by=[by], stat=("mean", "std"))
    if reference not in set(summary[by]):
        raise KeyError(f"reference {reference!r} not among the {by} values {list(summary[by])}")
    pairs = ks_distances(stats, statistic, by=by)
    pairs = pairs[(pairs["a"] == reference) | (pairs["b"] == reference)]
    other = pairs["b"].where(pairs["a"] == reference, pairs["a"])
    ks = pd.DataFrame({by: other, "ks": pairs["ks"], "pvalue": pairs["pvalue"]})
    ks = pd.concat([ks, pd.DataFrame({by: [reference], "ks": [0.0], "pvalue": [1.0]})])
    out = summary.merge(ks, on=by, how="left")
    out.attrs.update(statistic=statistic, reference=reference)
    return out
