"""perturb-lens: activation-perturbation ("sensitive directions") experiments on transformer LMs.

The public API is built around the run handle: ``run_experiment`` (or ``open_run`` on a folder)
gives a :class:`Run`, whose methods give its rows, curves, tables, verdicts, figures and report;
``load_model`` and ``load_config`` come before it, and one ``register_*`` call adds a direction,
scale, experiment, metric, model family, figure set or claim. Names are imported on first use
(PEP 562), so that ``import perturb_lens`` (and the CLI's ``report``) stays light: torch loads
only with the code that needs it. Each registry imports its built-ins (the one list in
:mod:`perturb_lens.builtins`) at its first lookup.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from typing import Any

# Bit-identical shards need a fixed thread count inside BLAS too: MKL and OpenMP may otherwise use
# fewer threads than asked when the machine is busy (MKL_DYNAMIC defaults to TRUE), which changes
# the reduction order of large products. Read when MKL first runs, so set before any work.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("OMP_DYNAMIC", "FALSE")

from perturb_lens.builtins import BUILTINS
from perturb_lens.common.registry import install_builtins

install_builtins(BUILTINS)

_API = {
    "Run": "perturb_lens.workflows.run_handle",
    "__version__": "perturb_lens.common.version",
    "load_config": "perturb_lens.config.schema",
    "load_model": "perturb_lens.models.load",
    "open_run": "perturb_lens.workflows.run_handle",
    "register_claim": "perturb_lens.analysis.verdicts",
    "register_direction": "perturb_lens.directions.base",
    "register_experiment": "perturb_lens.experiments.registry",
    "register_family": "perturb_lens.models.registry",
    "register_figures": "perturb_lens.plots.registry",
    "register_metric": "perturb_lens.metrics.builtin",
    "register_replication": "perturb_lens.replication.registry",
    "register_scale": "perturb_lens.directions.base",
    "run_experiment": "perturb_lens.workflows.experiment",
}
"""Public name -> the module that defines it (imported on first access)."""

_DEPRECATED = {
    "curves": ("perturb_lens.analysis.tables", "Run.curves(m) or perturb_lens.analysis.curves"),
    "load_results": ("perturb_lens.results.store", "Run.rows()"),
    "plot": ("perturb_lens.workflows.run_handle", "Run.figure(name)"),
    "run_aggregates": ("perturb_lens.results.aggregate", "Run.aggregates(metric)"),
    "summary_table": ("perturb_lens.analysis.tables", "Run.summary(metric)"),
    "threshold_lengths": ("perturb_lens.analysis.tables", "Run.thresholds(metric)"),
    "verdicts": ("perturb_lens.analysis.verdicts", "Run.verdicts(metric)"),
}
"""Names of the 0.2 API that repeat a :class:`Run` method (or take a DataFrame where the run
handle does it): they keep working for one release, with a DeprecationWarning naming the new
way (``open_run(path)`` gives the ``Run``)."""

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first access (then cached here); a
    deprecated name (with a warning, not cached); a subpackage (``perturb_lens.saes``, ...)."""
    if name in _DEPRECATED:
        module, instead = _DEPRECATED[name]
        warnings.warn(
            f"perturb_lens.{name} is deprecated and goes in the next release: use {instead}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), name)
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}"):
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'perturb_lens' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
