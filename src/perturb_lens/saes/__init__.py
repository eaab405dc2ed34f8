"""Sparse autoencoders: the SAE type, loaders/savers, training and statistics."""

from perturb_lens.saes import directions  # noqa: F401  (registers sae-error, sae-feature)
from perturb_lens.saes.io import SAELoadError, load_e2e_checkpoint, load_saelens_folder
from perturb_lens.saes.sae import SAE, SAEConfig, SAEMismatchError, load_sae

__all__ = [
    "SAE",
    "SAEConfig",
    "SAELoadError",
    "SAEMismatchError",
    "load_e2e_checkpoint",
    "load_sae",
    "load_saelens_folder",
]
