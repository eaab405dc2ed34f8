"""Figures and HTML reports of runs.

``figures_for(run_dir)`` returns a run's figure set (chosen by its experiment type, see
:mod:`perturb_lens.plots.registry`), ``write_report(run_dir)`` writes a self-contained
``report.html``, ``write_comparison([run_a, run_b], out)`` overlays runs. Experiments add figure
sets with ``@register_figures("name")`` using the drawing functions of
:mod:`perturb_lens.plots.figures` and the builders in :mod:`perturb_lens.plots.sets`.
"""

from perturb_lens.plots.registry import (
    Plot,
    RunReader,
    figure_set,
    figures_for,
    register_figures,
    registered,
    save_plots,
)
from perturb_lens.plots.report import write_comparison, write_report

__all__ = [
    "Plot",
    "RunReader",
    "figure_set",
    "figures_for",
    "register_figures",
    "registered",
    "save_plots",
    "write_comparison",
    "write_report",
]
