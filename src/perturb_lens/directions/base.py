"""Direction generators: one unit direction per token to perturb, in a registry by name.

A generator takes a :class:`DirectionContext` (the activations ``x`` [N, d] to perturb, fitted
:class:`~perturb_lens.statistics.activations.ActivationStats`, a pool of real non-BOS activations, a
``torch.Generator``) and returns *raw* directions [N, d]; :func:`make_directions` checks them and
normalises each row to unit L2 norm (float32). Every random draw uses ``ctx.generator`` only, so the
same generator state gives the same directions.

The built-ins are the baselines of Lee & Heimersheim. "Difference" directions
contain ``-x`` (they point from ``x`` towards another point); "mixture" directions are differences
of two points independent of ``x``, so they do not.

Register your own generator::

    from perturb_lens.directions.base import DirectionContext, register_direction

    @register_direction("mean-ablation", contains_minus_x=True,
                        description="towards the dataset mean: mu - x")
    def mean_ablation(ctx: DirectionContext) -> Tensor:
        return ctx.stats.mean.to(ctx.x.device) - ctx.x.double()

    make_directions("mean-ablation", ctx)  # [N, d] unit rows

or pass fixed directions with ``make_directions(explicit_directions(t), ctx)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from perturb_lens.common.registry import registry
from perturb_lens.statistics.activations import ActivationStats, sample_gaussian

ZERO_NORM_EPS = 1e-12  # rows shorter than this (in float64) count as zero
PARALLEL_TOL = 1e-9  # a vector whose part orthogonal to x is this small (relative) is parallel


@dataclass
class DirectionContext:
    """What a direction generator may use. ``x`` is in the experiment's frame already."""

    x: Tensor  # [N, d] activations of the tokens to perturb
    stats: ActivationStats | None
    pool: Tensor | None  # [M, d] real (non-BOS) activations to draw "other real activations" from
    generator: torch.Generator
    options: dict[str, Any] = field(default_factory=dict)  # options of this direction
    sae: Any = None  # an SAE object, for the SAE directions
    sequences: Tensor | None = None  # [B, T, d] whole sequences the rows of x come from
    seq_of_row: Tensor | None = None  # [N] index into sequences of each row of x
    pos_of_row: Tensor | None = None  # [N] position in its sequence of each row of x


DirectionFn = Callable[[DirectionContext], Tensor]


@dataclass(frozen=True)
class DirectionInfo:
    """A registered direction: whether it contains ``-x`` (None: depends), what it is, options."""

    name: str
    contains_minus_x: bool | None
    description: str
    options: Mapping[str, str] = field(default_factory=dict)  # option -> what it does
    allow_zero: bool = False  # zero rows mean "no perturbation" instead of an error


