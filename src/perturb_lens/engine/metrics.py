"""Output-change metrics between a clean and a perturbed pass, per row (float32 or better).

Output metrics compare next-token distributions: ``kl`` = KL(p_clean || p_perturbed) in nats,
``js`` = Jensen-Shannon distance (square root of the JS divergence, nats), ``dce`` = change of the
cross-entropy on the true next token (NaN where there is none), ``top1`` = whether the arg-max token
changed. Downstream metrics compare activations at a later hook: ``l2`` = ||h_clean - h_pert||_2,
``cos`` = cosine similarity.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

OUTPUT_METRICS = ("kl", "js", "dce", "top1")
DOWNSTREAM_METRICS = ("l2", "cos")
METRICS = OUTPUT_METRICS + DOWNSTREAM_METRICS


def check_metrics(names: Sequence[str]) -> list[str]:
    """Validate metric names; the error lists the known ones."""
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; choose from {list(METRICS)}.")
    if not names:
        raise ValueError(f"No metric requested; choose from {list(METRICS)}.")
    return list(names)


def at_least_float32(x: Tensor, like: torch.dtype | None = None) -> Tensor:
    """``x`` in float32, or in float64 when ``like`` (default: its own dtype) is float64: metrics
    of a float64 model stay float64 (exactness tests), half precision is widened."""
    return x.to(torch.promote_types(like or x.dtype, torch.float32))


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


def output_metrics(
    clean_logp: Tensor,
    pert_logits: Tensor,
    names: Sequence[str],
    next_tokens: Tensor | None = None,
) -> dict[str, Tensor]:
    """Metrics of the next-token distribution. ``clean_logp`` (float32 log-probs) broadcasts
    against ``pert_logits`` [..., V]; ``next_tokens`` [...] (-1 = none) for ``dce``."""
    want = [m for m in names if m in OUTPUT_METRICS]
    if not want:
        return {}
    logp = torch.log_softmax(at_least_float32(pert_logits), dim=-1)
    p_clean = clean_logp.exp()
    out: dict[str, Tensor] = {}
    if "kl" in want:
        out["kl"] = (p_clean * (clean_logp - logp)).sum(-1).clamp_min(0.0)
    if "js" in want:
        p = logp.exp()
        log_m = torch.log(0.5 * (p_clean + p)).clamp_min(torch.finfo(torch.float32).min)
        js = 0.5 * (p_clean * (clean_logp - log_m)).sum(-1) + 0.5 * (p * (logp - log_m)).sum(-1)
        out["js"] = js.clamp_min(0.0).sqrt()
    if "dce" in want:
        if next_tokens is None:
            raise ValueError("dce needs the true next tokens.")
        idx = next_tokens.clamp_min(0).unsqueeze(-1)
        shape = torch.broadcast_shapes(clean_logp.shape[:-1], logp.shape[:-1])
        idx = idx.expand(*shape, 1)
        ce_clean = -torch.gather(clean_logp.expand(*shape, -1), -1, idx).squeeze(-1)
        ce_pert = -torch.gather(logp, -1, idx).squeeze(-1)
        dce = ce_pert - ce_clean
        out["dce"] = torch.where(next_tokens.expand(shape) >= 0, dce, torch.nan)
    if "top1" in want:
        out["top1"] = clean_logp.argmax(-1) != logp.argmax(-1)
    return out


def downstream_metrics(clean: Tensor, pert: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """Distance metrics between downstream activations [..., d] (in float32, or float64)."""
    out: dict[str, Tensor] = {}
    clean, pert = at_least_float32(clean, pert.dtype), at_least_float32(pert)
    if "l2" in names:
        out["l2"] = (clean - pert).norm(dim=-1)
    if "cos" in names:
        out["cos"] = torch.cosine_similarity(clean, pert, dim=-1)
    return out
