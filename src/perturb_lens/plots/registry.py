"""Figure sets keyed by experiment type: each experiment registers the figures of its runs.

A figure set is a function ``RunView -> list[Plot]``. It aggregates with the analysis helpers
(:mod:`perturb_lens.results.analysis`) and draws with :mod:`perturb_lens.plots.figures`; the
aggregated frame travels with the figure (:attr:`Plot.data`), so the numbers a figure shows can be
checked against the analysis API and are saved beside it as CSV.

An experiment module registers its set with ``@register_figures("experiment-name")``. If no set is
registered for a run's ``experiment``, :func:`figure_set` imports
``perturb_lens.experiments.<experiment_name>`` (dashes as underscores) once, so an experiment's
module registers itself on first use; otherwise the generic curve figures are used.
"""

from __future__ import annotations

import importlib
import io
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from perturb_lens.plots.style import style
from perturb_lens.results.analysis import curves
from perturb_lens.results.store import load_manifest

log = logging.getLogger(__name__)

KNOWN_METRICS = ("kl", "l2", "js", "dce", "top1", "cos")
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

    def render(self, fmt: str, *, logy: bool = False) -> bytes:
        """The figure as PNG or SVG bytes (``logy``: every axes with positive data on log y).

        Rendered once per (format, scale) and kept: the report and the files share it.
        """
        key = (fmt, logy)
        if key not in self._rendered:
            saved = [ax.get_yscale() for ax in self.figure.axes]
            if logy:
                for ax in self.figure.axes:
                    if ax.get_label() != "<colorbar>" and ax.dataLim.y1 > 0:
                        ax.set_yscale("log", nonpositive="mask")
            buf = io.BytesIO()
            with style():
                self.figure.savefig(
                    buf,
                    format=fmt,
                    metadata={"Date": None} if fmt == "svg" else None,
                    facecolor="white",
                )
            for ax, scale in zip(self.figure.axes, saved, strict=True):
                ax.set_yscale(scale)
            self._rendered[key] = buf.getvalue()
        return self._rendered[key]


class RunView:
    """A run directory as the figure sets see it: manifest, the averaged rows, cached curves."""

    def __init__(self, run_dir: str | Path, label: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.manifest = load_manifest(self.run_dir)
        self.label = label or self.run_dir.name
        self._curves: dict[str, pd.DataFrame] = {}

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

    @cached_property
    def rows(self) -> pd.DataFrame:
        """The rows that enter the published averages (``engine.run.summary_rows``)."""
        from perturb_lens.engine.run import summary_rows

        return summary_rows(self.run_dir)

    @property
    def metrics(self) -> list[str]:
        """Metric columns of the results, in the config's order."""
        wanted = list(self.config.get("metrics", KNOWN_METRICS)) + list(KNOWN_METRICS)
        return [m for m in dict.fromkeys(wanted) if m in self.rows.columns]

    def curves(self, metric: str) -> pd.DataFrame:
        """``curves(rows, metric)`` per direction and length (computed once per metric)."""
        if metric not in self._curves:
            self._curves[metric] = curves(self.rows, metric)
        return self._curves[metric]


FigureSet = Callable[[RunView], list[Plot]]
_REGISTRY: dict[str, FigureSet] = {}


def register_figures(experiment: str) -> Callable[[FigureSet], FigureSet]:
    """Decorator: make ``fn(view) -> list[Plot]`` the figure set of ``experiment`` runs."""

    def decorate(fn: FigureSet) -> FigureSet:
        _REGISTRY[experiment] = fn
        return fn

    return decorate


def figure_set(experiment: str) -> FigureSet:
    """The figure set registered for ``experiment`` (the generic curve figures if none)."""
    if experiment not in _REGISTRY:
        module = f"perturb_lens.experiments.{experiment.replace('-', '_')}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name is None or not module.startswith(err.name):
                raise
    if experiment not in _REGISTRY:
        log.info("no figure set registered for %r: using the generic curve figures", experiment)
    return _REGISTRY.get(experiment, _REGISTRY["curves"])


def registered() -> dict[str, FigureSet]:
    """Experiment type -> figure set, for the sets registered so far."""
    return dict(_REGISTRY)


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