class UnknownDirectionError(KeyError):
    """A direction name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


DIRECTIONS = registry("direction", "register yours with perturb_lens.register_direction")
"""name -> ``(DirectionInfo, generator)``; the built-ins beyond this module's (the SAE and
synthetic ones) register at the first lookup (:mod:`perturb_lens.builtins`)."""


def register_direction(
    name: str,
    *,
    contains_minus_x: bool | None,
    description: str,
    options: Mapping[str, str] | None = None,
    allow_zero: bool = False,
    overwrite: bool = False,
) -> Callable[[DirectionFn], DirectionFn]:
    """Decorator: register ``fn(ctx) -> raw directions [N, d]`` under ``name``.

    ``options`` documents the keys of ``ctx.options`` the generator reads (others are rejected).
    ``allow_zero``: rows of zero norm come back as zero vectors (no perturbation) instead of
    raising; ablation uses it, since ``x = 0`` has nothing to ablate.
    """

    def decorator(fn: DirectionFn) -> DirectionFn:
        if DIRECTIONS.registered(name) and not overwrite:
            raise ValueError(
                f"Direction {name!r} is already registered; pass overwrite=True to replace it."
            )
        info = DirectionInfo(name, contains_minus_x, description, dict(options or {}), allow_zero)
        DIRECTIONS.register(name, (info, fn))
        return fn

    return decorator


def _lookup(name: str) -> tuple[DirectionInfo, DirectionFn]:
    found = DIRECTIONS.find(name)
    if found is None:
        raise UnknownDirectionError(
            f"Unknown direction {name!r}; registered directions: "
            f"{', '.join(sorted(DIRECTIONS.names()))}. "
            "Register your own with perturb_lens.register_direction."
        )
    return found


def get_direction(name: str) -> DirectionFn:
    """The registered generator (returns raw, unnormalised directions)."""
    return _lookup(name)[1]


def list_directions() -> list[DirectionInfo]:
    """Every registered direction, sorted by name."""
    return [info for _, (info, _fn) in sorted(DIRECTIONS.items())]


def normalize_directions(raw: Tensor, *, name: str, allow_zero: bool = False) -> Tensor:
    """Unit rows [N, d] float32 (normalised in float64); zero rows raise unless ``allow_zero``."""
    if not bool(torch.isfinite(raw).all()):
        raise ValueError(f"Direction {name!r} produced non-finite values (NaN/inf).")
    r = raw.double()
    norms = r.norm(dim=-1, keepdim=True)
    zero = norms.squeeze(-1) <= ZERO_NORM_EPS
    if bool(zero.any()) and not allow_zero:
        rows = zero.nonzero().flatten()
        raise ValueError(
            f"Direction {name!r} has {len(rows)} row(s) of zero norm (first: row {int(rows[0])}), "
            "so no unit direction exists there; drop those tokens or choose another direction."
        )
    return (r / norms.clamp_min(ZERO_NORM_EPS)).float()


def _raw_directions(
    direction: str | DirectionFn, ctx: DirectionContext
) -> tuple[Tensor, str, bool]:
    """Run a generator (checking its options and output shape): raw rows, name, allow_zero."""
    if isinstance(direction, str):
        info, fn = _lookup(direction)
        unknown = set(ctx.options) - set(info.options)
        if unknown:
            known = ", ".join(sorted(info.options)) or "none"
            raise ValueError(
                f"Unknown option(s) {sorted(unknown)} for direction {direction!r}; "
                f"it takes: {known} (and, for every direction: scale, label)."
            )
        name, allow_zero = direction, info.allow_zero
    else:
        fn, name, allow_zero = direction, getattr(direction, "__name__", "custom"), False
    if ctx.x.ndim != 2:
        raise ValueError(f"ctx.x must be [N, d] (flatten batch and positions); got {ctx.x.shape}")
    raw = fn(ctx)
    if tuple(raw.shape) != tuple(ctx.x.shape):
        raise ValueError(
            f"Direction {name!r} returned shape {tuple(raw.shape)}; expected {tuple(ctx.x.shape)} "
            "(one direction per row of ctx.x)."
        )
    return raw, name, allow_zero


def make_directions(direction: str | DirectionFn, ctx: DirectionContext) -> Tensor:
    """Unit directions [N, d] float32 for the tokens ``ctx.x`` from a registered name or a fn."""
    raw, name, allow_zero = _raw_directions(direction, ctx)
    return normalize_directions(raw, name=name, allow_zero=allow_zero)


ScaleFn = Callable[[DirectionContext], Tensor]
SCALES = registry("scale", "register one with perturb_lens.register_scale")
"""name -> ``(description, fn)`` of the registered scales beyond the built-in two."""
BUILTIN_SCALES = {
    "unit": "unit directions: length alpha moves x by alpha (the default)",
    "raw": "the generator's own vector (e.g. y - x): length t moves x to x + t (y - x)",
}


def register_scale(
    name: str, *, description: str, overwrite: bool = False
) -> Callable[[ScaleFn], ScaleFn]:
    """Decorator: register ``fn(ctx) -> per-token lengths [N]`` as a direction ``scale``.

    A scaled direction is the unit direction times that length, so the length grid becomes
    relative to it (e.g. ``sae-error``: alpha = 1 moves x by ||SAE(x) - x||).
    """

    def decorator(fn: ScaleFn) -> ScaleFn:
        if (SCALES.registered(name) or name in BUILTIN_SCALES) and not overwrite:
            raise ValueError(f"Scale {name!r} is already registered; pass overwrite=True.")
        SCALES.register(name, (description, fn))
        return fn

    return decorator


def list_scales() -> dict[str, str]:
    """Every direction scale by name, with what it does."""
    return {**BUILTIN_SCALES, **{k: v[0] for k, v in sorted(SCALES.items())}}


def check_scale(scale: str) -> None:
    """Raise (listing the known scales) if ``scale`` is not one."""
    if scale not in BUILTIN_SCALES and scale not in SCALES:
        raise ValueError(
            f"Unknown direction scale {scale!r}; known: {', '.join(list_scales())}. "
            "Register one with perturb_lens.register_scale."
        )


def scaled_directions(
    direction: str | DirectionFn, ctx: DirectionContext, scale: str = "unit"
) -> Tensor:
    """Directions [N, d] float32 at the given ``scale`` (see :func:`list_scales`)."""
    check_scale(scale)
    if scale == "unit":
        return make_directions(direction, ctx)
    if scale == "raw":
        raw, name, _ = _raw_directions(direction, ctx)
        if not bool(torch.isfinite(raw).all()):
            raise ValueError(f"Direction {name!r} produced non-finite values (NaN/inf).")
        return raw.float()
    lengths = SCALES.get(scale)[1](ctx).reshape(-1, 1)
    if lengths.shape[0] != ctx.x.shape[0] or not bool(torch.isfinite(lengths).all()):
        raise ValueError(f"Scale {scale!r} must give one finite length per row of ctx.x.")
    return (make_directions(direction, ctx).double() * lengths.double()).float()


def explicit_directions(t: Tensor) -> DirectionFn:
    """A generator returning fixed directions: [d] (the same for every token) or [N, d].

    Under the default ``unit`` scale they are normalised per row; under ``raw`` they are used
    as given (e.g. ``y - x`` towards explicit targets)."""
    if t.ndim not in (1, 2):
        raise ValueError(f"Explicit directions must be [d] or [N, d]; got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("Explicit directions contain non-finite values (NaN/inf).")
    fixed = t.detach().float()  # normalised (or kept raw) by the caller's scale

    def explicit(ctx: DirectionContext) -> Tensor:
        n, d = ctx.x.shape
        if fixed.shape[-1] != d or (fixed.ndim == 2 and fixed.shape[0] != n):
            raise ValueError(
                f"Explicit directions of shape {tuple(fixed.shape)} do not fit activations "
                f"[{n}, {d}]: pass [{d}] or [{n}, {d}]."
            )
        return fixed.to(ctx.x.device).expand(n, d)

    return explicit


def same_cosine_target(
    x: Tensor,
    cos: float | Tensor,
    norm_ratio: float | Tensor,
    generator: torch.Generator | None = None,
    *,
    noise: Tensor | None = None,
) -> Tensor:
    """A target ``y`` per row of ``x`` ([N, d] or [d]) with ``cos(x, y) = cos`` and
    ``||y|| = norm_ratio * ||x||``; its part orthogonal to ``x`` points along ``noise``'s part
    orthogonal to ``x`` (``noise``: any vectors shaped like ``x``, e.g. a direction generator's;
    None: an isotropic draw from ``generator``).

    ``cos`` and ``norm_ratio`` are scalars or per-row tensors [N]. Computed in float64, returned in
    ``x``'s dtype.
    """
    c = torch.as_tensor(cos, dtype=torch.float64, device=x.device)
    ratio = torch.as_tensor(norm_ratio, dtype=torch.float64, device=x.device)
    if bool((c.abs() > 1).any()) or bool((ratio < 0).any()):
        raise ValueError(f"Need -1 <= cos <= 1 and norm_ratio >= 0; got cos={cos}, {norm_ratio=}")
    c = c.unsqueeze(-1) if c.ndim else c
    ratio = ratio.unsqueeze(-1) if ratio.ndim else ratio
    x64 = x.double()
    x_norm = x64.norm(dim=-1, keepdim=True)
    if bool((x_norm == 0).any()):
        raise ValueError("same_cosine_target: x has a zero row, whose cosine is undefined.")
    n_hat = x64 / x_norm
    if noise is None:
        if generator is None:
            raise ValueError("same_cosine_target needs a generator or the noise vectors.")
        u = _randn(x64.shape, generator, x.device, torch.float64)
    elif noise.shape != x.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}; x has {tuple(x.shape)}")
    else:
        u = noise.to(x.device, torch.float64)
    raw_norm = u.norm(dim=-1, keepdim=True)
    u = u - (u * n_hat).sum(-1, keepdim=True) * n_hat  # orthogonal complement of x
    u_norm = u.norm(dim=-1, keepdim=True)
    # parallel to x up to float64 rounding of the projection (~d * 2^-53 of the raw norm)
    if bool((u_norm <= PARALLEL_TOL * raw_norm).any() or (raw_norm == 0).any()):
        raise ValueError(
            "same_cosine_target: the random part is parallel to x in some row (d_model < 2, or "
            "a generator whose vector is a multiple of x, such as ablation): use another one."
        )
    u = u / u_norm
    y = (c * n_hat + (1 - c**2).clamp_min(0).sqrt() * u) * (ratio * x_norm)
    return y.to(x.dtype)


# ---- helpers for the built-ins -------------------------------------------------------------


def _randn(
    shape: torch.Size | tuple[int, ...],
    g: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """Standard normal drawn on the generator's device, moved to ``device``."""
    return torch.randn(shape, generator=g, device=g.device, dtype=dtype).to(device)


