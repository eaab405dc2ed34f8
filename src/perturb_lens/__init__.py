"""perturb-lens: activation-perturbation ("sensitive directions") experiments on transformer LMs.

The public API is small: load a model, run an experiment, get a DataFrame, summarise it. Its names
are imported on first use (PEP 562), so that ``import perturb_lens`` (and the CLI's ``report``)
stays light: torch loads only with the code that needs it. The built-in directions, scales and
experiments register themselves when their registry is first consulted.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
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
    "curves": "perturb_lens.results",
    "load_config": "perturb_lens.config.schema",
    "load_model": "perturb_lens.models.load",
    "load_results": "perturb_lens.results",
    "open_run": "perturb_lens.workflows.run_handle",
    "plot": "perturb_lens.workflows.run_handle",
    "run_aggregates": "perturb_lens.results",
    "run_experiment": "perturb_lens.workflows.experiment",
    "summary_table": "perturb_lens.results",
    "threshold_lengths": "perturb_lens.results",
    "verdicts": "perturb_lens.results",
}
"""Public name -> the module that defines it (imported on first access)."""

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first access (then cached here); a
    subpackage (``perturb_lens.saes``, ...) is imported on first access too."""
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
