"""Generic matplotlib figures drawn from aggregated frames (the analysis helpers' output).

Every function here only draws: the numbers come in as a DataFrame from
:mod:`perturb_lens.analysis.tables` (:func:`~perturb_lens.results.curves`, ``bars``,
``histograms``, ...), so a figure shows exactly what the analysis API returns. Each series is
tagged (SVG ``id`` containing ``pl--{series}--``) so the HTML report can show and hide it.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from perturb_lens.plots.style import LINESTYLES, SERIES_COLORS, color_for, marker_for, style

Palette = Mapping[str, str]
_ids = itertools.count()


def series_slug(name: object) -> str:
    """The key of a series in SVG ids and in the report's toggles (``[A-Za-z0-9_-]`` only)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(name))


def _tag(artist: Artist | Sequence[Artist], series: object) -> None:
    """Give the artist(s) an SVG id that names the series (see :func:`series_slug`)."""
    for a in artist if isinstance(artist, Sequence) else [artist]:
        a.set_gid(f"pl--{series_slug(series)}--{next(_ids)}")


def run_palette(names: Sequence[str]) -> dict[str, str]:
    """One colour per name, in order (for runs or other unnamed series)."""
    return {n: SERIES_COLORS[i % len(SERIES_COLORS)] for i, n in enumerate(names)}


def series_color(name: object, palette: Palette | None = None) -> str:
    """The colour of a series: from ``palette`` if it names it, else :func:`color_for`."""
    return palette[str(name)] if palette and str(name) in palette else color_for(str(name))


def _grid(n: int, ncols: int | None, size: tuple[float, float], title: str | None) -> tuple:
    """A figure with ``n`` axes in rows of ``ncols`` (unused cells removed)."""
    ncols = max(1, min(n, ncols or n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows + (0.4 if title else 0)))
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]
    if title:
        fig.suptitle(title, fontsize=12)
    fig.set_layout_engine("constrained")
    return fig, axes


def _values(frame: pd.DataFrame, column: str) -> list:
    """Distinct values of a column in order of appearance (categoricals: categories present)."""
    return list(dict.fromkeys(frame[column].tolist()))


@contextmanager
def _series_grid(
    frame: pd.DataFrame,
    series: str,
    ncols: int | None,
    size: tuple[float, float],
    title: str | None,
) -> Iterator[tuple[Figure, list[tuple[Axes, object]]]]:
    """Within :func:`style`: a :func:`_grid` with one panel per value of ``frame[series]``."""
    names = _values(frame, series)
    with style():
        fig, axes = _grid(len(names), ncols, size, title)
        yield fig, list(zip(axes, names, strict=True))


