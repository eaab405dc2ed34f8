"""perturb-lens: activation-perturbation ("sensitive directions") experiments on transformer LMs.

The public API is small: load a model, run an experiment, get a DataFrame, summarise it.
"""

import os

# Bit-identical shards need a fixed thread count inside BLAS too: MKL and OpenMP may otherwise use
# fewer threads than asked when the machine is busy (MKL_DYNAMIC defaults to TRUE), which changes
# the reduction order of large products. Read when MKL first runs, so set before any work.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("OMP_DYNAMIC", "FALSE")

from perturb_lens import saes  # noqa: F401  (registers the SAE directions and the sae-error scale)
from perturb_lens.config import load_config
from perturb_lens.experiments import builtin  # noqa: F401  (registers the built-in experiments)
from perturb_lens.models.load import load_model
from perturb_lens.results import (
    curves,
    load_results,
    run_aggregates,
    summary_table,
    threshold_lengths,
    verdicts,
)
from perturb_lens.run_handle import Run, open_run, plot
from perturb_lens.runner import run_experiment
from perturb_lens.version import __version__

__all__ = [
    "Run",
    "__version__",
    "curves",
    "load_config",
    "load_model",
    "load_results",
    "open_run",
    "plot",
    "run_aggregates",
    "run_experiment",
    "summary_table",
    "threshold_lengths",
    "verdicts",
]
