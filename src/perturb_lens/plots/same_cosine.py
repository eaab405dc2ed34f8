"""The figure set of same-cosine runs: each metric against cos(y, x), one panel per generator of
the random part (mean, interquartile and 5-95 % bands), with the SAE points drawn over them: every
token's (cos(SAE(x), x), metric of SAE(x)) as a scatter, and their means per nearest grid cosine."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from perturb_lens.analysis import tables as an
from perturb_lens.config.schema import SAE_LABEL
from perturb_lens.plots.figures import _grid, _tag, series_color
from perturb_lens.plots.registry import Plot, RunReader, register_figures
from perturb_lens.plots.sets import metric_label, run_title
from perturb_lens.plots.style import marker_for, style

MAX_POINTS = 3000  # SAE points drawn per figure (a seeded sample beyond that)
SAE_COLOR = "#222222"


def cosine_curves(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per generator and grid cosine (``length``): mean, median, quartiles, 5/95 % quantiles and
    the 95 % interval of the mean (``analysis.curves``), without the SAE rows."""
    grid = rows[rows["direction"].astype(str) != SAE_LABEL]
    return an.curves(grid, metric).assign(direction=lambda d: d["direction"].astype(str))


def sae_bins(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per nearest grid cosine (``length``) of the SAE points: their number, mean ``metric`` with
    its 95 % interval, and their mean own cosine (``cosine``, where the bin is drawn)."""
    sae = rows[rows["direction"].astype(str) == SAE_LABEL]
    if sae.empty:
        return pd.DataFrame(columns=["length", "n", "mean", "cosine"])
    out = an.curves(sae, metric, by=("length",), stat=("mean",))
    return out.assign(cosine=sae.groupby("length")["cosine"].mean().to_numpy())


def sae_points(rows: pd.DataFrame, metric: str, limit: int = MAX_POINTS) -> pd.DataFrame:
    """The SAE points (``seq``, ``pos``, own ``cosine``, ``metric``): all, or a seeded sample of
    ``limit`` of them."""
    columns = ["seq", "pos", "cosine", metric]
    sae = rows[rows["direction"].astype(str) == SAE_LABEL]
    if sae.empty:  # a run without an SAE
        return pd.DataFrame(columns=columns)
    sae = sae[columns]
    if len(sae) > limit:
        sae = sae.sample(limit, random_state=0).sort_index()
    return sae.reset_index(drop=True)


def cosine_panels(
    curves: pd.DataFrame,
    bins: pd.DataFrame,
    points: pd.DataFrame,
    *,
    metric: str,
    ylabel: str,
    title: str,
) -> Figure:
    """One panel per generator: its mean curve with quantile bands, the SAE scatter and the SAE
    binned means over it."""
    names = list(dict.fromkeys(curves["direction"]))
    with style():
        fig, axes = _grid(len(names), 3, (4.4, 3.4), title)
        for ax, name in zip(axes, names, strict=True):
            d = curves[curves["direction"] == name].sort_values("length")
            c = series_color(name)
            for i, (lo, hi) in enumerate((("q25", "q75"), ("q05", "q95"))):
                _tag(
                    ax.fill_between(d["length"], d[lo], d[hi], color=c, alpha=0.25 / (i + 1)), name
                )
            line = ax.plot(d["length"], d["mean"], color=c, marker=marker_for(name), label=name)
            _tag(line, name)
            if len(points):
                dots = ax.scatter(
                    points["cosine"], points[metric], s=5, color=SAE_COLOR, alpha=0.25, lw=0
                )
                dots.set_label(f"{SAE_LABEL} (tokens)")
                _tag(dots, SAE_LABEL)
                means = ax.plot(
                    bins["cosine"],
                    bins["mean"],
                    color=SAE_COLOR,
                    marker="D",
                    ls=":",
                    label=f"{SAE_LABEL} (binned mean)",
                )
                _tag(means, SAE_LABEL)
            ax.set_title(name)
            ax.set_xlabel("cos(y, x)")
            ax.set_ylabel(ylabel)
            ax.legend(loc="upper right")
    return fig


def ratio_text(view: RunReader) -> str:
    """The norm ratio of the run's targets, in words."""
    ratio = (view.config.get("same_cosine") or {}).get("norm_ratio", 0.9)
    return "the SAE's own ||SAE(x)||/||x||" if ratio == "sae" else f"{ratio:g}"


def same_cosine_plot(view: RunReader, metric: str) -> Plot:
    """One metric against the cosine grid, per generator, with the SAE points over it."""
    rows = view.rows
    curves, bins, points = (
        cosine_curves(rows, metric),
        sae_bins(rows, metric),
        sae_points(rows, metric),
    )
    figure = cosine_panels(
        curves,
        bins,
        points,
        metric=metric,
        ylabel=metric_label(metric, view, stat=""),
        title=f"Same-cosine {metric} (||y||/||x|| = {ratio_text(view)}): {run_title(view)}",
    )
    caption = (
        f"{metric} after replacing x by y with cos(y, x) on the grid and ||y||/||x|| = "
        f"{ratio_text(view)}, the part of y orthogonal to x drawn from each generator: mean "
        "(line), interquartile range (dark band), 5-95 % (light band) over tokens."
    )
    if len(points):
        caption += (
            f" Dots: SAE(x) of single tokens at their own cosine ({len(points)} shown); diamonds: "
            "their mean per nearest grid cosine, drawn at the bin's mean cosine. Above the curve: "
            "SAE(x) is worse than a random perturbation of the same cosine."
        )
    data = pd.concat(
        [
            curves.assign(kind="curve"),
            bins.assign(kind="sae-bin", direction=SAE_LABEL),
            points.assign(kind="sae-point", direction=SAE_LABEL),
        ],
        ignore_index=True,
    )
    series = [*dict.fromkeys(curves["direction"]), *([SAE_LABEL] if len(points) else [])]
    return Plot(
        f"same_cosine_{metric}", f"Same cosine · {metric}", caption, figure, data, True, series
    )


@register_figures("same-cosine")
def same_cosine_figures(view: RunReader) -> list[Plot]:
    """Every metric against cos(y, x), per generator, with the SAE points."""
    return [same_cosine_plot(view, m) for m in view.metrics]