def _label(ax: Axes, title: object, xlabel: str, ylabel: str) -> None:
    """Set a panel's title and axis labels."""
    ax.set_title(str(title))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def line_panels(
    panels: Mapping[str, pd.DataFrame],
    *,
    x: str = "length",
    y: str | Sequence[str] = "mean",
    bands: Sequence[tuple[str, str]] = (("ci_low", "ci_high"),),
    series: str = "direction",
    linestyle_by: str | None = None,
    palette: Palette | None = None,
    xlabel: str = "perturbation length α",
    ylabel: str = "",
    title: str | None = None,
    ncols: int | None = None,
    sharey: bool = False,
    panel_size: tuple[float, float] = (4.6, 3.4),
) -> Figure:
    """One axes per panel; in each, a line of ``y`` against ``x`` per ``series`` value.

    ``y`` may name several columns: the first is drawn solid with markers, the others dashed
    (e.g. mean and median). ``bands`` are shaded ``(low, high)`` column pairs, lighter for the
    later ones; ``linestyle_by`` gives each value of that column its own line style (runs in a
    comparison). Each line's label is its series value (plus the ``linestyle_by`` value).
    """
    ys = [y] if isinstance(y, str) else list(y)
    with style():
        fig, axes = _grid(len(panels), ncols, panel_size, title)
        styles = {}
        if linestyle_by is not None:
            values = _values(pd.concat(list(panels.values())), linestyle_by)
            styles = {v: LINESTYLES[i % len(LINESTYLES)] for i, v in enumerate(values)}
        for ax, (name, data) in zip(axes, panels.items(), strict=True):
            keys = [series] + ([linestyle_by] if linestyle_by else [])
            for key, d in data.groupby(keys, observed=True, sort=False):
                d = d.sort_values(x)
                s = key[0]
                c = series_color(s, palette)
                ls = styles[key[1]] if linestyle_by else "-"
                label = f"{s} · {key[1]}" if linestyle_by else str(s)
                for i, (lo, hi) in enumerate(bands):
                    band = ax.fill_between(d[x], d[lo], d[hi], color=c, alpha=0.22 / (i + 1), lw=0)
                    _tag(band, s)
                for j, col in enumerate(ys):
                    line = ax.plot(
                        d[x],
                        d[col],
                        color=c,
                        ls=ls if j == 0 else "--",
                        lw=None if j == 0 else 1.1,
                        marker=marker_for(str(s)) if j == 0 else None,
                        label=label if j == 0 else f"{label} ({col})",
                    )
                    _tag(line, s)
            _label(ax, name, xlabel, ylabel)
            ax.legend(loc="upper left")
        if sharey and axes:
            top = max(ax.get_ylim()[1] for ax in axes)
            for ax in axes:
                ax.set_ylim(top=top)
    return fig


def token_panels(
    tokens: pd.DataFrame,
    means: pd.DataFrame,
    *,
    metric: str,
    series: str = "direction",
    token: Sequence[str] = ("seq", "pos"),
    x: str = "length",
    palette: Palette | None = None,
    xlabel: str = "perturbation length α",
    ylabel: str = "",
    title: str | None = None,
    ncols: int = 3,
) -> Figure:
    """Individual token curves (``tokens``, from :func:`~perturb_lens.results.token_curves`)
    per series, thin, with the series mean (``means``, from ``curves``) drawn bold in black;
    legends from a ``label`` column of ``tokens`` if it has one, else the ``token`` keys."""
    with _series_grid(tokens, series, ncols, (3.8, 2.9), title) as (fig, panels):
        for ax, s in panels:
            c = series_color(s, palette)
            for tok, d in tokens[tokens[series] == s].groupby(list(token), sort=True):
                label = (  # a "label" column: the token as text (plots.token_view.label_curves)
                    str(d["label"].iloc[0])
                    if "label" in d.columns
                    else "token " + ", ".join(f"{k}={v}" for k, v in zip(token, tok, strict=True))
                )
                _tag(ax.plot(d[x], d[metric], color=c, lw=1.0, alpha=0.75, label=label), s)
            m = means[means[series] == s].sort_values(x)
            _tag(ax.plot(m[x], m["mean"], color="black", lw=2.0, label="mean"), s)
            _label(ax, s, xlabel, ylabel)
            ax.legend(loc="upper left", fontsize=7)
    return fig


def histogram_panels(
    hist: pd.DataFrame,
    *,
    series: str = "direction",
    y: str = "fraction",
    notes: Mapping[str, str] | None = None,
    palette: Palette | None = None,
    xlabel: str = "",
    ylabel: str = "fraction of tokens",
    title: str | None = None,
    ncols: int = 3,
) -> Figure:
    """Small multiples of a histogram (from :func:`~perturb_lens.results.histograms`) per
    series, one bar per bin; ``notes`` adds a line of text to a series' panel."""
    with _series_grid(hist, series, ncols, (3.8, 2.7), title) as (fig, panels):
        for ax, s in panels:
            d = hist[hist[series] == s]
            width = d["bin_right"] - d["bin_left"]
            bars = ax.bar(
                d["bin_left"], d[y], width=width, align="edge", color=series_color(s, palette)
            )
            _tag(list(bars), s)
            _label(ax, s, xlabel, ylabel)
            if notes and str(s) in notes:
                ax.text(0.98, 0.95, notes[str(s)], transform=ax.transAxes, ha="right", va="top")
    return fig


