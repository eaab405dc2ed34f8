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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from perturb_lens.common.registry import registry

if TYPE_CHECKING:  # torch loads with the first metric computed, not with the registry
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


NONFINITE = "nonfinite"  # the column flagging rows with a NaN/inf metric (nonfinite=record)

OutputMetricFn = Callable[[Distributions], "Tensor"]
DownstreamMetricFn = Callable[["Tensor", "Tensor"], "Tensor"]


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


METRICS = registry("metric", "register yours with perturb_lens.register_metric")


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
        info = MetricInfo(name, fn, label, unit, needs_logits, threshold, description)
        METRICS.register(name, info)
        return fn

    return decorate


def get_metric(name: str) -> MetricInfo:
    """The registered metric ``name``; the error lists the known ones."""
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; choose from {METRICS.names()}.")
    return METRICS.get(name)


def metric_names(*, needs_logits: bool | None = None) -> tuple[str, ...]:
    """Registered metric names in registration order (optionally only output / downstream)."""
    return tuple(
        m.name for m in METRICS.values() if needs_logits is None or m.needs_logits == needs_logits
    )


def check_metrics(names: Sequence[str]) -> list[str]:
    """Validate metric names; the error lists the known ones."""
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; choose from {METRICS.names()}.")
    if not names:
        raise ValueError(f"No metric requested; choose from {METRICS.names()}.")
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
    import torch

    log_m = torch.log(0.5 * (d.p_clean + d.p)).clamp_min(torch.finfo(torch.float32).min)
    clean_part = (d.p_clean * (d.clean_logp - log_m)).sum(-1)
    div = 0.5 * clean_part + 0.5 * (d.p * (d.logp - log_m)).sum(-1)
    return div.clamp_min(0.0).sqrt()


@register_metric("dce", label="Δ cross-entropy", unit="nats", needs_logits=True, threshold=0.1)
def dce(d: Distributions) -> Tensor:
    import torch

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
    import torch

    return torch.cosine_similarity(clean, pert, dim=-1)


def at_least_float32(x: Tensor, like: torch.dtype | None = None) -> Tensor:
    """``x`` in float32, or in float64 when ``like`` (default: its own dtype) is float64: metrics
    of a float64 model stay float64 (exactness tests), half precision is widened."""
    import torch

    return x.to(torch.promote_types(like or x.dtype, torch.float32))


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
    import torch

    logp = torch.log_softmax(at_least_float32(pert_logits), dim=-1)
    d = Distributions(clean_logp, logp, next_tokens)
    return {m: METRICS.get(m).fn(d) for m in want}


def downstream_metrics(clean: Tensor, pert: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """The downstream metrics among ``names`` between activations [..., d] (in float32, or
    float64)."""
    clean, pert = at_least_float32(clean, pert.dtype), at_least_float32(pert)
    wanted = [m for m in metric_names(needs_logits=False) if m in names]
    return {m: METRICS.get(m).fn(clean, pert) for m in wanted}