def _randint(high: int, n: int, g: torch.Generator, device: torch.device) -> Tensor:
    return torch.randint(high, (n,), generator=g, device=g.device).to(device)


def _need_stats(ctx: DirectionContext, name: str) -> ActivationStats:
    if ctx.stats is None:
        raise ValueError(
            f"Direction {name!r} needs activation statistics (ctx.stats): fit them on real "
            "activations with perturb_lens.statistics.activations.fit_stats."
        )
    if ctx.stats.d_model != ctx.x.shape[1]:
        raise ValueError(
            f"Stats have d_model {ctx.stats.d_model}; activations have {ctx.x.shape[1]}"
        )
    return ctx.stats


def _need_pool(ctx: DirectionContext, name: str, min_size: int) -> Tensor:
    pool = ctx.pool
    if pool is None or pool.ndim != 2 or pool.shape[0] < min_size:
        got = "none" if pool is None else f"shape {tuple(pool.shape)}"
        raise ValueError(
            f"Direction {name!r} needs a pool of at least {min_size} real activations [M, d] "
            f"(ctx.pool); got {got}."
        )
    if pool.shape[1] != ctx.x.shape[1]:
        raise ValueError(f"Pool has d_model {pool.shape[1]}; activations have {ctx.x.shape[1]}")
    return pool


