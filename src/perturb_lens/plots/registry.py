"""Figure sets by name; a run's figure set is the one its experiment registered.

A figure set is a function ``RunView -> list[Plot]``. It aggregates with the analysis helpers
(:mod:`perturb_lens.analysis.tables`) and draws with :mod:`perturb_lens.plots.figures`; the
aggregated frame travels with the figure (:attr:`Plot.data`), so the numbers a figure shows can be
checked against the analysis API and are saved beside it as CSV.

A set is registered with ``@register_figures("set-name")``; an experiment names its set in its
registration (``register_experiment(..., figures="set-name")``, see
:mod:`perturb_lens.experiments.registry`). A run of an experiment that is not registered uses the
set registered under the experiment's own name, else the generic curve figures.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from perturb_lens.analysis.tables import pick_lengths
from perturb_lens.common.registry import registry
from perturb_lens.experiments.registry import ExperimentInfo, declared_experiment
from perturb_lens.metrics.builtin import metric_names
from perturb_lens.plots.style import style
from perturb_lens.results.aggregate import (
    Aggregates,
    aggregate_curves,
    merge,
    run_metric_aggregates,
    sample_rows,
    summary_means,
    threshold_histogram,
    threshold_summary,
)
from perturb_lens.results.shards import results_mode, shard_columns
from perturb_lens.results.store import load_manifest
from perturb_lens.results.summary import summary_rows

log = logging.getLogger(__name__)

FORMATS = ("png", "svg")


@dataclass
class Plot:
    """One figure of a report: a file stem, a title, a caption, the figure and its numbers."""

    name: str
    title: str
    caption: str
    figure: Figure
    data: pd.DataFrame
    log_toggle: bool = False  # the report offers a log-scale y axis (curves over lengths)
    series: list[str] = field(default_factory=list)  # the toggled series (directions, runs)
    _rendered: dict[tuple[str, bool], bytes] = field(default_factory=dict, init=False, repr=False)
    _laid_out: bool | None = field(default=None, init=False, repr=False)  # logy of the layout

    def render(self, fmt: str, *, logy: bool = False) -> bytes:
        """The figure as PNG or SVG bytes (``logy``: every axes with positive data on log y).

        Rendered once per (format, scale) and kept: the report and the files share it. The
        layout (about half of a render) is computed once per scale: a second format at the
        scale last laid out draws at the same positions.
        """
        key = (fmt, logy)
        if key not in self._rendered:
            saved = [ax.get_yscale() for ax in self.figure.axes]
            if logy:
                for ax in self.figure.axes:
                    if ax.get_label() != "<colorbar>" and ax.dataLim.y1 > 0:
                        ax.set_yscale("log", nonpositive="mask")
            engine = self.figure.get_layout_engine()
            frozen = engine is not None and self._laid_out == logy
            if frozen:
                self.figure.set_layout_engine("none")  # keeps the positions of the last layout
            buf = io.BytesIO()
            try:
                with style():
                    self.figure.savefig(
                        buf,
                        format=fmt,
                        metadata={"Date": None} if fmt == "svg" else None,
                        facecolor="white",
                    )
            finally:
                if frozen:
                    self.figure.set_layout_engine(engine)
                for ax, scale in zip(self.figure.axes, saved, strict=True):
                    ax.set_yscale(scale)
            self._laid_out = logy
            self._rendered[key] = buf.getvalue()
        return self._rendered[key]


class RunView:
    """A run directory as the figure sets see it: manifest, streamed aggregates and the curves
    from them (:func:`~perturb_lens.results.aggregate.run_aggregates`: the same code for a rows
    and an aggregate run, memory flat in the rows), a bounded token sample, and (for the figures
    that need every row: interpolation experiments' per-curve statistics, same-cosine token
    scatters) the rows themselves."""

    def __init__(self, run_dir: str | Path, label: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.manifest = load_manifest(self.run_dir)
        self.label = label or self.run_dir.name
        self._curves: dict[str, pd.DataFrame] = {}
        self._aggregates: dict[str, Aggregates] = {}

    @property
    def config(self) -> dict[str, Any]:
        """The run's validated config (as stored in the manifest)."""
        return self.manifest.get("config", {})

    @property
    def meta(self) -> dict[str, Any]:
        """What the run recorded about itself (model, hook, scope, lengths, ...)."""
        return self.manifest.get("meta", {})

    @property
    def experiment(self) -> str:
        """The experiment type (config ``experiment``), which selects the figure set."""
        return str(self.config.get("experiment", "sensitive-directions"))

    @property
    def experiment_info(self) -> ExperimentInfo | None:
        """The registered experiment of the run (None: not registered in this process), as
        declared: its code is not imported (figures need none of it)."""
        return declared_experiment(self.experiment)

    @property
    def curve_stats(self) -> tuple[str, ...]:
        """The per-curve statistics the run's experiment compares (interpolation experiments)."""
        info = self.experiment_info
        return info.curve_stats if info is not None else ()

    @cached_property
    def rows(self) -> pd.DataFrame:
        """The rows that enter the published averages (``results.summary.summary_rows``): all of
        them in memory, so only for the figures that need every row."""
        if results_mode(self.manifest) == "aggregate":
            raise ValueError(
                f"{self.run_dir} is an aggregate run (results: aggregate): it stores no rows; "
                "use its curves and aggregates, or rerun with results: rows"
            )
        return summary_rows(self.run_dir)

    @cached_property
    def columns(self) -> list[str]:
        """The result columns: a rows run's shard schema, an aggregate run's metrics."""
        if results_mode(self.manifest) == "aggregate":
            return list(self.config.get("metrics", []))
        return shard_columns(self.run_dir, self.manifest)

    @property
    def metrics(self) -> list[str]:
        """Metric columns of the results, in the config's order."""
        known = metric_names()
        wanted = list(self.config.get("metrics", known)) + list(known)
        return [m for m in dict.fromkeys(wanted) if m in self.columns]

    def aggregates(self, metric: str) -> Aggregates:
        """The run's merged aggregates of ``metric`` (streamed once per metric)."""
        if metric not in self._aggregates:  # all metrics in one pass over the shards
            wanted = [metric, *(m for m in self.metrics if m not in self._aggregates)]
            self._aggregates.update(
                run_metric_aggregates(self.run_dir, list(dict.fromkeys(wanted)))
            )
        return self._aggregates[metric]

    def curves(self, metric: str) -> pd.DataFrame:
        """Curves per direction and length (``analysis.curves`` layout; exact means, sketch
        quantiles, sequence-bootstrap intervals: ``aggregate_curves``), once per metric."""
        if metric not in self._curves:
            self._curves[metric] = aggregate_curves(self.aggregates(metric))
        return self._curves[metric]

    def pooled(
        self,
        metric: str,
        groups: Mapping[str, Sequence[str]],
        stat: Sequence[str] = ("mean",),
    ) -> pd.DataFrame:
        """Per group (label -> directions): ``n``, ``stat`` and the sequence-bootstrap interval
        of ``metric`` over every row of its directions at every length, from the streamed
        aggregates (merged exactly: :func:`~perturb_lens.results.aggregate.merge`). The layout of
        ``analysis.curves(rows, by=["direction"])`` with the labels as directions, in ``groups``
        order; also for columns such as ``size`` that a rows run stores beside its metrics."""
        agg = self.aggregates(metric)
        label_of = {d: label for label, names in groups.items() for d in names}

        def relabel(frame: pd.DataFrame) -> pd.DataFrame:
            names = frame["direction"].astype(str)
            keep = names.isin(label_of).to_numpy()
            return frame[keep].assign(direction=names[keep].map(label_of).to_numpy(), length=0.0)

        part = {kind: relabel(getattr(agg, kind)) for kind in ("moments", "sketch", "seq")}
        for kind in ("threshold", "sample"):  # not pooled: none (and no stale categories)
            part[kind] = getattr(agg, kind).iloc[:0].astype({"direction": str})
        merged = merge([part])
        for frame in merged.values():
            frame["direction"] = pd.Categorical(frame["direction"], categories=list(groups))
        pooled = Aggregates(metric, **merged, alpha=agg.alpha, labels=list(groups))
        return aggregate_curves(pooled, stat=stat).drop(columns="length")

    @property
    def grid(self) -> np.ndarray:
        """The lengths the run has results at, sorted."""
        return self.aggregates(self.metrics[0]).grid

    @property
    def lengths_frame(self) -> pd.DataFrame:
        """The grid as a frame with a ``length`` column (for ``analysis.pick_lengths``)."""
        return pd.DataFrame({"length": self.grid})

    def token_sample(self, metric: str) -> pd.DataFrame:
        """Rows of a bounded sample of tokens (the first sequences, ``aggregate.SAMPLE_SEQS``)."""
        return sample_rows(self.aggregates(metric))

    def bars(self, metric: str, lengths: Sequence[float] | None = None) -> pd.DataFrame:
        """``analysis.bars`` from the curves: the curve rows at the grid lengths nearest to
        ``lengths``."""
        picked = pick_lengths(self.lengths_frame, lengths)
        cv = self.curves(metric)
        out = cv[cv["length"].isin(picked)].reset_index(drop=True)
        out.attrs.update(cv.attrs, lengths=picked)
        return out

    def summary_table(self, metric: str, lengths: Sequence[float] | None = None) -> pd.DataFrame:
        """``analysis.summary_table`` of one metric from the curves."""
        picked = pick_lengths(self.lengths_frame, lengths)
        return summary_means(self.curves(metric), metric, picked)

    def _crossings(self, metric: str, threshold: float) -> Aggregates:
        agg = self.aggregates(metric)
        stored = agg.threshold["threshold"].dropna().unique()
        if stored.size != 1 or stored[0] != threshold:
            raise ValueError(
                f"the run's {metric} crossings are counted at its registered threshold "
                f"{stored.tolist()}, not {threshold}"
            )
        return agg

    def threshold_summary(self, metric: str, threshold: float) -> pd.DataFrame:
        """``analysis.threshold_summary`` from the streamed crossing counts."""
        return threshold_summary(self._crossings(metric, threshold))

    def prefetch_curves(self, metrics: Iterable[str]) -> None:
        """The curves of several metrics (their aggregates are read in one pass over the shards)."""
        for metric in dict.fromkeys(metrics):
            self.curves(metric)

    def threshold_histogram(self, metric: str, threshold: float, edges: np.ndarray) -> pd.DataFrame:
        """``analysis.histograms`` (``right=True``) of the first-crossing lengths on ``edges``."""
        return threshold_histogram(self._crossings(metric, threshold), edges)


