"""Figure sets by name; a run's figure set is the one its experiment registered.

A figure set is a function ``RunReader -> list[Plot]`` (:mod:`perturb_lens.analysis.run_reader`).
It aggregates with the analysis helpers (:mod:`perturb_lens.analysis.tables`) and draws with
:mod:`perturb_lens.plots.figures`; the aggregated frame travels with the figure
(:attr:`Plot.data`), so the numbers a figure shows can be checked against the analysis API and are
saved beside it as CSV.

A set is registered with ``@register_figures("set-name")``; an experiment names its set in its
registration (``register_experiment(..., figures="set-name")``, see
:mod:`perturb_lens.experiments.registry`). A run of an experiment that is not registered uses the
set registered under the experiment's own name, else the generic curve figures.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from perturb_lens.analysis.run_reader import RunReader
from perturb_lens.common.registry import registry
from perturb_lens.experiments.registry import declared_experiment
from perturb_lens.plots.style import style

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


FigureSet = Callable[[RunReader], list[Plot]]
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


def figures_for(run_dir: str | Path | RunReader) -> list[Plot]:
    """The figure set of a run directory (chosen by its config's ``experiment``)."""
    view = run_dir if isinstance(run_dir, RunReader) else RunReader(run_dir)
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


def __getattr__(name: str) -> Any:
    """``RunView``: the old name of :class:`~perturb_lens.analysis.run_reader.RunReader` (kept
    for one release, with a deprecation warning)."""
    if name == "RunView":
        warnings.warn(
            "perturb_lens.plots.RunView is now perturb_lens.analysis.run_reader.RunReader",
            DeprecationWarning,
            stacklevel=2,
        )
        return RunReader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
