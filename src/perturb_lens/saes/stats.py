"""SAE statistics over a token set: L0, alive/dead latents, MSE, explained variance, CE-loss
increase and KL of substituting ``SAE(x)`` at the hook.

Definitions (per token ``x`` at the SAE's hook, over the positions that count: every position but
the last, and without BOS unless ``include_bos``):

- ``l0``: mean number of latents with ``f > 0``;
- ``alive``: latents with ``f > ALIVE_EPS`` on at least one token (``dead = d_sae - alive``);
- ``mse``: mean of ``(SAE(x) - x)^2`` over tokens and dimensions; ``rel_error``: mean of
  ``||SAE(x) - x|| / ||x||``;
- ``explained_variance``: ``1 - sum ||x - SAE(x)||^2 / sum ||x - mean(x)||^2``;
- ``ce_clean`` / ``ce_sae``: next-token cross-entropy (nats) with ``x`` / with ``SAE(x)``
  substituted at every counted position; ``ce_increase = ce_sae - ce_clean``;
- ``kl``: mean ``KL(p_clean || p_SAE)`` (nats) per token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from perturb_lens.models.base import LensModel
from perturb_lens.saes.sae import SAE

ALIVE_EPS = 1e-8  # a latent is active where f > ALIVE_EPS (the published sae-feature code's 1e-8)


@dataclass
class SAEStats:
    """The statistics of one SAE on one token set (see the module docstring)."""

    name: str
    hook: str
    d_sae: int
    n_tokens: int
    l0: float
    alive: int
    dead: int
    mse: float
    rel_error: float
    explained_variance: float
    ce_clean: float
    ce_sae: float
    ce_increase: float
    kl: float

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def token_kl(clean_logits: Tensor, new_logits: Tensor) -> Tensor:
    """KL(p_clean || p_new) per token [...] in nats (float32, differentiable in ``new``)."""
    lp_c = torch.log_softmax(clean_logits.float(), dim=-1)
    lp_n = torch.log_softmax(new_logits.float(), dim=-1)
    return (lp_c.exp() * (lp_c - lp_n)).sum(-1)


def token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy [B, T-1] (nats) of logits [B, T, V] on tokens [B, T]."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, tokens[:, 1:, None].to(logp.device)).squeeze(-1)


def alive_latents(
    sae: SAE, model: LensModel, tokens: Tensor, *, batch_seqs: int = 16, progress: bool = False
) -> Tensor:
    """Bool [d_sae]: latents active (``f > ALIVE_EPS``) somewhere in ``tokens`` (all positions)."""
    alive = torch.zeros(sae.d_sae, dtype=torch.bool)
    starts = range(0, tokens.shape[0], batch_seqs)
    with torch.no_grad():
        for s0 in tqdm(starts, desc="Alive latents", disable=not progress):
            x = model.run_to_hook(tokens[s0 : s0 + batch_seqs].to(model.device), sae.hook)
            f = sae.encode(x.float().reshape(-1, x.shape[-1]))
            alive |= (f > ALIVE_EPS).any(0).cpu()
    return alive


class _Acc:
    """Running sums for one SAE."""

    def __init__(self, d_sae: int, d: int) -> None:
        self.n = 0
        self.l0 = self.sq = self.rel = self.ce = self.kl = 0.0
        self.alive = torch.zeros(d_sae, dtype=torch.bool)
        self.sum_x = torch.zeros(d, dtype=torch.float64)
        self.sum_xx = 0.0


def sae_stats(
    saes: SAE | Mapping[str, SAE],
    model: LensModel,
    tokens: Tensor,
    *,
    batch_seqs: int = 8,
    include_bos: bool = False,
    progress: bool = True,
) -> list[SAEStats]:
    """Statistics of one SAE or several (same hook or not; each clean pass is shared)."""
    named = {"sae": saes} if isinstance(saes, SAE) else dict(saes)
    d = model.spec.d_model
    for sae in named.values():
        sae.check_compatible(sae.hook, d, model.frame)
        model.parse_hook(sae.hook)
    accs = {k: _Acc(s.d_sae, d) for k, s in named.items()}
    ce_clean, n_tok = 0.0, 0
    t = tokens.shape[1]
    mask = torch.ones(t, dtype=torch.bool)
    mask[t - 1] = False  # no next token to score
    if not include_bos:
        mask[0] = False
    hooks = sorted({s.hook for s in named.values()}, key=model.parse_hook)
    starts = range(0, tokens.shape[0], batch_seqs)
    with torch.no_grad():
        for s0 in tqdm(starts, desc="SAE statistics", disable=not progress):
            tok = tokens[s0 : s0 + batch_seqs].to(model.device)
            b = tok.shape[0]
            m = mask.to(model.device)
            for hook in hooks:
                clean = model.run_clean(tok, hook)
                logits_c = model.unembed(clean.final)
                if hook == hooks[0]:
                    ce_clean += float(token_ce(logits_c, tok)[:, m[:-1]].sum())
                    n_tok += b * int(m.sum())
                x = clean.x.float()
                xm = x[:, m]
                for name, sae in named.items():
                    if sae.hook != hook:
                        continue
                    acc = accs[name]
                    f, x_hat = sae.encode_decode(x)
                    x_sub = torch.where(m[None, :, None], x_hat, x)
                    final, _ = model.continue_all(clean, x_sub.unsqueeze(1).to(model.dtype))
                    logits_s = model.unembed(final[:, 0])
                    fm, err = f[:, m], (x_hat - x)[:, m]
                    acc.n += fm.shape[0] * fm.shape[1]
                    acc.l0 += float((fm > 0).sum())
                    acc.alive |= (fm > ALIVE_EPS).reshape(-1, sae.d_sae).any(0).cpu()
                    acc.sq += float(err.double().pow(2).sum())
                    acc.rel += float((err.norm(dim=-1) / xm.norm(dim=-1).clamp_min(1e-12)).sum())
                    acc.sum_x += xm.double().reshape(-1, d).sum(0).cpu()
                    acc.sum_xx += float(xm.double().pow(2).sum())
                    acc.ce += float(token_ce(logits_s, tok)[:, m[:-1]].sum())
                    acc.kl += float(token_kl(logits_c, logits_s)[:, m].sum())
    out = []
    for name, sae in named.items():
        a = accs[name]
        total_var = a.sum_xx - float(a.sum_x.pow(2).sum()) / a.n
        ce_c = ce_clean / n_tok
        out.append(
            SAEStats(
                name=name,
                hook=sae.hook,
                d_sae=sae.d_sae,
                n_tokens=a.n,
                l0=a.l0 / a.n,
                alive=int(a.alive.sum()),
                dead=int((~a.alive).sum()),
                mse=a.sq / (a.n * d),
                rel_error=a.rel / a.n,
                explained_variance=1.0 - a.sq / total_var,
                ce_clean=ce_c,
                ce_sae=a.ce / a.n,
                ce_increase=a.ce / a.n - ce_c,
                kl=a.kl / a.n,
            )
        )
    return out
