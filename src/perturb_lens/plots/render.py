"""Rendering many figures at once: each plot's formats and scales in one task, the tasks spread
over forked worker processes when the machine has spare cores (matplotlib draws on one core; a
report's rendering is most of its time)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence

from perturb_lens.common.cores import available_cores
from perturb_lens.plots.registry import Plot

Job = tuple[str, bool]  # (format, logy)
_TASKS: list[tuple[Plot, list[Job]]] = []  # what forked workers render (inherited, not pickled)


def _render_task(i: int) -> tuple[int, dict[Job, bytes]]:
    plot, jobs = _TASKS[i]
    return i, {(fmt, logy): plot.render(fmt, logy=logy) for fmt, logy in jobs}


def render_plots(
    plots: Sequence[Plot],
    formats: Sequence[str],
    *,
    log_y: bool = False,
    workers: int | None = None,
) -> None:
    """Render every plot in ``formats`` and the SVG views a page inlines (linear, and with
    ``log_y`` the log-y view of the plots that have one) into its cache (:meth:`Plot.render`), so
    that saving and inlining only read the bytes.

    ``workers``: processes to render in (default: one per available core); with one, or where
    processes cannot be forked (or this one is a daemon), the plots are rendered here, one after
    another. The figures are the same either way: a worker renders a copy of the figure as this
    process would (PNG bytes are equal; SVG ids carry a random salt in any render).
    """
    tasks = []
    for plot in plots:
        jobs = [(fmt, False) for fmt in dict.fromkeys([*formats, "svg"])]
        if log_y and plot.log_toggle:
            jobs.append(("svg", True))
        jobs = [j for j in jobs if j not in plot._rendered]
        if jobs:
            tasks.append((plot, jobs))
    workers = min(workers or available_cores(), len(tasks))
    forkable = "fork" in multiprocessing.get_all_start_methods()
    if workers < 2 or not forkable or multiprocessing.current_process().daemon:  # no children
        for plot, jobs in tasks:
            for fmt, logy in jobs:
                plot.render(fmt, logy=logy)
        return
    # largest first, so that no worker is left with a big figure at the end
    tasks.sort(key=lambda t: len(t[0].figure.axes) * len(t[1]), reverse=True)
    _TASKS[:] = tasks
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for i, rendered in pool.imap_unordered(_render_task, range(len(tasks))):
                tasks[i][0]._rendered.update(rendered)
    finally:
        _TASKS.clear()