def _resample_zero_rows(
    draw: Callable[[Tensor], Tensor],
    n: int,
    device: torch.device,
    name: str,
    max_rounds: int = 100,
) -> Tensor:
    """``draw(rows) -> raw [len(rows), d]`` for the given row indices; rows of zero norm (two
    identical activations, e.g. the same first token after BOS in two sequences) are redrawn."""
    out = draw(torch.arange(n, device=device))
    for _ in range(max_rounds):
        zero = (out.double().norm(dim=-1) <= ZERO_NORM_EPS).nonzero().flatten()
        if len(zero) == 0:
            return out
        out[zero] = draw(zero)
    raise ValueError(
        f"Direction {name!r}: after {max_rounds} redraws some rows still join two identical "
        "activations; the pool has too few distinct activations."
    )


# ---- built-ins -----------------------------------------------------------------------------


@register_direction(
    "isotropic", contains_minus_x=False, description="uniform on the sphere: normalised N(0, I)"
)
def isotropic(ctx: DirectionContext) -> Tensor:
    return _randn(ctx.x.shape, ctx.generator, ctx.x.device, torch.float32)


@register_direction(
    "isotropic-difference",
    contains_minus_x=True,
    description="r - x with r = sigma * N(0, I) per coordinate (published sigma: 121 at GPT-2 L6)",
    options={
        "sigma": "'median-norm' (default, published: the median activation norm), "
        "'norm-matched' (median norm / sqrt(d), so ||r|| ~ the median norm), or a float"
    },
)
def isotropic_difference(ctx: DirectionContext) -> Tensor:
    sigma = ctx.options.get("sigma", "median-norm")
    if isinstance(sigma, str):
        if sigma not in ("median-norm", "norm-matched"):
            raise ValueError(
                "isotropic-difference sigma must be 'median-norm', 'norm-matched' or a number; "
                f"got {sigma!r}"
            )
        stats = _need_stats(ctx, f"isotropic-difference (sigma={sigma!r})")
        sigma = stats.median_norm / (math.sqrt(stats.d_model) if sigma == "norm-matched" else 1.0)
    r = float(sigma) * _randn(ctx.x.shape, ctx.generator, ctx.x.device, torch.float32)
    return r - ctx.x.float()


