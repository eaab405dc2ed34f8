"""The SAE training recipes of SAELens / OpenAI (Gao et al. 2024) / Anthropic (April 2023 update),
as plain functions on an :class:`SAE` in its training space:

- :func:`topk_encode` / :func:`sparse_decode`: a TopK SAE's forward and backward touching only the
  k selected latents per token (the encoder matmul of the forward is the one dense product);
- :func:`aux_k_loss`: TopK's auxiliary loss; the ``k_aux`` largest pre-activations of the *dead*
  latents reconstruct the main reconstruction's residual (detached), scaled by
  ``min(1, n_dead / k_aux)``; it gives dead latents a gradient that TopK alone never does;
- :func:`resample_dead`: ReLU SAEs' dead-latent resampling; each dead latent's decoder row becomes
  a (centred, unit) input drawn with probability proportional to its squared reconstruction loss,
  its encoder column that direction at 0.2 x the mean alive encoder norm, its bias 0, and Adam's
  moments for those weights are zeroed;
- :func:`project_decoder_grad` / :func:`normalize_decoder`: decoder rows held at unit norm (the
  gradient's radial part removed before the step, the rows renormalised after it);
- :func:`lr_factor` / :func:`warmup_factor`: learning-rate warm-up then linear or cosine decay;
  L1-coefficient warm-up;
- :func:`geometric_median`: Weiszfeld's iteration, the robust ``b_dec`` initialisation.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from perturb_lens.saes.sae import SAE

Decay = Literal["linear", "cosine"]


def lr_factor(step: int, total: int, warmup: float, decay: Decay, decay_fraction: float) -> float:
    """Multiplier of the learning rate at ``step`` (0-based) of ``total``: linear warm-up over the
    first ``warmup`` fraction of steps, constant, then a ``decay`` to 0 over the last
    ``decay_fraction``."""
    n_warm = math.ceil(warmup * total)
    if step < n_warm:
        return (step + 1) / n_warm
    n_decay = max(1, math.ceil(decay_fraction * total)) if decay_fraction > 0 else 0
    into = step - (total - n_decay)
    if n_decay == 0 or into < 0:
        return 1.0
    frac = into / n_decay  # 0 at the decay's first step, -> 1 at the end
    return 1.0 - frac if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))


def warmup_factor(step: int, total: int, warmup: float) -> float:
    """Linear ramp from 1/n to 1 over the first ``warmup`` fraction of steps (the L1 warm-up)."""
    n_warm = math.ceil(warmup * total)
    return 1.0 if step >= n_warm else (step + 1) / n_warm


def geometric_median(x: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """The point minimising the summed distance to the rows of ``x`` [n, d] (Weiszfeld; float64)."""
    pts = x.double()
    y = pts.mean(0)
    for _ in range(iters):
        w = 1.0 / (pts - y).norm(dim=-1).clamp_min(1e-12)
        new = (w[:, None] * pts).sum(0) / w.sum()
        if float((new - y).norm()) <= tol * float(y.norm().clamp_min(1e-12)):
            y = new
            break
        y = new
    return y.float()


def project_decoder_grad(sae: SAE) -> None:
    """Remove the component of each decoder row's gradient along the (unit) row."""
    w, g = sae.W_dec, sae.W_dec.grad
    if g is not None:
        with torch.no_grad():
            g.sub_((g * w).sum(-1, keepdim=True) * w)


def normalize_decoder(sae: SAE) -> None:
    """Project decoder rows back to unit norm (after each step)."""
    with torch.no_grad():
        sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))


def aux_k_loss(sae: SAE, xs: Tensor, residual: Tensor, dead: Tensor, k_aux: int) -> Tensor:
    """``min(1, n_dead/k_aux) * mean ||e - sum_j relu(h_j) W_dec[j]||^2`` (summed over d), ``j``
    over the ``k_aux`` largest pre-activations ``h`` of the ``dead`` latents, for inputs ``xs``
    [B, d] and the detached residual ``e`` [B, d]; 0 if none is dead. Only the dead latents'
    pre-activations are computed (few once training has settled)."""
    idx_dead = dead.nonzero().squeeze(-1)
    n_dead = int(idx_dead.numel())
    if n_dead == 0 or k_aux <= 0:
        return xs.new_zeros(())
    x_in = xs - sae.b_dec if sae.cfg.apply_b_dec_to_input else xs
    h = x_in @ sae.W_enc[:, idx_dead] + sae.b_enc[idx_dead]
    top = torch.topk(h, min(k_aux, n_dead), dim=-1)
    e_hat = sparse_decode(sae.W_dec, idx_dead[top.indices], torch.relu(top.values))
    return min(1.0, n_dead / k_aux) * (e_hat - residual).pow(2).sum(-1).mean()


