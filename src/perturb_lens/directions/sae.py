"""SAE directions and the ``sae-error`` scale (Lee & Heimersheim section on SAEs; Gurnee).

- ``sae-error``: ``SAE(x) - x``. With ``scale: raw``, length 1 moves ``x`` exactly to ``SAE(x)``
  (SAE substitution); with the default unit scale it is the error direction to extrapolate along.
- ``sae-feature``: per token, the unit decoder row of one random latent, moved along ``+``:
  ``which: inactive`` (default; alive in the dataset but not active anywhere in the token's
  sequence), ``active`` (active at this token) or ``dead`` (never active in the dataset).
  "Active" is ``f > ALIVE_EPS``; the alive set is fitted over the run's statistics tokens and
  held in ``sae.alive`` (the engine sets it: :func:`cached_alive`).
- scale ``sae-error``: per-token length ``||SAE(x) - x||``, so a unit direction at length 1 is an
  epsilon-baseline ``x + eps u`` with ``eps = ||SAE(x) - x||``.

An SAE trained without the BOS position (``cfg.skip_bos``, perturb-lens' default) leaves BOS
alone: its error, and so ``eps``, is zero there.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import Tensor

from perturb_lens.common.files import UnreadableFileError, torch_load
from perturb_lens.common.writes import atomic_write
from perturb_lens.directions.base import DirectionContext, register_direction, register_scale
from perturb_lens.models.base import LensModel
from perturb_lens.saes.quality import ALIVE_EPS, alive_latents
from perturb_lens.saes.sae import SAE

FEATURE_CHOICES = ("inactive", "active", "dead")


def need_sae(ctx: DirectionContext, name: str) -> SAE:
    """The context's SAE (error if there is none)."""
    if ctx.sae is None:
        raise ValueError(
            f"{name!r} needs an SAE at the hook: set `sae:` in the config (a SAELens folder, "
            "release:sae_id or e2e_sae checkpoint) or pass sae= to run_experiment."
        )
    return ctx.sae


def _error(ctx: DirectionContext, name: str) -> Tensor:
    """``SAE(x) - x`` per row; zero at BOS rows when the SAE skips BOS (``cfg.skip_bos``)."""
    sae = need_sae(ctx, name)
    with torch.no_grad():
        err = sae.error(ctx.x.float()).float()
    if sae.cfg.skip_bos and ctx.pos_of_row is not None:
        err[ctx.pos_of_row.to(err.device) == 0] = 0.0
    return err


@register_scale("sae-error", description="||SAE(x) - x|| per token (the epsilon-baselines)")
def sae_error_scale(ctx: DirectionContext) -> Tensor:
    return _error(ctx, "scale sae-error").double().norm(dim=-1)


@register_direction(
    "sae-error",
    contains_minus_x=None,
    description="SAE(x) - x; with scale: raw, length 1 substitutes SAE(x) (zero at BOS for an "
    "SAE trained without it)",
    allow_zero=True,
)
def sae_error(ctx: DirectionContext) -> Tensor:
    return _error(ctx, "sae-error")


def _sequence_active(ctx: DirectionContext, sae: SAE) -> Tensor:
    """Bool [N, d_sae]: latent active anywhere in each row's sequence (the row alone when the
    context carries no sequence structure)."""
    with torch.no_grad():
        if ctx.sequences is None or ctx.seq_of_row is None:
            return sae.encode(ctx.x.float()) > ALIVE_EPS
        seqs = ctx.sequences.float()
        f = sae.encode(seqs.reshape(-1, seqs.shape[-1])).reshape(*seqs.shape[:2], sae.d_sae)
        per_seq = (f > ALIVE_EPS).any(dim=1)  # [B, d_sae]
        return per_seq[ctx.seq_of_row.to(per_seq.device)]


@register_direction(
    "sae-feature",
    contains_minus_x=False,
    description="unit decoder row of a random latent: alive but inactive in the sequence "
    "(default), active at the token, or dead",
    options={"which": "inactive (default) | active | dead"},
)
def sae_feature(ctx: DirectionContext) -> Tensor:
    sae = need_sae(ctx, "sae-feature")
    which = ctx.options.get("which", "inactive")
    if which not in FEATURE_CHOICES:
        raise ValueError(f"sae-feature which={which!r}; use one of {FEATURE_CHOICES}.")
    alive = getattr(sae, "alive", None)
    if which != "active" and alive is None:
        raise ValueError(
            f"sae-feature which={which!r} needs the SAE's alive set (sae.alive, fitted over the "
            "statistics tokens; run_experiment sets it)."
        )
    n = ctx.x.shape[0]
    if which == "active":
        with torch.no_grad():
            allowed = sae.encode(ctx.x.float()) > ALIVE_EPS
    elif which == "dead":
        allowed = (~alive.bool()).expand(n, -1)
    else:
        allowed = alive.bool()[None, :].to(ctx.x.device) & ~_sequence_active(ctx, sae)
    counts = allowed.sum(-1)
    if bool((counts == 0).any()):
        row = int((counts == 0).nonzero()[0])
        raise ValueError(
            f"sae-feature which={which!r}: row {row} has no such latent (alive: "
            f"{int(alive.sum()) if alive is not None else '?'} of {sae.d_sae})."
        )
    # uniform over the allowed latents of each row: argmax of random keys on the allowed set
    keys = torch.rand(allowed.shape, generator=ctx.generator, device=ctx.generator.device)
    keys = keys.to(allowed.device).masked_fill(~allowed, -1.0)
    latent = keys.argmax(-1)
    return sae.decoder_directions().to(ctx.x.device)[latent]


ALIVE_FILE = "sae_alive.pt"


def cached_alive(
    sae: SAE, model: LensModel, tokens: Tensor, run_dir: Path, *, progress: bool = True
) -> Tensor:
    """The SAE's alive set over ``tokens`` (bool [d_sae]), cached in ``run_dir`` with the hash of
    the tokens and the SAE's weights (so a resumed run reuses it)."""
    from perturb_lens.data.text import token_source_hash

    key = f"{token_source_hash(tokens)}-{sae_fingerprint(sae)}"
    path = Path(run_dir) / ALIVE_FILE
    if path.is_file():
        try:
            saved = torch_load(path, "alive-latents cache")
        except (UnreadableFileError, OSError) as e:  # damaged: computed again, like any cache
            logging.getLogger(__name__).warning("Ignoring unreadable %s (%s)", path, e)
            saved = None
        if isinstance(saved, dict) and saved.get("key") == key:
            return saved["alive"]
    alive = alive_latents(sae, model, tokens, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save({"key": key, "alive": alive}, f))
    return alive


def sae_fingerprint(sae: SAE) -> str:
    """A short hash of the SAE's weights."""
    h = hashlib.sha256()
    for name, p in sorted(sae.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
