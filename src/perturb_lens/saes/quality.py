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
- ``kl``: mean ``KL(p_clean || p_SAE)`` (nats) per token;
- ``ce_zero`` / ``ce_mean``: the CE with the activation replaced by zeros / by its mean (``means``
  given per hook, e.g. a run's fitted mean, else the mean over the counted positions of the data);
- ``loss_recovered_zero`` = ``(ce_zero - ce_sae) / (ce_zero - ce_clean)`` and
  ``loss_recovered_mean`` likewise with ``ce_mean``: 1 when SAE(x) costs nothing, 0 when it is as
  bad as the ablation (NaN, with a warning, when the ablation does not change the CE at all);
  ``*_low`` / ``*_high``: its 95 % interval from resampling sequences (tokens of one sequence are
  not independent; Hesterberg's expanded percentile interval, as the verdicts use), with the
  draws shared by every SAE of one call, so intervals of SAEs on the same tokens are comparable.

Every replaced pass resumes from the hook (:meth:`LensModel.continue_all`), sharing the clean pass.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from perturb_lens.models.base import CleanRun, LensModel
from perturb_lens.saes.sae import SAE
from perturb_lens.statistics.bootstrap import ratio_intervals

log = logging.getLogger(__name__)

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
    ce_zero: float
    ce_mean: float
    loss_recovered_zero: float
    loss_recovered_mean: float
    mean_source: str  # "data" (the mean over the counted positions) or "given"
    n_seqs: int = 0
    loss_recovered_zero_low: float = float("nan")
    loss_recovered_zero_high: float = float("nan")
    loss_recovered_mean_low: float = float("nan")
    loss_recovered_mean_high: float = float("nan")

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32 at least (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def token_kl(clean_logits: Tensor, new_logits: Tensor) -> Tensor:
    """KL(p_clean || p_new) per token [...] in nats (float32 at least; differentiable in new)."""
    lp_c = torch.log_softmax(_wide(clean_logits), dim=-1)
    lp_n = torch.log_softmax(_wide(new_logits), dim=-1)
    return (lp_c.exp() * (lp_c - lp_n)).sum(-1)


def token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy [B, T-1] (nats) of logits [B, T, V] on tokens [B, T]."""
    logp = torch.log_softmax(_wide(logits[:, :-1]), dim=-1)
    return -logp.gather(-1, tokens[:, 1:, None].to(logp.device)).squeeze(-1)


def loss_recovered(ce_ablated: float, ce_sae: float, ce_clean: float) -> float:
    """``(ce_ablated - ce_sae) / (ce_ablated - ce_clean)``; NaN (warned) if the ablation costs
    nothing, where the fraction has no meaning."""
    if ce_ablated == ce_clean:
        log.warning("The ablation leaves the CE unchanged (%.6g): loss recovered is NaN", ce_clean)
        return float("nan")
    return (ce_ablated - ce_sae) / (ce_ablated - ce_clean) + 0.0  # + 0.0: no -0.0


def counted_positions(tokens: Tensor, include_bos: bool) -> Tensor:
    """Bool [T]: the positions scored (all but the last, which has no next token; BOS only with
    ``include_bos``). Empty token sets and sequences too short to score anything raise."""
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(
            f"No sequences to evaluate (tokens of shape {tuple(tokens.shape)}): give a text "
            "source with at least one document and n_seqs >= 1."
        )
    t = tokens.shape[1]
    mask = torch.ones(t, dtype=torch.bool)
    mask[t - 1] = False  # no next token to score
    if not include_bos:
        mask[0] = False
    if not mask.any():
        raise ValueError(
            f"Sequences of {t} tokens leave no position to score (BOS and the last are not "
            "scored): use seq_len >= 3 (or include_bos with seq_len >= 2)."
        )
    return mask


def hook_batches(
    model: LensModel, tokens: Tensor, hook: str, *, batch_seqs: int, desc: str, progress: bool
) -> Iterator[Tensor]:
    """The activation at ``hook`` [b, T, d] (float32 or wider) of each batch of sequences (only
    the model's prefix up to the hook runs)."""
    for s0 in tqdm(range(0, tokens.shape[0], batch_seqs), desc=desc, disable=not progress):
        yield _wide(model.run_to_hook(tokens[s0 : s0 + batch_seqs].to(model.device), hook))


def counted_activations(
    model: LensModel, tokens: Tensor, hook: str, *, include_bos: bool = False, **batching: Any
) -> Iterator[Tensor]:
    """The activation at ``hook`` [b, n, d] at the counted positions of each batch of sequences
    (``batching``: :func:`hook_batches`' ``batch_seqs``, ``desc``, ``progress``)."""
    m = counted_positions(tokens, include_bos)
    opts = {"batch_seqs": 16, "desc": "Activations", "progress": False} | batching
    for x in hook_batches(model, tokens, hook, **opts):
        yield x[:, m.to(x.device)]


def hook_mean(model: LensModel, tokens: Tensor, hook: str, **options: Any) -> Tensor:
    """Mean activation [d] (float64, CPU) at ``hook`` over the counted positions of ``tokens``
    (``options``: :func:`counted_activations`'): what mean ablation substitutes by default."""
    total, n = torch.zeros(model.spec.d_model, dtype=torch.float64), 0
    for x in counted_activations(model, tokens, hook, desc="Mean activation", **options):
        total += x.double().sum((0, 1)).cpu()
        n += x.shape[0] * x.shape[1]
    return total / n


def load_ablation_mean(path: str | os.PathLike[str], hook: str, frame: str) -> Tensor:
    """The fitted mean of a run (its folder) or of an activation-statistics file, for mean
    ablation at ``hook`` in ``frame``; refuses statistics of another hook or frame."""
    from pathlib import Path

    from perturb_lens.statistics.activations import ActivationStats

    p = Path(path)
    file = p / "stats.safetensors" if p.is_dir() else p
    if not file.exists():
        raise FileNotFoundError(
            f"--mean-from {path}: no {file} (the mean comes from a run folder, which holds "
            "stats.safetensors, or from that file itself): point to one, or leave --mean-from out "
            "to use the mean over the evaluated tokens."
        )
    stats = ActivationStats.load(file)
    for what, have, want in (("hook", stats.hook, hook), ("frame", stats.frame, frame)):
        if have and have != want:
            raise ValueError(
                f"The statistics in {path} were fitted at {what} {have!r}, not {want!r}: give a "
                f"run of the SAE's hook and frame, or leave the mean out to use the data's."
            )
    return stats.mean


def substituted_scores(
    model: LensModel, clean: CleanRun, logits_c: Tensor, x_new: Tensor, counted: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-sequence sums [B] (float64, CPU) over the counted positions of the CE and of
    ``KL(p_clean || p_new)`` with ``x_new`` [B, T, d] in place of the activation at the clean
    run's hook (continued from the hook)."""
    final, _ = model.continue_all(clean, x_new.unsqueeze(1).to(model.dtype))
    logits = model.unembed(final[:, 0])
    ce = token_ce(logits, clean.tokens)[:, counted[:-1]].double().sum(-1).cpu()
    return ce, token_kl(logits_c, logits)[:, counted].double().sum(-1).cpu()


def alive_latents(
    sae: SAE, model: LensModel, tokens: Tensor, *, batch_seqs: int = 16, progress: bool = False
) -> Tensor:
    """Bool [d_sae]: latents active (``f > ALIVE_EPS``) somewhere in ``tokens`` (all positions)."""
    alive = torch.zeros(sae.d_sae, dtype=torch.bool)
    batches = hook_batches(
        model, tokens, sae.hook, batch_seqs=batch_seqs, desc="Alive latents", progress=progress
    )
    with torch.no_grad():
        for x in batches:
            f = sae.encode(x.reshape(-1, x.shape[-1]))
            alive |= (f > ALIVE_EPS).any(0).cpu()
    return alive


class _Acc:
    """Running sums for one SAE."""

    def __init__(self, d_sae: int, d: int) -> None:
        self.n = 0
        self.l0 = self.sq = self.rel = self.kl = 0.0
        self.ce: list[Tensor] = []  # per-sequence CE sums with SAE(x), batch by batch
        self.alive = torch.zeros(d_sae, dtype=torch.bool)
        self.sum_x = torch.zeros(d, dtype=torch.float64)
        self.sum_xx = 0.0

    def add(
        self, sae: SAE, model: LensModel, clean: Any, logits_c: Tensor, x: Tensor, m: Tensor
    ) -> None:
        """Add one batch: ``x`` [B, T, d] (widened) at the SAE's hook, ``m`` [T] the counted
        positions."""
        d = x.shape[-1]
        f, x_hat = sae.encode_decode(x)
        x_sub = torch.where(m[None, :, None], x_hat, x)
        ce, kl = substituted_scores(model, clean, logits_c, x_sub, m)
        xm, fm, err = x[:, m], f[:, m], (x_hat - x)[:, m]
        self.n += fm.shape[0] * fm.shape[1]
        self.l0 += float((fm > 0).sum())
        self.alive |= (fm > ALIVE_EPS).reshape(-1, sae.d_sae).any(0).cpu()
        self.sq += float(err.double().pow(2).sum())
        self.rel += float((err.norm(dim=-1) / xm.norm(dim=-1).clamp_min(1e-12)).sum())
        self.sum_x += xm.double().reshape(-1, d).sum(0).cpu()
        self.sum_xx += float(xm.double().pow(2).sum())
        self.ce.append(ce)
        self.kl += float(kl.sum())

    def result(
        self, name: str, sae: SAE, ce_c: float, ablated: dict[str, Tensor], **extra: Any
    ) -> SAEStats:
        """The SAE's statistics from the sums (``ce_c``: clean CE per token; ``ablated``: the
        per-sequence CE sums with the hook zero- and mean-ablated)."""
        d = self.sum_x.shape[0]
        total_var = self.sum_xx - float(self.sum_x.pow(2).sum()) / self.n
        ce_s = float(torch.cat(self.ce).sum()) / self.n
        ce_zero, ce_mean = (float(ablated[k].sum()) / self.n for k in ("zero", "mean"))
        return SAEStats(
            name=name,
            hook=sae.hook,
            d_sae=sae.d_sae,
            n_tokens=self.n,
            l0=self.l0 / self.n,
            alive=int(self.alive.sum()),
            dead=int((~self.alive).sum()),
            mse=self.sq / (self.n * d),
            rel_error=self.rel / self.n,
            explained_variance=1.0 - self.sq / total_var,
            ce_clean=ce_c,
            ce_sae=ce_s,
            ce_increase=ce_s - ce_c,
            kl=self.kl / self.n,
            ce_zero=ce_zero,
            ce_mean=ce_mean,
            loss_recovered_zero=loss_recovered(ce_zero, ce_s, ce_c),
            loss_recovered_mean=loss_recovered(ce_mean, ce_s, ce_c),
            **extra,
        )


def sae_stats(
    saes: SAE | Mapping[str, SAE],
    model: LensModel,
    tokens: Tensor,
    *,
    batch_seqs: int = 8,
    include_bos: bool = False,
    means: Mapping[str, Tensor] | None = None,
    progress: bool = True,
) -> list[SAEStats]:
    """Statistics of one SAE or several (same hook or not; each clean pass is shared).

    ``means``: the activation mean per hook for mean ablation (e.g. a run's fitted mean, see
    :func:`load_ablation_mean`); hooks it lacks use :func:`hook_mean` over ``tokens``."""
    named = {"sae": saes} if isinstance(saes, SAE) else dict(saes)
    if not named:
        raise ValueError("No SAE to evaluate: give at least one.")
    d = model.spec.d_model
    for sae in named.values():
        sae.check_compatible(sae.hook, d, model.frame)
        model.parse_hook(sae.hook)
    mask = counted_positions(tokens, include_bos)
    accs = {k: _Acc(s.d_sae, d) for k, s in named.items()}
    hooks = sorted({s.hook for s in named.values()}, key=model.parse_hook)
    given = dict(means or {})
    mu = {
        h: given[h].double().cpu()
        if h in given
        else hook_mean(model, tokens, h, include_bos=include_bos, progress=progress)
        for h in hooks
    }
    ablated: dict[str, dict[str, list[Tensor]]] = {h: {"zero": [], "mean": []} for h in hooks}
    ce_clean: list[Tensor] = []  # per-sequence sums
    n_tok = 0
    m = mask.to(model.device)
    m3 = m[None, :, None]
    with torch.no_grad():
        for s0 in tqdm(
            range(0, tokens.shape[0], batch_seqs), desc="SAE statistics", disable=not progress
        ):
            tok = tokens[s0 : s0 + batch_seqs].to(model.device)
            for hook in hooks:
                clean = model.run_clean(tok, hook)
                logits_c = model.unembed(clean.final)
                if hook == hooks[0]:
                    ce_clean.append(token_ce(logits_c, tok)[:, m[:-1]].double().sum(-1).cpu())
                    n_tok += tok.shape[0] * int(m.sum())
                x = _wide(clean.x)
                for kind, fill in (("zero", torch.zeros(d)), ("mean", mu[hook])):
                    x_abl = torch.where(m3, fill.to(x), x)
                    ablated[hook][kind].append(
                        substituted_scores(model, clean, logits_c, x_abl, m)[0]
                    )
                for name, sae in named.items():
                    if sae.hook == hook:
                        accs[name].add(sae, model, clean, logits_c, x, m)
    clean_seq = torch.cat(ce_clean)
    ce_c = float(clean_seq.sum()) / n_tok
    ablated_seq = {h: {k: torch.cat(v) for k, v in kinds.items()} for h, kinds in ablated.items()}
    intervals = _loss_recovered_intervals(
        {k: torch.cat(a.ce) for k, a in accs.items()},
        {k: ablated_seq[s.hook] for k, s in named.items()},
        clean_seq,
    )
    return [
        accs[name].result(
            name,
            sae,
            ce_c,
            ablated_seq[sae.hook],
            mean_source="given" if sae.hook in given else "data",
            n_seqs=int(clean_seq.shape[0]),
            **intervals[name],
        )
        for name, sae in named.items()
    ]


def _loss_recovered_intervals(
    sae_ce: Mapping[str, Tensor],
    ablated_ce: Mapping[str, Mapping[str, Tensor]],
    clean_ce: Tensor,
    ci: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Per SAE, the ``ci`` interval of loss recovered (zero and mean ablation) from resampling
    sequences: loss recovered is a ratio of means of per-sequence sums, ``sum(ce_abl - ce_sae) /
    sum(ce_abl - ce_clean)``, so :func:`ratio_intervals` (the verdicts' bootstrap) gives it; one
    column per (SAE, ablation), all sharing the draws."""
    names = list(sae_ce)
    if clean_ce.shape[0] < 2:
        return {k: {} for k in names}
    cols = [(k, kind) for k in names for kind in ("zero", "mean")]
    num = np.stack([(ablated_ce[k][kind] - sae_ce[k]).numpy() for k, kind in cols], axis=1)
    den = np.stack([(ablated_ce[k][kind] - clean_ce).numpy() for k, kind in cols], axis=1)
    ones = np.ones_like(num)
    frame = ratio_intervals((num, ones), (den, ones), ci=ci, n_boot=n_boot, seed=seed)
    out: dict[str, dict[str, float]] = {k: {} for k in names}
    for (k, kind), low, high in zip(cols, frame["ci_low"], frame["ci_high"], strict=True):
        out[k][f"loss_recovered_{kind}_low"] = float(low)
        out[k][f"loss_recovered_{kind}_high"] = float(high)
    return out
