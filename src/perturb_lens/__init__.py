"""perturb-lens: activation-perturbation ("sensitive directions") experiments on transformer LMs.

The public API is small: load a model, run an experiment, get a DataFrame, summarise it.
"""

from perturb_lens import (
    experiments,  # noqa: F401  (registers the SAE-latent directions)
    saes,  # noqa: F401  (registers sae-error, sae-feature and its scale)
)
from perturb_lens.config import load_config
from perturb_lens.engine.run import run_experiment
from perturb_lens.models.load import load_model
from perturb_lens.results import curves, load_results, summary_table, threshold_lengths, verdicts

__version__ = "0.1.0"
__all__ = [
    "__version__",
    "curves",
    "load_config",
    "load_model",
    "load_results",
    "run_experiment",
    "summary_table",
    "threshold_lengths",
    "verdicts",
]
