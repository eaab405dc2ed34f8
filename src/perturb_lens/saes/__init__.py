"""Sparse autoencoders: the SAE type, loaders/savers, training and statistics.

The SAE directions (``sae-error``, ``sae-feature``, the ``sae-error`` scale and the
synthetic-activation targets) live in :mod:`perturb_lens.directions.base`."""

from perturb_lens.saes.io import SAELoadError, load_e2e_checkpoint, load_sae, load_saelens_folder
from perturb_lens.saes.sae import SAE, SAEConfig, SAEMismatchError

__all__ = [
    "SAE",
    "SAEConfig",
    "SAELoadError",
    "SAEMismatchError",
    "load_e2e_checkpoint",
    "load_sae",
    "load_saelens_folder",
]
