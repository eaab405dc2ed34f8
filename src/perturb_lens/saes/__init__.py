"""Sparse autoencoders: the SAE type, loaders/savers, training and statistics.

Importing this package registers the SAE directions (``sae-error``, ``sae-feature`` and the
``sae-error`` scale; the synthetic-activation targets ``synthetic``, ``sae-latent`` and
``sae-reconstruction``)."""

from perturb_lens.saes import directions, synthetic  # noqa: F401  (registers the directions)
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