def _scatter_matrix(idx: Tensor, vals: Tensor, d_sae: int, *, transpose: bool) -> Tensor:
    """The sparse [B, d_sae] matrix with ``vals[b, j]`` at ``(b, idx[b, j])`` (or its transpose)."""
    rows = torch.arange(idx.shape[0]).repeat_interleave(idx.shape[1])
    at = torch.stack([idx.reshape(-1), rows] if transpose else [rows, idx.reshape(-1)])
    shape = (d_sae, idx.shape[0]) if transpose else (idx.shape[0], d_sae)
    return torch.sparse_coo_tensor(at, vals.reshape(-1), shape, check_invariants=False)


class _SparseDecode(torch.autograd.Function):
    """``out[b] = sum_j vals[b, j] * w_dec[idx[b, j]]`` through sparse products."""

    @staticmethod
    def forward(ctx, vals, idx, w_dec):  # type: ignore[override]
        ctx.save_for_backward(vals, idx, w_dec)
        return torch.sparse.mm(_scatter_matrix(idx, vals, w_dec.shape[0], transpose=False), w_dec)

    @staticmethod
    def backward(ctx, g_out):  # type: ignore[override]
        vals, idx, w_dec = ctx.saved_tensors
        g_vals = (g_out @ w_dec.T).gather(1, idx)  # one dense product beats k gathers on CPU
        g_w = torch.sparse.mm(_scatter_matrix(idx, vals, w_dec.shape[0], transpose=True), g_out)
        return g_vals, None, g_w


def sparse_decode(w_dec: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """``sum_j values[b, j] * w_dec[indices[b, j]]`` [B, d] without a dense [B, d_sae] latent
    matrix in the forward and the weight gradient (B k d instead of B d_sae d)."""
    return _SparseDecode.apply(values, indices, w_dec)


class _TopKEncode(torch.autograd.Function):
    """``relu(topk((x - b_dec) @ W_enc + b_enc))`` as (values, indices) [B, k], with a backward
    that touches only the k selected latents per token (a sparse product, not a dense matmul)."""

    @staticmethod
    def forward(ctx, x, w_enc, b_enc, b_dec, k):  # type: ignore[override]
        xc = x - b_dec
        top = torch.topk(xc @ w_enc + b_enc, k, dim=-1)
        ctx.save_for_backward(xc, w_enc, top.indices, top.values > 0)
        ctx.mark_non_differentiable(top.indices)
        return torch.relu(top.values), top.indices

    @staticmethod
    def backward(ctx, g_vals, _g_idx):  # type: ignore[override]
        xc, w_enc, idx, pos = ctx.saved_tensors
        g = g_vals * pos
        m = w_enc.shape[1]
        grad_b_enc = torch.zeros(m, dtype=g.dtype).index_add_(0, idx.reshape(-1), g.reshape(-1))
        grad_w = torch.sparse.mm(_scatter_matrix(idx, g, m, transpose=True), xc)  # [d_sae, d]
        return None, grad_w.T, grad_b_enc, -(w_enc @ grad_b_enc), None


def topk_encode(sae: SAE, xs: Tensor) -> tuple[Tensor, Tensor]:
    """The TopK SAE's latents as (values, indices) [B, k] (equal to the nonzeros of
    ``sae.encode``), differentiable in the SAE's weights only."""
    b_dec = sae.b_dec if sae.cfg.apply_b_dec_to_input else torch.zeros_like(sae.b_dec)
    return _TopKEncode.apply(xs, sae.W_enc, sae.b_enc, b_dec, int(sae.cfg.k or 0))


@torch.no_grad()
def resample_dead(
    sae: SAE, opt: torch.optim.Optimizer, dead: Tensor, x: Tensor, generator: torch.Generator
) -> int:
    """Resample the ``dead`` latents toward high-loss inputs among ``x`` [n, d] (training space);
    return how many were resampled."""
    idx_dead = dead.nonzero().squeeze(-1)
    n = int(idx_dead.numel())
    if n == 0:
        return 0
    _, x_hat = sae.encode_decode(x)
    loss = (x_hat - x).pow(2).sum(-1)
    prob = loss.pow(2).double()
    if float(prob.sum()) <= 0:
        prob = torch.ones_like(prob)
    picks = torch.multinomial(prob, n, replacement=n > x.shape[0], generator=generator)
    v = x[picks] - (sae.b_dec if sae.cfg.apply_b_dec_to_input else 0)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    alive = ~dead
    enc_norm = float(sae.W_enc[:, alive].norm(dim=0).mean()) if alive.any() else 1.0
    sae.W_dec[idx_dead] = v
    sae.W_enc[:, idx_dead] = v.T * (0.2 * enc_norm)
    sae.b_enc[idx_dead] = 0.0
    for p, rows in ((sae.W_dec, (idx_dead,)), (sae.W_enc, (slice(None), idx_dead))):
        _zero_moments(opt, p, rows)
    _zero_moments(opt, sae.b_enc, (idx_dead,))
    return n


def _zero_moments(opt: torch.optim.Optimizer, p: Tensor, index: tuple) -> None:
    """Zero Adam's first and second moments of ``p[index]``."""
    state = opt.state.get(p, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][index] = 0.0