@register_direction(
    "cov-random-difference",
    contains_minus_x=True,
    description="s - x with s ~ N(mu, Sigma + jitter I) fitted on real activations",
)
def cov_random_difference(ctx: DirectionContext) -> Tensor:
    s = sample_gaussian(_need_stats(ctx, "cov-random-difference"), len(ctx.x), ctx.generator)
    return s.to(ctx.x.device) - ctx.x.float()


@register_direction(
    "cov-random-mixture",
    contains_minus_x=False,
    description="s1 - s2 with s1, s2 ~ N(mu, Sigma + jitter I) fitted on real activations",
)
def cov_random_mixture(ctx: DirectionContext) -> Tensor:
    n = len(ctx.x)
    s = sample_gaussian(_need_stats(ctx, "cov-random-mixture"), 2 * n, ctx.generator)
    return (s[:n] - s[n:]).to(ctx.x.device)


@register_direction(
    "real-difference",
    contains_minus_x=True,
    description="x_other - x with x_other drawn uniformly from the pool of real activations",
)
def real_difference(ctx: DirectionContext) -> Tensor:
    pool = _need_pool(ctx, "real-difference", 1)
    x = ctx.x.float()

    def draw(rows: Tensor) -> Tensor:
        other = _randint(len(pool), len(rows), ctx.generator, pool.device)
        return pool[other].to(x.device, torch.float32) - x[rows]

    return _resample_zero_rows(draw, len(x), x.device, "real-difference")


@register_direction(
    "real-mixture",
    contains_minus_x=False,
    description="x_a - x_b with a != b drawn uniformly from the pool of real activations",
)
def real_mixture(ctx: DirectionContext) -> Tensor:
    pool = _need_pool(ctx, "real-mixture", 2)
    m = len(pool)

    def draw(rows: Tensor) -> Tensor:
        a = _randint(m, len(rows), ctx.generator, pool.device)
        b = (a + 1 + _randint(m - 1, len(rows), ctx.generator, pool.device)) % m  # uniform, != a
        return (pool[a].float() - pool[b].float()).to(ctx.x.device)

    return _resample_zero_rows(draw, len(ctx.x), ctx.x.device, "real-mixture")


@register_direction(
    "ablation",
    contains_minus_x=True,
    description="-x (towards the origin); a token with x = 0 gets a zero direction",
    allow_zero=True,
)
def ablation(ctx: DirectionContext) -> Tensor:
    return -ctx.x.float()
