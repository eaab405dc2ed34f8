"""Output-change metrics between a clean and a perturbed pass, per row (float32 or better).

Output metrics compare next-token distributions: ``kl`` = KL(p_clean || p_perturbed) in nats,
``js`` = Jensen-Shannon distance (square root of the JS divergence, nats), ``dce`` = change of the
cross-entropy on the true next token (NaN where there is none), ``top1`` = whether the arg-max token
changed. Downstream metrics compare activations at a later hook: ``l2`` = ||h_clean - h_pert||_2,
``cos`` = cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def logsumexp64(logits: Tensor) -> Tensor:
    """log-sum-exp over the last axis of float32 logits, returned in float64 (max-shifted)."""
    m = logits.max(-1, keepdim=True).values
    s = (logits - m).exp().sum(-1)
    return m.squeeze(-1).double() + s.double().log()


def kl_linear(
    lse_clean: Tensor, u_clean: Tensor, f_clean: Tensor, pert_logits: Tensor, f_pert: Tensor
) -> Tensor:
    """KL(p_clean || p_pert) for a linear unembedding ``logits = W f + b``, exactly rearranged:

    ``sum p_c (lp_c - lp_p) = lse_p - lse_c - p_c . (logits_p - logits_c)
    = lse_p - lse_c - u_c . (f_p - f_c)`` with ``u_c = W^T p_c`` (the bias cancels).
    Per row only a log-sum-exp over the vocabulary is needed; the small terms are combined in
    float64 and the difference ``f_p - f_c`` is taken first, so alpha = 0 gives 0 to float noise.
    ``lse_clean`` [...], ``u_clean`` and ``f_clean`` [..., d] broadcast against ``f_pert``.
    """
    dot = (u_clean * (f_pert.double() - f_clean.double())).sum(-1)
    return (logsumexp64(pert_logits) - lse_clean - dot).clamp_min(0.0).float()


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
    logp = torch.log_softmax(pert_logits.float(), dim=-1)
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
    """Distance metrics between downstream activations [..., d] (computed in float32)."""
    out: dict[str, Tensor] = {}
    clean, pert = clean.float(), pert.float()
    if "l2" in names:
        out["l2"] = (clean - pert).norm(dim=-1)
    if "cos" in names:
        out["cos"] = torch.cosine_similarity(clean, pert, dim=-1)
    return out