def distribution_figure(
    hist: pd.DataFrame,
    kde: pd.DataFrame,
    ks: pd.DataFrame,
    *,
    series: str = "direction",
    palette: Palette | None = None,
    xlabel: str = "",
    title: str | None = None,
) -> Figure:
    """Distributions of a per-curve statistic for several groups (Giglemiani et al.): density
    histograms (step) and KDE lines overlaid, and the pairwise Kolmogorov-Smirnov distances."""
    names = _values(hist, series)
    with style():
        fig, (ax, ax_ks) = _grid(2, 2, (5.0, 3.6), title)
        for s in names:
            c = series_color(s, palette)
            d = hist[hist[series] == s]
            edges = np.r_[d["bin_left"].to_numpy(), d["bin_right"].to_numpy()[-1:]]
            _tag(ax.stairs(d["density"], edges, color=c, alpha=0.6, lw=1.2), s)
            k = kde[kde[series] == s]
            _tag(ax.plot(k["x"], k["density"], color=c, label=str(s)), s)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.legend(loc="upper right")
        matrix = pd.DataFrame(np.nan, index=names, columns=names, dtype=float)
        for row in ks.itertuples():
            matrix.loc[row.a, row.b] = matrix.loc[row.b, row.a] = row.ks
        image = ax_ks.imshow(matrix.to_numpy(), cmap="cividis", vmin=0, vmax=1)
        for i, j in itertools.product(range(len(names)), repeat=2):
            if i != j and np.isfinite(matrix.iat[i, j]):
                v = matrix.iat[i, j]
                ax_ks.text(
                    j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k"
                )
        ax_ks.set_xticks(range(len(names)), [str(n) for n in names], rotation=30, ha="right")
        ax_ks.set_yticks(range(len(names)), [str(n) for n in names])
        ax_ks.set_title("Kolmogorov-Smirnov distance")
        ax_ks.grid(False)
        fig.colorbar(image, ax=ax_ks, shrink=0.8)
    return fig


