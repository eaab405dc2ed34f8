"""The SAELens folder we write: file names, the ``cfg.json`` dict (SAELens >= 6 layout), the writer.

Kept apart from :mod:`perturb_lens.saes.io` (the loaders) so that :meth:`SAE.save` can write a
folder without the SAE type and its loaders importing each other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save as save_safetensors

from perturb_lens.common.writes import atomic_write

if TYPE_CHECKING:
    from perturb_lens.saes.sae import SAE

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"  # the cfg.json layout we write


def saelens_cfg_dict(sae: SAE) -> dict[str, Any]:
    """The cfg.json dict (SAELens >= 6 layout) describing ``sae``."""
    c = sae.cfg
    arch = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}[c.activation]
    meta = {
        **c.metadata,
        "model_name": c.model,
        "hook_name": c.hook,
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": SAELENS_FORMAT_VERSION,
        "perturb_lens": {"frame": c.frame, "skip_bos": c.skip_bos},
    }
    out: dict[str, Any] = {
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": c.normalize_activations,
        "reshape_activations": "none",
        "metadata": meta,
        "architecture": arch,
    }
    if c.activation == "topk":
        out["k"] = c.k
    return out


def save_saelens_folder(sae: SAE, folder: str | Path) -> Path:
    """Write ``sae`` as a SAELens folder (each file written atomically: temp file, then renamed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().to(torch.float32).contiguous().cpu() for n, p in sae.named_parameters()}
    weights, cfg = save_safetensors(state), json.dumps(saelens_cfg_dict(sae), indent=1).encode()
    atomic_write(folder / WEIGHTS_FILE, lambda f: f.write(weights))
    atomic_write(folder / CFG_FILE, lambda f: f.write(cfg))
    return folder