FigureSet = Callable[[RunView], list[Plot]]
FIGURE_SETS = registry("figure set", "register one with perturb_lens.register_figures")
"""name -> figure set; the built-ins (plots.sets, plots.same_cosine) register at the first
lookup."""


def register_figures(experiment: str) -> Callable[[FigureSet], FigureSet]:
    """Decorator: make ``fn(view) -> list[Plot]`` the figure set of ``experiment`` runs."""

    def decorate(fn: FigureSet) -> FigureSet:
        FIGURE_SETS.register(experiment, fn)
        return fn

    return decorate


def figure_set(experiment: str) -> FigureSet:
    """The figure set of ``experiment`` runs: the one its registration names, else the one
    registered under its name, else the generic curve figures."""
    info = declared_experiment(experiment)
    name = info.figures if info is not None else experiment
    found = FIGURE_SETS.find(name)
    if found is None:
        log.info("no figure set %r for %r: using the generic curve figures", name, experiment)
        return FIGURE_SETS.get("curves")
    return found


def registered() -> dict[str, FigureSet]:
    """Experiment type -> figure set, for the sets registered so far."""
    return dict(FIGURE_SETS.items())


def figures_for(run_dir: str | Path | RunView) -> list[Plot]:
    """The figure set of a run directory (chosen by its config's ``experiment``)."""
    view = run_dir if isinstance(run_dir, RunView) else RunView(run_dir)
    return figure_set(view.experiment)(view)


def check_formats(formats: Iterable[str]) -> list[str]:
    """The figure formats as a list; an unknown one raises ``ValueError`` naming the valid."""
    formats = list(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"unknown figure format(s) {bad}: use {', '.join(FORMATS)}")
    return formats


def save_plots(
    plots: Iterable[Plot], folder: str | Path, formats: Iterable[str] = FORMATS
) -> dict[str, dict[str, Path]]:
    """Write each plot as ``folder/{name}.{fmt}`` and its numbers as ``{name}.csv``."""
    formats = check_formats(formats)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, Path]] = {}
    for plot in plots:
        files = {}
        for fmt in formats:
            files[fmt] = folder / f"{plot.name}.{fmt}"
            files[fmt].write_bytes(plot.render(fmt))
        files["csv"] = folder / f"{plot.name}.csv"
        plot.data.to_csv(files["csv"], index=False)
        written[plot.name] = files
    return written
