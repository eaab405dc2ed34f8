"""Log-sum-exp and softmax moments over the vocabulary, block by block, and KL for a linear
unembedding from them: the engine's fast KL, which never holds ``[rows, vocab]`` logits."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from perturb_lens.metrics.builtin import at_least_float32


def vocab_block(device: torch.device) -> int:
    """Vocabulary rows per block of the blocked unembedding (cache-sized on CPU)."""
    return 4096 if device.type == "cpu" else 16384


def _logit_blocks(final: Tensor, w: Tensor, b: Tensor | None) -> Iterator[tuple[int, Tensor]]:
    """Transposed float32 logits ``[block, rows]`` of ``final @ w.T + b``, block by block over the
    vocabulary (the ``[vocab, rows]`` orientation runs near the matmul peak on CPU, and a block
    stays in cache for the reductions that follow)."""
    ft = final.reshape(-1, final.shape[-1]).to(w.dtype).t()  # float64 for a float64 model
    step = vocab_block(final.device)
    for v0 in range(0, w.shape[0], step):
        z = w[v0 : v0 + step] @ ft
        if b is not None:
            z += b[v0 : v0 + step, None]
        yield v0, z


def _softmax_blocks(
    final: Tensor, w: Tensor, b: Tensor | None, moment: bool
) -> tuple[Tensor, Tensor | None]:
    """One pass over vocabulary blocks: float64 log-sum-exp of the logits ``final @ w.T + b`` and,
    if ``moment``, ``u = w.T @ softmax(...)`` in float64. Online maximum; exponentials and products
    in float32 per block, combined across blocks in float64 (as accurate as a float64 product
    here: the error is that of the float32 logits). Rows ``final`` [..., d]."""
    m: Tensor | None = None
    s = torch.zeros(final.shape[:-1].numel(), dtype=torch.float64, device=final.device)
    u = (
        torch.zeros(len(s), w.shape[1], dtype=torch.float64, device=final.device)
        if moment
        else None
    )
    for v0, z in _logit_blocks(final, w, b):
        zmax = z.amax(0)
        if m is None:
            m = zmax
        else:
            new = torch.maximum(m, zmax)
            scale = (m - new).double().exp_()
            s = s * scale
            if u is not None:
                u *= scale.unsqueeze(1)
            m = new
        e = z.sub_(m).exp_()  # [block, rows]
        s = s + e.sum(0).double()
        if u is not None:
            u += (e.t() @ w[v0 : v0 + e.shape[0]]).double()
    assert m is not None
    lse = (m.double() + s.log()).reshape(final.shape[:-1])
    if u is not None:
        u = (u / s.unsqueeze(1)).reshape(*final.shape[:-1], w.shape[1])
    return lse, u


def lse_linear(final: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """float64 log-sum-exp over the vocabulary of the logits ``final @ w.T + b`` for rows
    ``final`` [..., d] -> [...], never holding ``[rows, vocab]`` (see :func:`_softmax_blocks`)."""
    return _softmax_blocks(final, w, b, moment=False)[0]


def softmax_moment(final: Tensor, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
    """float64 ``(lse [...], u = w.T @ softmax [..., d])`` of the logits of rows ``final``."""
    lse, u = _softmax_blocks(final, w, b, moment=True)
    assert u is not None
    return lse, u


def kl_linear(
    lse_clean: Tensor, u_clean: Tensor, f_clean: Tensor, lse_pert: Tensor, f_pert: Tensor
) -> Tensor:
    """KL(p_clean || p_pert) for a linear unembedding ``logits = W f + b``, exactly rearranged:

    ``sum p_c (lp_c - lp_p) = lse_p - lse_c - p_c . (logits_p - logits_c)
    = lse_p - lse_c - u_c . (f_p - f_c)`` with ``u_c = W^T p_c`` (the bias cancels).
    Per row only a log-sum-exp over the vocabulary is needed (``lse_pert``, float64, see
    :func:`lse_linear`); the small terms are combined in float64 and the difference ``f_p - f_c``
    is taken first, so alpha = 0 gives 0 to float noise. ``lse_clean`` [...], ``u_clean`` and
    ``f_clean`` [..., d] broadcast against ``f_pert``.
    """
    dot = (u_clean * (f_pert.double() - f_clean.double())).sum(-1)
    return at_least_float32((lse_pert - lse_clean - dot).clamp_min(0.0), f_pert.dtype)
