"""Synthetic activations composed of SAE latents (Giglemiani et al.) and their direction targets.

A synthetic activation is ``y = b_dec + sum_j m_j W_dec[j]`` over a set of latents ``j``. What is
drawn from real activations (SAE latents of the real pool, :class:`LatentStats`):

- **the number of latents** (L0): from the real per-token L0 distribution (or fixed);
- **which latents**: ``bag`` draws them independently, each with probability proportional to its
  real firing frequency (without replacement); ``structured`` draws the first one that way and
  each next one in proportion to how often it fires together with those already chosen in real
  tokens (summed over them), falling back to the frequencies when none co-occurs;
- **magnitudes** ``m_j``: each from the latent's own real (nonzero) activations.

Controls: ``cosine = [lo, hi]`` keeps every pair of chosen latents' decoder rows within that cosine
range (``"real"``: the 1%-99% range of co-active pairs in real tokens); ``norm`` rescales the
latent sum so that ``||y||`` equals a norm drawn from the real activations (``"real"``) or a
number (``b_dec`` kept; the whole ``y`` is scaled where that is impossible).

Registered directions (targets for interpolation ``x + t (y - x)`` with ``scale: raw``):
``synthetic`` (``y - x``), ``sae-latent`` (one latent: ``synthetic`` with L0 = 1) and
``sae-reconstruction`` (``SAE(x_other) - x`` for another real activation).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from perturb_lens.directions.base import (
    DirectionContext,
    _need_pool,
    _randint,
    register_direction,
)
from perturb_lens.directions.sae import need_sae

KINDS = ("bag", "structured")
REAL_COSINE_QUANTILES = (0.01, 0.99)
_CACHE: OrderedDict[tuple, LatentStats] = OrderedDict()
_CACHE_SIZE = 4


@dataclass
class LatentStats:
    """SAE latents of real activations: per-token L0, firing frequencies, activation values."""

    acts: sp.csr_matrix  # [M, d_sae] nonzero latent activations of M real tokens
    norms: np.ndarray  # [M] norms of the real activations
    cosine_range: tuple[float, float]  # REAL_COSINE_QUANTILES of co-active decoder-row cosines

    def __post_init__(self) -> None:
        self._cols = self.acts.tocsc()  # per-latent access: which tokens, which values

    @property
    def l0(self) -> np.ndarray:
        """Active latents per real token [M]."""
        return np.diff(self.acts.indptr)

    @property
    def frequency(self) -> np.ndarray:
        """Fraction of real tokens in which each latent fires [d_sae]."""
        return np.bincount(self.acts.indices, minlength=self.acts.shape[1]) / self.acts.shape[0]

    @classmethod
    def fit(cls, sae: Any, x: Tensor, *, batch: int = 1024, seed: int = 0) -> LatentStats:
        """Encode real activations ``x`` [M, d] (non-BOS) with ``sae``, in batches."""
        blocks = []
        with torch.no_grad():
            for i in range(0, len(x), batch):
                f = sae.encode(x[i : i + batch].to(sae.W_enc.device)).float().cpu().numpy()
                blocks.append(sp.csr_matrix(f))
        acts = sp.vstack(blocks, format="csr")
        acts.eliminate_zeros()
        norms = x.double().norm(dim=-1).cpu().numpy()
        return cls(acts, norms, _coactive_cosine_range(sae, acts, seed))

    def cooccurrence(self, latent: int) -> np.ndarray:
        """Number of real tokens in which each latent fires together with ``latent`` [d_sae]."""
        c = self._cols
        sub = self.acts[c.indices[c.indptr[latent] : c.indptr[latent + 1]]]
        return np.bincount(sub.indices, minlength=self.acts.shape[1]).astype(np.float64)

    def magnitude(self, latent: int, rng: np.random.Generator) -> float:
        """One of ``latent``'s real nonzero activations, uniformly."""
        c = self._cols
        col = c.data[c.indptr[latent] : c.indptr[latent + 1]]
        return float(col[rng.integers(len(col))])


