"""A run directory in the notebook: :class:`Run` is the path itself (``run_experiment`` returns
one), with the run's tables, verdicts and figures one call away and an inline HTML view.

``Run`` subclasses the platform's ``Path`` class, so code that takes the returned run directory
as a path keeps working; paths derived from it (``run / "manifest.json"``) are plain paths
(Python >= 3.12; on 3.11 they are ``Run`` objects that show as paths).
"""

from __future__ import annotations

import warnings
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from perturb_lens.results.store import load_manifest, load_results
from perturb_lens.results.verdicts import verdicts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from perturb_lens.plots.registry import Plot, RunView

_PathBase = type(Path())


class Run(_PathBase):  # type: ignore[misc, valid-type]
    """A run directory with its results: ``rows()``, ``curves(metric)``, ``summary()``,
    ``verdicts()``, ``tokens()``, ``figures()``; in Jupyter it shows its summary, verdicts and
    main figure."""

    def with_segments(self, *parts: Any) -> Path:  # Python >= 3.12: derived paths are plain
        return Path(*parts)

    @cached_property
    def view(self) -> RunView:
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
        return self.view.summary_table(metric)

    def verdicts(self, metric: str = "kl") -> pd.DataFrame:
        """The published claims that apply to the run, judged on ``metric`` (paired 95% CIs)."""
        return verdicts(Path(self), metric=metric)

    def tokens(self, metric: str = "kl", threshold: float | None = None) -> pd.DataFrame:
        """Every token per direction, most sensitive first: the smallest length at which
        ``metric`` exceeds ``threshold`` (default: its registered one), with the token's text and
        context (``results.tokens.token_table``). What the table lacks (an aggregate run keeps
        only its first sequences' rows; an old run no token text) is warned and in
        ``attrs["notes"]``."""
        from perturb_lens.results.tokens import token_table

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


def _plots(view: RunView) -> list[Plot]:
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
