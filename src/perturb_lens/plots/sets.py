"""The figure sets: generic curves, sensitive directions (Lee & Heimersheim figures 1-2, their L2
versions, supplementary 1-2, and more), SAE substitution (figures 3-4, supplementary 3), and
building blocks for the interpolation experiments (distributions with KS distances, sharpness)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from perturb_lens.analysis import tables as an
from perturb_lens.common.hooks import read_hook
from perturb_lens.metrics.builtin import get_metric, metric_names
from perturb_lens.plots.figures import (
    bar_panels,
    distribution_figure,
    histogram_panels,
    interval_figure,
    line_panels,
    scatter_figure,
    token_panels,
)
from perturb_lens.plots.registry import Plot, RunReader, register_figures
from perturb_lens.plots.token_view import label_curves

# Lee & Heimersheim figure 1: difference vs mixture, per target family.
FIG1_PANELS = {
    "cov-random: difference vs mixture": ("cov-random-difference", "cov-random-mixture"),
    "real: difference vs mixture": ("real-difference", "real-mixture"),
}
# Figure 2: the three target families, with (difference) and without (mixture) -x.
FIG2_PANELS = {
    "difference directions (include -x)": (
        "isotropic-difference",
        "cov-random-difference",
        "real-difference",
    ),
    "mixture directions (no -x)": ("isotropic", "cov-random-mixture", "real-mixture"),
}
# Figures 7-8 show bars at alpha = 20, 40, 61 on a grid reaching 91: the same fractions of any grid.
BAR_FRACTIONS = (20 / 91, 40 / 91, 61 / 91)
N_TOKEN_CURVES = 5


def short_hook(hook: object) -> str:
    """``blocks.11.hook_resid_post`` -> ``L11 resid_post`` (other names unchanged)."""
    h = read_hook(hook)
    return f"L{h.layer} {h.kind.removeprefix('hook_')}" if h else str(hook)


def metric_label(metric: str, view: RunReader | None = None, stat: str = "mean") -> str:
    """Axis label of a metric from the metric registry (``stat`` in front: "mean KL ...")."""
    read = short_hook(view.meta.get("read")) if view and view.meta.get("read") else "a later layer"
    if metric not in metric_names():
        return f"{stat} {metric}".strip()
    return get_metric(metric).axis_label(read, stat)


def metric_threshold(metric: str) -> float | None:
    """The registered default threshold of a metric (None: no threshold figure)."""
    return get_metric(metric).threshold if metric in metric_names() else None


def length_label(view: RunReader) -> str:
    """x-axis label: the length, and its unit when the grid is relative to the median norm."""
    if view.curve_stats:  # interpolation experiments
        return "interpolation t (0: the activation, 1: the target)"
    if view.config.get("relative_lengths"):
        return f"perturbation length α (median norm = {view.meta.get('median_norm', 0):.3g})"
    return "perturbation length α"


def run_title(view: RunReader) -> str:
    """A short line naming the run: model, hook, scope."""
    m = view.meta
    return f"{m.get('model', '?')} · {short_hook(m.get('hook', '?'))} · {m.get('scope', '?')}"


def _panels(cv: pd.DataFrame, spec: dict[str, Sequence[str]]) -> dict[str, pd.DataFrame]:
    """Panel title -> the curve rows of its directions present in the run (empty panels go)."""
    out = {}
    for title, names in spec.items():
        d = cv[cv["direction"].isin(names)]
        if len(d):
            order = {n: i for i, n in enumerate(names)}
            out[title] = d.sort_values("direction", key=lambda s: s.map(order), kind="stable")
    return out


def _series(frame: pd.DataFrame, column: str = "direction") -> list[str]:
    return [str(v) for v in dict.fromkeys(frame[column].tolist())]


def published_panels(view: RunReader, metric: str) -> list[Plot]:
    """Figures 1 and 2 (and their L2 versions): mean with 95 % bootstrap band vs length."""
    cv = view.curves(metric)
    out = []
    for fig, spec, what in (
        (1, FIG1_PANELS, "“difference” (includes −x) against “mixture” directions"),
        (2, FIG2_PANELS, "isotropic, cov-random and real directions"),
    ):
        panels = _panels(cv, spec)
        if not panels:
            continue
        name = f"fig{fig}_{metric}"
        figure = line_panels(
            panels,
            xlabel=length_label(view),
            ylabel=metric_label(metric, view),
            title=f"Figure {fig} ({metric.upper()}): {run_title(view)}",
        )
        data = pd.concat(list(panels.values()))
        caption = (
            f"Lee & Heimersheim figure {fig}{' (L2 version)' if metric == 'l2' else ''}: "
            f"{what}. Mean {metric} over tokens vs perturbation length; shaded: 95 % bootstrap "
            "interval of the mean."
        )
        out.append(
            Plot(name, f"Figure {fig} · {metric}", caption, figure, data, True, _series(data))
        )
    return out


def curve_plots(view: RunReader, metric: str) -> list[Plot]:
    """Every direction's mean curve; quantile bands and medians; individual token curves."""
    cv = view.curves(metric)
    xlabel, ylabel = length_label(view), metric_label(metric, view)
    series = _series(cv)
    overview = line_panels(
        {"all directions": cv},
        xlabel=xlabel,
        ylabel=ylabel,
        title=f"Mean {metric} by direction: {run_title(view)}",
        panel_size=(7.0, 4.4),
    )
    per_dir = {s: cv[cv["direction"] == s] for s in series}
    quant = line_panels(
        per_dir,
        y=("mean", "median"),
        bands=(("q25", "q75"), ("q05", "q95")),
        xlabel=xlabel,
        ylabel=metric_label(metric, view, stat=""),
        title=f"Distribution over tokens of {metric}: {run_title(view)}",
        ncols=3,
        panel_size=(3.8, 2.9),
    )
    tc = label_curves(an.token_curves(view.token_sample(metric), N_TOKEN_CURVES, 0, metric), view)
    tokens = token_panels(
        tc,
        cv,
        metric=metric,
        xlabel=xlabel,
        ylabel=metric_label(metric, view, stat=""),
        title=f"{N_TOKEN_CURVES} individual token curves per direction ({metric})",
    )
    return [
        Plot(
            f"all_{metric}",
            f"All directions · {metric}",
            f"Mean {metric} over tokens for every direction; shaded: 95 % bootstrap interval.",
            overview,
            cv,
            True,
            series,
        ),
        Plot(
            f"quantiles_{metric}",
            f"Quantiles · {metric}",
            f"Per direction: mean (solid), median (dashed), interquartile range (dark band) and "
            f"5-95 % range (light band) of {metric} over tokens. The mean hides the shapes.",
            quant,
            cv,
            False,
            series,
        ),
        Plot(
            f"tokens_{metric}",
            f"Token curves · {metric}",
            f"{N_TOKEN_CURVES} randomly chosen tokens per direction (seed 0), with the mean in "
            "black: individual curves can be step-like where the mean is smooth. Legend: the "
            "token between bars, after a few tokens of its context.",
            tokens,
            tc,
            False,
            series,
        ),
    ]


