"""Held-out evaluation of a trained SAE: activation metrics per token group, CE increase of SAE(x).

Groups: ``tokens`` (the tokens an SAE trains on: no BOS, no outlier-norm tokens), ``bos`` and
``outlier`` (see :mod:`perturb_lens.saes.cache`), each reported apart, none hidden. Per group:
``n``, ``l0`` (mean count of ``f > 0``), ``mse`` (``||SAE(x) - x||^2`` summed over d, mean over
tokens) and ``explained_variance`` (``1 - SSE / sum ||x - mean_group(x)||^2``; None for a group
without spread, such as BOS, whose activation is the same in every row). ``dead_fraction``
counts latents with ``f > ALIVE_EPS`` on no held-out training-group token. The CE increase comes
from :func:`perturb_lens.saes.quality.sae_stats` on held-out sequences (BOS excluded; SAE(x)
substituted at every other position, outlier-norm tokens included).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from perturb_lens.models.base import LensModel
from perturb_lens.saes.cache import FLAGGED, ActivationCache
from perturb_lens.saes.quality import ALIVE_EPS, sae_stats
from perturb_lens.saes.sae import SAE


class GroupMetrics:
    """Running sums of one token group (float64)."""

    def __init__(self, d_sae: int, d: int) -> None:
        self.n, self.l0, self.sse, self.sum_xx = 0, 0.0, 0.0, 0.0
        self.sum_x = torch.zeros(d, dtype=torch.float64)
        self.fired = torch.zeros(d_sae, dtype=torch.bool)

    @torch.no_grad()
    def add(self, sae: SAE, x: Tensor) -> None:
        if x.shape[0] == 0:
            return
        f, x_hat = sae.encode_decode(x.float())
        self.n += x.shape[0]
        self.l0 += float((f > 0).sum())
        self.fired |= (f > ALIVE_EPS).any(0)
        self.sse += float((x_hat.double() - x.double()).pow(2).sum())
        self.sum_x += x.double().sum(0)
        self.sum_xx += float(x.double().pow(2).sum())

    def result(self) -> dict[str, float | int | None]:
        if self.n == 0:
            return {"n": 0, "l0": None, "mse": None, "explained_variance": None}
        total = self.sum_xx - float(self.sum_x.pow(2).sum()) / self.n
        # no spread (e.g. BOS, one token at one position): EV undefined, not a rounding artefact
        ev = 1.0 - self.sse / total if total > 1e-9 * self.sum_xx else None
        return {
            "n": self.n,
            "l0": self.l0 / self.n,
            "mse": self.sse / self.n,
            "explained_variance": ev,
        }


def activation_metrics(sae: SAE, cache: ActivationCache) -> dict[str, Any]:
    """Per-group metrics and the dead fraction of ``sae`` over a held-out cache."""
    d = sae.d_in
    groups = {g: GroupMetrics(sae.d_sae, d) for g in ("tokens", *FLAGGED)}
    for i in range(len(cache.counts)):
        parts = cache.chunk(i)
        groups["tokens"].add(sae, parts["x"])
        for g in FLAGGED:
            groups[g].add(sae, parts[g])
    out: dict[str, Any] = {g: m.result() for g, m in groups.items()}
    out["dead_fraction"] = 1.0 - float(groups["tokens"].fired.float().mean())
    return out


def heldout_eval(
    sae: SAE,
    cache: ActivationCache,
    model: LensModel | None = None,
    tokens: Tensor | None = None,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Activation metrics on ``cache`` and, given ``model`` and ``tokens``, the CE increase and KL
    of SAE(x) on those held-out sequences."""
    out = activation_metrics(sae, cache)
    if model is not None and tokens is not None and tokens.shape[0]:
        row = sae_stats(sae, model, tokens, progress=progress)[0]
        out["ce"] = {
            "n": row.n_tokens,
            "ce_clean": row.ce_clean,
            "ce_sae": row.ce_sae,
            "ce_increase": row.ce_increase,
            "kl": row.kl,
        }
    return out