def _coactive_cosine_range(sae: Any, acts: sp.csr_matrix, seed: int) -> tuple[float, float]:
    """Quantiles of the decoder-row cosine over pairs of latents active in the same real token."""
    dirs = sae.decoder_directions().double().cpu().numpy()
    rng = np.random.default_rng(seed)
    rows = rng.permutation(acts.shape[0])[:2000]
    cos = []
    for r in rows:
        idx = acts.indices[acts.indptr[r] : acts.indptr[r + 1]]
        if len(idx) > 1:
            c = dirs[idx] @ dirs[idx].T
            cos.append(c[np.triu_indices(len(idx), 1)])
    if not cos:
        return (-1.0, 1.0)
    lo, hi = np.quantile(np.concatenate(cos), REAL_COSINE_QUANTILES)
    return (float(lo), float(hi))


def latent_stats(sae: Any, pool: Tensor) -> LatentStats:
    """:meth:`LatentStats.fit` on the real pool, cached per (SAE, pool)."""
    probe = pool[:: max(1, len(pool) // 16)].double().sum().item()
    key = (id(sae), tuple(pool.shape), probe)
    if key not in _CACHE:
        _CACHE[key] = LatentStats.fit(sae, pool)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return _CACHE[key]


@dataclass
class Synthetic:
    """Synthetic activations ``y`` [n, d] and what they are made of."""

    y: Tensor  # [n, d] float32
    latents: list[np.ndarray]  # chosen latent ids per row
    magnitudes: list[np.ndarray]  # their magnitudes (before any norm rescaling)
    target_norms: np.ndarray | None  # [n] the norms asked for (None: no norm control)


def _cosine_bounds(cosine: Any, lstats: LatentStats) -> tuple[float, float] | None:
    if cosine is None:
        return None
    if cosine == "real":
        return lstats.cosine_range
    lo, hi = (float(v) for v in cosine)
    if not -1.0 <= lo < hi <= 1.0:
        raise ValueError(
            f"cosine must be [lo, hi] with -1 <= lo < hi <= 1, or 'real'; got {cosine}"
        )
    return lo, hi


def _target_norms(norm: Any, lstats: LatentStats, n: int, rng: np.random.Generator):
    if norm is None:
        return None
    if norm == "real":
        return lstats.norms[rng.integers(len(lstats.norms), size=n)]
    if float(norm) <= 0:
        raise ValueError(f"norm must be positive, 'real' or null; got {norm}")
    return np.full(n, float(norm))


def _choose_latents(
    k: int,
    kind: str,
    lstats: LatentStats,
    freq: np.ndarray,
    dirs: np.ndarray,
    bounds: tuple[float, float] | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """``k`` distinct latents (fewer if the cosine bounds leave no candidate)."""
    if kind == "bag" and bounds is None:
        alive = int((freq > 0).sum())
        return rng.choice(len(freq), size=min(k, alive), replace=False, p=freq / freq.sum())
    allowed = freq > 0
    cooc = np.zeros_like(freq)
    chosen: list[int] = []
    while len(chosen) < k:
        w = np.where(allowed, cooc if kind == "structured" and cooc[allowed].sum() > 0 else freq, 0)
        if w.sum() <= 0:
            break
        j = int(rng.choice(len(w), p=w / w.sum()))
        chosen.append(j)
        allowed[j] = False
        if bounds is not None:
            c = dirs @ dirs[j]
            allowed &= (c >= bounds[0]) & (c <= bounds[1])
        if kind == "structured":
            cooc += lstats.cooccurrence(j)
    return np.asarray(chosen, dtype=np.int64)


def _rescale(b: Tensor, v: Tensor, norm: float) -> Tensor:
    """``b + s v`` with ``s >= 0`` and norm ``norm``; else ``(b + v)`` rescaled to it."""
    bv, vv, bb = float(b @ v), float(v @ v), float(b @ b)
    disc = bv * bv - vv * (bb - norm * norm)
    if vv > 0 and disc >= 0 and (-bv + disc**0.5) > 0:
        return b + ((-bv + disc**0.5) / vv) * v
    y = b + v
    return y * (norm / y.norm().clamp_min(1e-12))


def synthesize(
    sae: Any,
    lstats: LatentStats,
    n: int,
    *,
    kind: str = "bag",
    l0: int | str = "real",
    cosine: Any = None,
    norm: Any = None,
    rng: np.random.Generator,
) -> Synthetic:
    """``n`` synthetic activations (see the module docstring for ``kind``, ``cosine``, ``norm``).

    ``l0``: ``"real"`` (each row's latent count drawn from the real L0 distribution) or an int.
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown synthetic kind {kind!r}; use one of {KINDS}.")
    freq = lstats.frequency
    if not (freq > 0).any():
        raise ValueError("No SAE latent fires on the real pool: check the SAE and the hook.")
    bounds = _cosine_bounds(cosine, lstats)
    dirs = sae.decoder_directions().double().cpu().numpy() if bounds is not None else None
    counts = rng.choice(lstats.l0, size=n) if l0 == "real" else np.full(n, int(l0))
    norms = _target_norms(norm, lstats, n, rng)
    w_dec = sae.W_dec.detach().double().cpu()
    b_dec = sae.b_dec.detach().double().cpu()
    ys, latents, mags = [], [], []
    for i in range(n):
        idx = _choose_latents(int(counts[i]), kind, lstats, freq, dirs, bounds, rng)
        m = np.array([lstats.magnitude(j, rng) for j in idx], dtype=np.float64)
        v = torch.from_numpy(m) @ w_dec[torch.from_numpy(idx)]
        ys.append(b_dec + v if norms is None else _rescale(b_dec, v, float(norms[i])))
        latents.append(idx)
        mags.append(m)
    y = torch.stack(ys).float() if ys else torch.zeros(0, sae.d_in)
    return Synthetic(y, latents, mags, norms)


# ---- direction generators ------------------------------------------------------------------


def _numpy_rng(ctx: DirectionContext) -> np.random.Generator:
    """A numpy generator seeded from ``ctx.generator`` (so the draws stay reproducible)."""
    seed = int(_randint(2**62, 1, ctx.generator, torch.device("cpu"))[0])
    return np.random.default_rng(seed)


def synthetic_targets(ctx: DirectionContext, name: str, **defaults: Any) -> Tensor:
    """Synthetic activations [N, d] for the rows of ``ctx.x`` from ``ctx.options``."""
    sae = need_sae(ctx, name)
    opts = {**defaults, **ctx.options}
    lstats = latent_stats(sae, _need_pool(ctx, name, 2))
    syn = synthesize(
        sae,
        lstats,
        len(ctx.x),
        kind=opts.get("kind", "bag"),
        l0=opts.get("l0", "real"),
        cosine=opts.get("cosine"),
        norm=opts.get("norm"),
        rng=_numpy_rng(ctx),
    )
    return syn.y.to(ctx.x.device)


_SYNTHETIC_OPTIONS = {
    "kind": "'bag' (latents drawn independently by frequency) or 'structured' (by co-occurrence)",
    "l0": "'real' (latent count from the real L0 distribution, default) or an int",
    "cosine": "null (default), [lo, hi] bounds on the chosen latents' pairwise decoder cosines, "
    "or 'real' (the 1%-99% range of co-active real pairs)",
    "norm": "null (default: as composed), 'real' (a real activation norm) or a number",
}


@register_direction(
    "synthetic",
    contains_minus_x=True,
    description="y - x, y a synthetic activation composed of SAE latents (Giglemiani et al.)",
    options=_SYNTHETIC_OPTIONS,
)
def synthetic(ctx: DirectionContext) -> Tensor:
    return synthetic_targets(ctx, "synthetic") - ctx.x.float()


@register_direction(
    "sae-latent",
    contains_minus_x=True,
    description="y - x, y = b_dec + m W_dec[j] for one latent j (by frequency), norm 'real'",
    options={"norm": _SYNTHETIC_OPTIONS["norm"] + " (default here: 'real')"},
)
def sae_latent(ctx: DirectionContext) -> Tensor:
    return synthetic_targets(ctx, "sae-latent", l0=1, norm="real") - ctx.x.float()


@register_direction(
    "sae-reconstruction",
    contains_minus_x=True,
    description="SAE(x_other) - x: towards the SAE reconstruction of another real activation",
)
def sae_reconstruction(ctx: DirectionContext) -> Tensor:
    sae = need_sae(ctx, "sae-reconstruction")
    pool = _need_pool(ctx, "sae-reconstruction", 1)
    other = pool[_randint(len(pool), len(ctx.x), ctx.generator, pool.device)]
    with torch.no_grad():
        y = sae(other.to(sae.W_enc.device, sae.W_enc.dtype)).float()
    return y.to(ctx.x.device) - ctx.x.float()