def bar_lengths(view: RunReader) -> list[float]:
    """The lengths of figures 7-8: alpha = 20, 40, 61 (nearest on the grid) when the grid is
    absolute and reaches 61; else the same fractions (of 91) of the run's largest length."""
    grid = np.asarray(view.meta.get("lengths") or view.grid, dtype=float)
    if not view.config.get("relative_lengths") and grid.max() >= 61:
        return an.pick_lengths(view.lengths_frame, [20, 40, 61])
    return an.pick_lengths(view.lengths_frame, [f * grid.max() for f in BAR_FRACTIONS])


def bar_plot(view: RunReader, metric: str) -> Plot:
    """Figures 7-8 style: mean per direction at three lengths, with 95 % bootstrap whiskers."""
    data = view.bars(metric, bar_lengths(view))
    figure = bar_panels(
        data,
        ylabel=metric_label(metric, view),
        title=f"Mean {metric} at three lengths: {run_title(view)}",
    )
    caption = (
        f"Lee & Heimersheim figures 7-8 style: mean {metric} per direction at α = "
        f"{', '.join(f'{x:.3g}' for x in data.attrs['lengths'])} (20, 40 and 61 of the published "
        "grid's 91, as fractions of this grid); whiskers: 95 % bootstrap interval."
    )
    return Plot(f"bars_{metric}", f"Bars · {metric}", caption, figure, data, False, _series(data))


def threshold_plot(view: RunReader, metric: str, threshold: float) -> Plot:
    """Histogram per direction of the length at which a token's metric first exceeds
    ``threshold``; the fraction that never does is noted in each panel."""
    grid = view.grid
    first = grid[0] - (grid[1] - grid[0] if grid.size > 1 else 1.0)
    hist = view.threshold_histogram(metric, threshold, np.r_[first, grid])
    summary = view.threshold_summary(metric, threshold)
    notes = {
        str(r.direction): f"never: {r.frac_never:.0%}\nmedian α: {r.median:.3g}"
        for r in summary.itertuples()
    }
    figure = histogram_panels(
        hist,
        y="density",
        ylabel="density of crossing α",
        notes=notes,
        xlabel=f"first α with {metric} > {threshold:g}",
        title=f"Where {metric} first exceeds {threshold:g}: {run_title(view)}",
    )
    caption = (
        f"Per direction: where a token's {metric} first exceeds {threshold:g}. A token first above "
        "it at grid length L crossed between the previous grid length and L: one bar per such "
        "interval, height = density over the tokens that cross. Also: the fraction that never "
        "does, and the median first length."
    )
    return Plot(
        f"threshold_{metric}", f"Threshold · {metric}", caption, figure, hist, False, _series(hist)
    )


