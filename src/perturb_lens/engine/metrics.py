"""Output-change metrics between a clean and a perturbed pass, per row, and their registry.

Every metric is registered once (:func:`register_metric`) with its function, axis label, unit,
default threshold and whether it needs the next-token distributions (logits) or compares
activations at a later hook. Built-ins (column names as stored in result shards):

- ``kl``: KL(p_clean || p_perturbed) in nats;
- ``js``: Jensen-Shannon *distance* (square root of the JS divergence in nats);
- ``dce``: change of the cross-entropy on the true next token (NaN where there is none);
- ``top1``: whether the arg-max token *changed* (its mean is the fraction of changed tokens);
- ``l2``: ||h_clean - h_pert||_2 and ``cos``: cosine similarity, at the downstream hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


@dataclass
class Distributions:
    """The clean and perturbed next-token distributions an output metric compares.

    ``clean_logp`` (float32 log-probs) broadcasts against ``logp`` [..., V]; ``next_tokens`` [...]
    holds the true next token (-1 = none)."""

    clean_logp: Tensor
    logp: Tensor
    next_tokens: Tensor | None = None

    @cached_property
    def p_clean(self) -> Tensor:
        return self.clean_logp.exp()

    @cached_property
    def p(self) -> Tensor:
        return self.logp.exp()


OutputMetricFn = Callable[[Distributions], Tensor]
DownstreamMetricFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class MetricInfo:
    """A registered metric: the stored column ``name`` and how to compute, label and read it."""

    name: str
    fn: Callable[..., Tensor]  # Distributions -> [...] (needs_logits), else (clean, pert) -> [...]
    label: str  # axis label; ``{read}`` stands for the downstream hook
    unit: str  # "" for none
    needs_logits: bool  # compares next-token distributions (else activations at the read hook)
    threshold: float | None = None  # "the output responds" once the metric exceeds this
    description: str = ""

    def axis_label(self, read: str = "a later layer", stat: str = "mean") -> str:
        """``stat``, the label and the unit, e.g. ``mean KL(p_clean || p_pert) [nats]``."""
        text = self.label.format(read=read) + (f" [{self.unit}]" if self.unit else "")
        return f"{stat} {text}".strip()


_METRICS: dict[str, MetricInfo] = {}


def register_metric(
    name: str,
    *,
    label: str,
    needs_logits: bool,
    unit: str = "",
    threshold: float | None = None,
    description: str = "",
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator: register ``fn`` as metric ``name`` (a result column; a new name must not clash
    with the row keys ``seq``, ``pos``, ``direction``, ``length``, ``size``)."""

    def decorate(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        _METRICS[name] = MetricInfo(name, fn, label, unit, needs_logits, threshold, description)
        return fn

    return decorate


def get_metric(name: str) -> MetricInfo:
    """The registered metric ``name``; the error lists the known ones."""
    if name not in _METRICS:
        raise ValueError(f"Unknown metric {name!r}; choose from {list(_METRICS)}.")
    return _METRICS[name]


def metric_names(*, needs_logits: bool | None = None) -> tuple[str, ...]:
    """Registered metric names in registration order (optionally only output / downstream)."""
    return tuple(
        m.name for m in _METRICS.values() if needs_logits is None or m.needs_logits == needs_logits
    )


def check_metrics(names: Sequence[str]) -> list[str]:
    """Validate metric names; the error lists the known ones."""
    unknown = [m for m in names if m not in _METRICS]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; choose from {list(_METRICS)}.")
    if not names:
        raise ValueError(f"No metric requested; choose from {list(_METRICS)}.")
    return list(names)


@register_metric("kl", label="KL(p_clean || p_pert)", unit="nats", needs_logits=True, threshold=0.1)
def kl(d: Distributions) -> Tensor:
    return (d.p_clean * (d.clean_logp - d.logp)).sum(-1).clamp_min(0.0)


@register_metric(
    "js",
    label="JS distance",
    unit="sqrt nats",
    needs_logits=True,
    threshold=0.01,
    description="Jensen-Shannon distance: the square root of the JS divergence (nats)",
)
def js(d: Distributions) -> Tensor:
    log_m = torch.log(0.5 * (d.p_clean + d.p)).clamp_min(torch.finfo(torch.float32).min)
    clean_part = (d.p_clean * (d.clean_logp - log_m)).sum(-1)
    div = 0.5 * clean_part + 0.5 * (d.p * (d.logp - log_m)).sum(-1)
    return div.clamp_min(0.0).sqrt()


@register_metric("dce", label="Δ cross-entropy", unit="nats", needs_logits=True, threshold=0.1)
def dce(d: Distributions) -> Tensor:
    if d.next_tokens is None:
        raise ValueError("dce needs the true next tokens.")
    idx = d.next_tokens.clamp_min(0).unsqueeze(-1)
    shape = torch.broadcast_shapes(d.clean_logp.shape[:-1], d.logp.shape[:-1])
    idx = idx.expand(*shape, 1)
    ce_clean = -torch.gather(d.clean_logp.expand(*shape, -1), -1, idx).squeeze(-1)
    ce_pert = -torch.gather(d.logp, -1, idx).squeeze(-1)
    return torch.where(d.next_tokens.expand(shape) >= 0, ce_pert - ce_clean, torch.nan)


@register_metric(
    "top1",
    label="top-1 token changed",
    unit="0/1",
    needs_logits=True,
    description="1 where the arg-max token changed (the mean: fraction of changed tokens)",
)
def top1(d: Distributions) -> Tensor:
    return d.clean_logp.argmax(-1) != d.logp.argmax(-1)


@register_metric("l2", label="L2 distance at {read}", needs_logits=False)
def l2(clean: Tensor, pert: Tensor) -> Tensor:
    return (clean - pert).norm(dim=-1)


@register_metric("cos", label="cosine similarity at {read}", needs_logits=False)
def cos(clean: Tensor, pert: Tensor) -> Tensor:
    return torch.cosine_similarity(clean, pert, dim=-1)


# The built-ins by kind (kept for callers that take the fixed lists; a registered metric joins
# :func:`metric_names`, not these).
OUTPUT_METRICS = metric_names(needs_logits=True)
DOWNSTREAM_METRICS = metric_names(needs_logits=False)
METRICS = OUTPUT_METRICS + DOWNSTREAM_METRICS


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
    """The output metrics among ``names`` (registration order). ``clean_logp`` (float32 log-probs)
    broadcasts against ``pert_logits`` [..., V]; ``next_tokens`` [...] (-1 = none) for ``dce``."""
    want = [m for m in metric_names(needs_logits=True) if m in names]
    if not want:
        return {}
    logp = torch.log_softmax(at_least_float32(pert_logits), dim=-1)
    d = Distributions(clean_logp, logp, next_tokens)
    return {m: _METRICS[m].fn(d) for m in want}


def downstream_metrics(clean: Tensor, pert: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """The downstream metrics among ``names`` between activations [..., d] (in float32, or
    float64)."""
    clean, pert = at_least_float32(clean, pert.dtype), at_least_float32(pert)
    return {m: _METRICS[m].fn(clean, pert) for m in metric_names(needs_logits=False) if m in names}
