"""A run directory in the notebook: :class:`Run` is the path itself (``run_experiment`` returns
one), with the run's tables, verdicts and figures one call away and an inline HTML view.

``Run`` subclasses the platform's ``Path`` class, so code that takes the returned run directory
as a path keeps working; paths derived from it (``run / "manifest.json"``) are plain paths
(Python >= 3.12; on 3.11 they are ``Run`` objects that show as paths).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from perturb_lens.analysis.tables import threshold_lengths
from perturb_lens.analysis.verdicts import verdicts
from perturb_lens.config.schema import validate_config
from perturb_lens.experiments.registry import get_experiment
from perturb_lens.metrics.builtin import get_metric
from perturb_lens.results.aggregate import Aggregates, run_aggregates, run_summary_table
from perturb_lens.results.store import load_manifest, load_results
from perturb_lens.results.summary import summary_rows

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from perturb_lens.plots.registry import Plot, RunReader

_PathBase = type(Path())


class Run(_PathBase):  # type: ignore[misc, valid-type]
    """A run directory with its results: ``rows()``, ``curves(metric)``, ``summary()``,
    ``thresholds(metric)``, ``tokens(metric)``, ``aggregates(metric)``, ``verdicts()``,
    ``tables()``, ``figures()``, ``report()``; in Jupyter it shows its summary, verdicts and main
    figure."""

    def with_segments(self, *parts: Any) -> Path:  # Python >= 3.12: derived paths are plain
        return Path(*parts)

    @cached_property
    def view(self) -> RunReader:
        """The run as the figure sets see it (manifest, averaged rows, cached curves)."""
        from perturb_lens.plots.report import run_view

        return run_view(self)

    @property
    def meta(self) -> dict[str, Any]:
        """What the run recorded about itself (model, frame, hook, scope, lengths, ...)."""
        return load_manifest(Path(self))["meta"]

    def rows(self, columns: list[str] | None = None, filters: Any = None) -> pd.DataFrame:
        """Every row of the run (one per sequence x position x direction x length), checked
        against the manifest's checksums; ``columns`` / ``filters`` as in ``load_results``."""
        return load_results(Path(self), columns=columns, filters=filters)

    def curves(self, metric: str = "kl") -> pd.DataFrame:
        """Mean ``metric`` per direction and length, with quantiles and its bootstrap interval
        (tidy: one row per direction x length), over the rows that enter the published averages;
        streamed from the shards in either result mode (``results.aggregate.aggregate_curves``:
        exact means, sketch quantiles, sequences resampled)."""
        return self.view.curves(metric)

    def summary(self, metric: str = "kl") -> pd.DataFrame:
        """Mean ``metric`` by direction (rows) and length (columns)."""
        return self.view.summary(metric)

    def verdicts(self, metric: str = "kl", claims: Sequence[str] | None = None) -> pd.DataFrame:
        """The published claims that apply to the run (or ``claims``, e.g. ``["a > b"]``), judged
        on ``metric`` (paired 95% CIs)."""
        return verdicts(Path(self), list(claims) if claims else None, metric=metric)

    def thresholds(self, metric: str = "kl", threshold: float | None = None) -> pd.DataFrame:
        """Per token and direction, the smallest length whose ``metric`` exceeds ``threshold``
        (default: the metric's registered threshold, 0.1 nats for KL); a rows run only."""
        if threshold is None:
            threshold = get_metric(metric).threshold
            if threshold is None:
                raise ValueError(f"metric {metric!r} has no default threshold: pass threshold=")
        rows = self.rows(columns=["seq", "pos", "direction", "length", metric])
        return threshold_lengths(rows, metric, threshold=threshold)

    def aggregates(self, metric: str = "kl") -> Aggregates:
        """The run's merged mergeable statistics of ``metric`` (exact sums and counts per
        direction x length, quantile sketch, per-sequence sums), in either result mode."""
        return run_aggregates(Path(self), metric)

    def tables(self, metrics: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
        """What ``perturb-lens run`` prints, by title: mean ``metric`` by direction and length
        (columns ``length@L``) for ``metrics`` (default: the run's first two), then the tables
        its experiment registers (e.g. plateau lengths)."""
        config = validate_config(load_manifest(Path(self))["config"])
        out = {}
        for metric in metrics or config.metrics[:2]:
            title = f"mean {metric} by length ({config.scope}, {config.hook})"
            out[title] = run_summary_table(Path(self), metric)  # streamed: either result mode
        tables = get_experiment(config.experiment).tables
        if tables is not None:
            for title, frame in tables(summary_rows(Path(self)), config).items():
                out[title] = frame.set_index([c for c in ("base", "direction") if c in frame])
        return out

    def report(self, out: str | Path | None = None, *, log_y: bool = False) -> Path:
        """Write the run's self-contained ``report.html`` (default: in the run folder) and its
        figures; returns the report's path."""
        from perturb_lens.plots.report import write_report

        return write_report(Path(self), out, log_y=log_y)

    def tokens(self, metric: str = "kl", threshold: float | None = None) -> pd.DataFrame:
        """Every token per direction, most sensitive first: the smallest length at which
        ``metric`` exceeds ``threshold`` (default: its registered one), with the token's text and
        context (``analysis.tokens.token_table``). What the table lacks (an aggregate run keeps
        only its first sequences' rows; an old run no token text) is warned and in
        ``attrs["notes"]``."""
        from perturb_lens.analysis.tokens import token_table

        table = token_table(Path(self), metric, threshold)
        for note in table.attrs["notes"]:
            warnings.warn(note, stacklevel=2)
        return table

    def figures(self) -> list[Plot]:
        """The run's figure set (chosen by its experiment type): ``Plot`` objects with
        ``.name``, ``.figure`` (matplotlib) and ``.data`` (the plotted numbers)."""
        return _plots(self.view)

    def figure(self, name: str) -> Figure:
        """One figure of the set by name (``"fig1"`` picks ``fig1_kl``, the first match)."""
        return _pick(self.figures(), name).figure

    def _repr_html_(self) -> str | None:
        """Summary tables, verdicts and the main figure, inline (None: not a finished run)."""
        if not (Path(self) / "manifest.json").is_file():
            return None
        from perturb_lens.plots.report import _facts, _run_facts, _tables, _verdicts, inline_svg

        view = self.view
        plots = _plots(view)
        main = (
            f"<h4>{plots[0].title}</h4>{inline_svg(plots[0].render('svg'), f'run-{id(self)}')}"
            if plots
            else ""
        )
        return (
            f"<div><h3>Run {self.name}</h3>{_facts(_run_facts(view)[:6])}{_tables(view)}"
            f"<h3>Verdicts</h3>{_verdicts(view)}{main}</div>"
        )


def open_run(run_dir: str | Path) -> Run:
    """A run directory as a :class:`Run` (refused, saying why, when it has no manifest)."""
    run = Run(run_dir)
    load_manifest(Path(run))  # the store's own error for a missing or damaged manifest
    return run


def plot(run: str | Path, name: str) -> Figure:
    """Figure ``name`` of a run (a ``fig1_kl``-style name from its figure set, or a prefix such
    as ``"fig1"``) as a matplotlib Figure."""
    return open_run(run).figure(name)


def _plots(view: RunReader) -> list[Plot]:
    from perturb_lens.plots import figures_for

    return figures_for(view)


def _pick(plots: list[Plot], name: str) -> Plot:
    """The plot called ``name``, else the first whose name starts with ``name_``."""
    exact = [p for p in plots if p.name == name]
    found = exact or [p for p in plots if p.name.startswith(f"{name}_")]
    if not found:
        names = ", ".join(p.name for p in plots) or "none"
        raise ValueError(f"No figure {name!r} in this run; its figures are: {names}.")
    return found[0]
