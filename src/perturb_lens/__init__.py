"""perturb-lens: activation-perturbation ("sensitive directions") experiments on transformer LMs."""

from perturb_lens.models.load import load_model

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]
