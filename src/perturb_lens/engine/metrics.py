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