@register_figures("curves")
def curve_figures(view: RunReader) -> list[Plot]:
    """Generic figures of any run over lengths: for each metric, all directions' means,
    quantile bands, token curves, bars at three lengths and threshold-crossing histograms."""
    view.prefetch_curves(view.metrics)
    out: list[Plot] = []
    for metric in view.metrics:
        out += curve_plots(view, metric)
    for metric in view.metrics:
        out.append(bar_plot(view, metric))
        threshold = metric_threshold(metric)
        if threshold is not None:
            out.append(threshold_plot(view, metric, threshold))
    return out


@register_figures("sensitive-directions")
def sensitive_direction_figures(view: RunReader) -> list[Plot]:
    """Lee & Heimersheim figures 1-2 for KL and L2 (supplementary 1-2 for a layer-2 run), then
    the generic curve figures (SAE error / feature runs: figures 5-8 per SAE); a one-length run
    (SAE substitution) gets :func:`sae_substitution_figures`. Per-layer and per-SAE figures:
    ``perturb-lens compare`` of the runs (e.g. an SAE suite's ``OUT/*``)."""
    if len(view.grid) == 1:  # SAE substitution: one length, SAE(x) vs baselines
        return sae_substitution_figures(view)
    view.prefetch_curves(view.metrics)
    out: list[Plot] = []
    for metric in view.metrics:
        out += published_panels(view, metric)
    return out + curve_figures(view)


@register_figures("sae-substitution")
def sae_substitution_figures(view: RunReader) -> list[Plot]:
    """Figures 3-4 (mean of each metric for SAE(x) against the epsilon-baselines, per direction
    over all its rows) and supplementary figure 3 (mean ``size`` = ||SAE(x) - x|| against mean KL
    per SAE direction), from the streamed aggregates: memory flat in the run's rows."""
    directions = {d: [d] for d in view.aggregates(view.metrics[0]).labels}
    out = []
    for metric in view.metrics:
        data = view.pooled(metric, directions, stat=("mean", "median"))
        figure = bar_panels(
            data,
            panel=None,
            ylabel=metric_label(metric, view),
            title=f"Substitution: mean {metric} of SAE(x) and baselines · {run_title(view)}",
        )
        caption = (
            f"Lee & Heimersheim figures 3-4: mean {metric} after substituting SAE(x) or an "
            "epsilon-baseline at the same distance; whiskers: 95 % bootstrap interval "
            "(sequences resampled)."
        )
        out.append(
            Plot(f"substitution_{metric}", f"Substitution · {metric}", caption, figure, data)
        )
    if "size" in view.columns and "kl" in view.columns and sae_directions(view):
        points = size_kl_points(view, {d: [d] for d in sae_directions(view)}, "direction")
        out.append(size_kl_plot(points, run_title(view)))
    return out


def sae_directions(view: RunReader) -> list[str]:
    """Labels of the run's SAE directions (config name ``sae-*``, e.g. ``SAE(x)``)."""
    out = []
    for d in view.config.get("directions", []):
        spec = {"name": d} if isinstance(d, str) else d
        if str(spec.get("name", "")).startswith("sae"):
            out.append(str(spec.get("label") or spec["name"]))
    return out


def size_kl_points(view: RunReader, groups: dict[str, list[str]], by: str) -> pd.DataFrame:
    """``analysis.scatter_points(rows, "size", "kl", by=[by])`` of a run streamed: per group
    (``by`` value -> directions), the mean and 95 % interval of ``size`` and of ``kl``."""
    parts = []
    for col in ("size", "kl"):
        c = view.pooled(col, groups).drop(columns="ci_method")
        parts.append(c.rename(columns={k: f"{col}_{k}" for k in ("mean", "ci_low", "ci_high")}))
    out = parts[0].merge(parts[1].drop(columns="n"), on="direction")
    out = out.assign(direction=out["direction"].astype(str)).rename(columns={"direction": by})
    out.attrs.update(x="size", y="kl")
    return out


