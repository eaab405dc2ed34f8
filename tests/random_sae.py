"""A random ReLU SAE for tests (no training): a negative encoder bias keeps it sparse."""

from __future__ import annotations

import torch

from perturb_lens.saes.sae import SAE, SAEConfig


def random_sae(
    d_in: int,
    d_sae: int,
    *,
    hook: str = "blocks.1.hook_resid_pre",
    frame: str = "raw",
    bias: float = -3.0,
    seed: int = 0,
) -> SAE:
    """``W_enc ~ N(0, 1/d_in)``, ``b_enc = bias``, ``W_dec ~ N(0, 1)``, small ``b_dec``."""
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, hook=hook, frame=frame))  # type: ignore[arg-type]
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        sae.b_enc.fill_(bias)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
    return sae