def bar_panels(
    data: pd.DataFrame,
    *,
    x: str = "direction",
    hue: str | None = None,
    panel: str | None = "length",
    y: str = "mean",
    err: tuple[str, str] | None = ("ci_low", "ci_high"),
    palette: Palette | None = None,
    panel_label: Callable[[object], str] = lambda v: f"α = {float(v):.3g}",  # type: ignore[arg-type]
    ylabel: str = "",
    title: str | None = None,
    ncols: int = 3,
) -> Figure:
    """Bars of ``y`` per ``x`` value (with ``err`` interval whiskers), one axes per ``panel``
    value; with ``hue``, grouped bars coloured by hue (figures 3-4: x = layer or SAE, hue =
    substitution type), else coloured by ``x`` (figures 7-8: x = direction, panel = length)."""
    panels = _values(data, panel) if panel else [None]
    n_bars = max(len(data) // len(panels), 1)
    with style():
        fig, axes = _grid(len(panels), ncols, (max(4.4, 0.3 * n_bars + 2.5), 3.4), title)
        for ax, p in zip(axes, panels, strict=True):
            d = data if p is None else data[data[panel] == p]
            xs = _values(d, x)
            hues = _values(d, hue) if hue else [None]
            width = 0.8 / len(hues)
            for k, h in enumerate(hues):
                dh = d if h is None else d[d[hue] == h]
                pos = np.array([xs.index(v) for v in dh[x]]) + (k - (len(hues) - 1) / 2) * width
                key = dh[x].astype(str) if h is None else [str(h)] * len(dh)
                colors = [series_color(s, palette) for s in key]
                yerr = None
                if err is not None:
                    yerr = np.vstack([dh[y] - dh[err[0]], dh[err[1]] - dh[y]])
                bars = ax.bar(pos, dh[y], width=width * 0.95, color=colors, label=h)
                for bar, s in zip(bars, key, strict=True):
                    _tag(bar, s)
                if yerr is not None:
                    eb = ax.errorbar(pos, dh[y], yerr=yerr, fmt="none", ecolor="#333333", lw=1)
                    _tag(list(eb.lines[2]), h if h is not None else "errorbars")
            ax.set_xticks(range(len(xs)), [str(v) for v in xs], rotation=30, ha="right")
            ax.set_ylabel(ylabel)
            if p is not None:
                ax.set_title(panel_label(p))
        if hue:  # one legend, outside the last panel: bars fill the axes
            axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return fig


def scatter_figure(
    points: pd.DataFrame,
    *,
    x: str,
    y: str,
    label: str,
    xerr: tuple[str, str] | None = None,
    yerr: tuple[str, str] | None = None,
    series: str | None = None,
    palette: Palette | None = None,
    xlabel: str = "",
    ylabel: str = "",
    title: str | None = None,
) -> Figure:
    """One labelled point per row (supplementary figure 3: mean reconstruction error against mean
    KL per SAE), with optional interval whiskers; coloured by ``series`` (default ``label``)."""
    series = series or label
    with style():
        fig, (ax,) = _grid(1, 1, (5.4, 4.0), title)
        for row in points.itertuples(index=False):
            r = row._asdict()
            c = series_color(r[series], palette)
            xe = None if xerr is None else [[r[x] - r[xerr[0]]], [r[xerr[1]] - r[x]]]
            ye = None if yerr is None else [[r[y] - r[yerr[0]]], [r[yerr[1]] - r[y]]]
            eb = ax.errorbar(
                [r[x]], [r[y]], xerr=xe, yerr=ye, fmt=marker_for(str(r[series])), color=c, ms=7
            )
            _tag([eb.lines[0], *eb.lines[2]], r[series])
            ax.annotate(str(r[label]), (r[x], r[y]), xytext=(5, 4), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    return fig


def interval_figure(
    data: pd.DataFrame,
    *,
    x: str,
    center: str = "median",
    inner: tuple[str, str] = ("q25", "q75"),
    outer: tuple[str, str] | None = ("q05", "q95"),
    series: str | None = None,
    palette: Palette | None = None,
    xlabel: str = "",
    ylabel: str = "",
    title: str | None = None,
) -> Figure:
    """Quantile ranges per ``x`` group (stable-region sharpness across model sizes or
    checkpoints): a thick bar for ``inner``, a thin whisker for ``outer``, a dot at ``center``;
    one colour (and small x offset) per ``series`` value."""
    groups = _values(data, series) if series else [None]
    xs = _values(data, x)
    with style():
        fig, (ax,) = _grid(1, 1, (max(6.0, 0.9 * len(xs) + 2), 3.6), title)
        for k, s in enumerate(groups):
            d = data if s is None else data[data[series] == s]
            # one group per x (no series): colour by the x value (a direction, a run)
            c = [series_color(v, palette) for v in d[x]] if s is None else series_color(s, palette)
            pos = np.array([xs.index(v) for v in d[x]]) + 0.15 * (k - (len(groups) - 1) / 2)
            if outer is not None:
                _tag(ax.vlines(pos, d[outer[0]], d[outer[1]], color=c, lw=1), s or "all")
            _tag(ax.vlines(pos, d[inner[0]], d[inner[1]], color=c, lw=6, alpha=0.6), s or "all")
            label = str(s) if s is not None else center
            dots = ax.scatter(pos, d[center], c=c, edgecolors="black", zorder=3, label=label)
            _tag(dots, s or "all")
        ax.set_xticks(range(len(xs)), [str(v) for v in xs])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(loc="upper left")
    return fig