def size_kl_plot(points: pd.DataFrame, title: str, palette: dict[str, str] | None = None) -> Plot:
    """Supplementary figure 3: mean reconstruction error (``size``) against mean KL of SAE(x),
    one point per row of ``points`` (:func:`size_kl_points`: an SAE, a run)."""
    figure = scatter_figure(
        points,
        x="size_mean",
        y="kl_mean",
        label=points.columns[0],
        xerr=("size_ci_low", "size_ci_high"),
        yerr=("kl_ci_low", "kl_ci_high"),
        palette=palette,
        xlabel="mean reconstruction error ||SAE(x) − x||",
        ylabel=metric_label("kl"),
        title=f"Reconstruction error vs KL of SAE(x) · {title}",
    )
    caption = (
        "Lee & Heimersheim supplementary figure 3: mean reconstruction error against mean KL "
        "of SAE(x), one point per SAE (whiskers: 95 % bootstrap intervals, sequences resampled)."
    )
    return Plot("scatter_size_kl", "Error vs KL", caption, figure, points)


def distribution_plot(
    stats: pd.DataFrame,
    column: str,
    *,
    by: str = "target",
    name: str | None = None,
    title: str | None = None,
    bins: int | Sequence[float] = 30,
) -> Plot:
    """Giglemiani et al.: the distribution of a per-curve statistic (``column``, e.g. the step
    of maximal slope or the plateau length) per ``by`` group, with pairwise KS distances."""
    values = stats[column].dropna().to_numpy(float)
    if values.size and np.all(values == np.round(values)) and np.ptp(values) <= 100:
        bins = np.arange(values.min() - 0.5, values.max() + 1.5)  # steps: one bin per integer
    hist = an.histograms(stats, column, by=[by], bins=bins)
    kde = an.kde_curves(stats, column, by=[by])
    ks = an.ks_distances(stats, column, by=by)
    figure = distribution_figure(hist, kde, ks, series=by, xlabel=column, title=title)
    caption = (
        f"Distribution of {column} per {by}: density histograms, Gaussian KDE (lines), and the "
        "two-sample Kolmogorov-Smirnov distance between every pair (right)."
    )
    data = ks.assign(column=column)
    return Plot(
        name or f"dist_{column}", title or column, caption, figure, data, False, _series(hist, by)
    )


def sharpness_plot(
    stats: pd.DataFrame,
    column: str = "sharpness",
    *,
    by: str = "model",
    series: str | None = None,
    name: str | None = None,
    title: str | None = None,
) -> Plot:
    """Stable regions (Janiak et al.): quartiles (and 5-95 %) of a per-curve statistic such as
    the transition sharpness, per ``by`` group (model size, checkpoint), one colour per
    ``series``."""
    keys = [by] + ([series] if series else [])
    data = an.curves(stats, column, by=keys, stat=("median", "q05", "q25", "q75", "q95"), ci=None)
    figure = interval_figure(data, x=by, series=series, xlabel=by, ylabel=column, title=title)
    caption = (
        f"{column} per {by}: median (dot), interquartile range (thick) and 5-95 % range (thin)."
    )
    return Plot(
        name or f"quantiles_{column}",
        title or column,
        caption,
        figure,
        data,
        False,
        _series(data, series) if series else ["all"],
    )


def interpolation_stats(view: RunReader) -> tuple[pd.DataFrame, str, str]:
    """``(curve statistics, series column, metric)`` of an interpolation run: one row per curve
    (``curve_statistics`` of L2, else the first metric); plateau runs' series is base · target."""
    from perturb_lens.analysis.curve_shape import curve_metric, curve_statistics

    metric = curve_metric(view.metrics)
    stats = curve_statistics(view.rows, metric)
    if "base" not in stats.columns:
        return stats, "direction", metric
    target = stats["base"].astype(str) + " · " + stats["direction"].astype(str)
    return stats.assign(target=target), "target", metric


@register_figures("interpolation")
def interpolation_figures(view: RunReader) -> list[Plot]:
    """Synthetic activations, plateaus, stable regions: the distribution of each curve statistic
    the experiment registered (``curve_stats``) per target type with KS distances (Giglemiani et
    al.), sharpness quartiles per target when sharpness is one (stable regions; across models:
    ``perturb-lens compare``), then the curve figures of the metric."""
    stats, by, metric = interpolation_stats(view)
    out = [
        distribution_plot(
            stats,
            column,
            by=by,
            name=f"dist_{column}",
            title=f"{column} per {by} ({metric}): {run_title(view)}",
        )
        for column in view.curve_stats
    ]
    if "sharpness" in view.curve_stats:
        out.append(
            sharpness_plot(stats, by=by, title=f"Sharpness ({metric}) per {by}: {run_title(view)}")
        )
    return out + curve_plots(view, metric)
