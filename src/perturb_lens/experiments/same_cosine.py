"""Same-cosine perturbations (the LessWrong replication thread): replace each activation ``x`` by a
target ``y`` with a chosen cosine to ``x`` and a chosen norm ratio ``||y|| / ||x||``, and measure
the output against the cosine grid. SAE(x) is a point of the same plane: with an SAE at the hook,
each token's own ``(cos(SAE(x), x), metric of SAE(x))`` is recorded too, so the figures show
whether SAE(x) is worse than random perturbations of the same cosine.

The run's ``directions`` give the random part of ``y`` (their vector's part orthogonal to ``x``):
isotropic, cov-random, real, any registered generator. Rows: one per token x direction x cosine,
``length`` = the grid cosine (so the summaries and figures group by it as by a length), ``cosine``
= the cosine of the row's target, ``norm_ratio`` and ``size`` = ``||y - x||``. SAE rows (direction
``SAE(x)``) carry the token's own cosine and ratio, and as ``length`` the nearest grid cosine: their
means per ``length`` are the binned means.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from perturb_lens.config.schema import SAE_LABEL, ExperimentConfig
from perturb_lens.directions.base import same_cosine_target
from perturb_lens.engine.shard import ShardContext, shard_clean, shard_directions
from perturb_lens.engine.sweep import sweep
from perturb_lens.models.base import CleanRun

SAE_RATIO = "sae"


class SameCosineOptions(BaseModel):
    """The ``same_cosine`` section: the cosine grid and the norm ratio of the targets."""

    model_config = ConfigDict(extra="forbid")
    cosines: list[float] = Field(
        default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0],
        min_length=1,
        description="cos(y, x) of the targets, each in [-1, 1]",
    )
    norm_ratio: float | Literal["sae"] = Field(
        0.9, description="||y|| / ||x|| (>= 0), or 'sae': the SAE's own ratio per token"
    )
    sae_points: bool = Field(True, description="with an SAE at the hook, record SAE(x) per token")

    @field_validator("cosines")
    @classmethod
    def _check_cosines(cls, v: list[float]) -> list[float]:
        bad = [c for c in v if not -1.0 <= c <= 1.0]
        if bad:
            raise ValueError(f"cosines must lie in [-1, 1]; got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"cosines must be distinct; got {v}")
        return sorted(v)

    @field_validator("norm_ratio")
    @classmethod
    def _check_ratio(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and not (v >= 0 and np.isfinite(v)):
            raise ValueError(f"norm_ratio must be a finite number >= 0 or 'sae'; got {v}")
        return v


def norm_ratio(x: Tensor, x_sae: Tensor) -> Tensor:
    """``||SAE(x)|| / ||x||`` per row, float64."""
    return x_sae.double().norm(dim=-1) / x.double().norm(dim=-1)


def cosine(x: Tensor, y: Tensor) -> Tensor:
    """``cos(x, y)`` per row, float64; 0 where ``y`` is zero (an SAE output of zero is no
    direction: the ablation, which every cosine reaches at ratio 0)."""
    x, y = x.double(), y.double()
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(torch.finfo(x.dtype).tiny)


def nearest(grid: list[float], values: np.ndarray) -> np.ndarray:
    """The grid value nearest to each value (the bin of an SAE point)."""
    g = np.asarray(grid, dtype=np.float64)
    return g[np.abs(values[:, None] - g[None, :]).argmin(axis=1)]


def _at_rows(values: Tensor, df: pd.DataFrame, seq_offset: int) -> np.ndarray:
    """A per-token value [B, T] at each row's (seq, pos)."""
    v = values.cpu().numpy()
    return v[df["seq"].to_numpy() - seq_offset, df["pos"].to_numpy().astype(np.int64)]


def _targets(
    ctx: ShardContext, shard_id: str, clean: CleanRun, x_sae: Tensor | None
) -> list[tuple[str, float | None, Tensor, Tensor]]:
    """``(label, grid cosine or None for SAE(x), y [B, T, d] float64, ratio [B, T])`` of every
    replacement; positions before the first replaced one keep ``x``.

    BOS (position 0) is replaced only with ``include_bos: true``: a target relative to BOS's norm
    (at SmolLM2's layer 15 ~25,000 against ~160 elsewhere) moves the attention sink by thousands
    and, under the all-positions scope, changes every later position's output far more than its
    own perturbation does (KL 2.1 instead of 0.21 at cos 0.95 there). SAE(x) also keeps BOS when
    the SAE was trained without it (``skip_bos``), as the SAE directions do."""
    opts: SameCosineOptions = ctx.config.same_cosine
    x = clean.x.double()
    b, t, d = x.shape
    first = ctx.plan.first_position(t)
    if first == 0 and not ctx.config.include_bos:
        first = 1
    if opts.norm_ratio == SAE_RATIO:
        ratio = norm_ratio(x, x_sae)
    else:
        ratio = torch.full((b, t), float(opts.norm_ratio), dtype=torch.float64, device=x.device)
    out = []
    for label, noise in shard_directions(ctx, shard_id, clean.x).items():
        for c in opts.cosines:
            y = x.clone()
            y[:, first:] = same_cosine_target(
                x[:, first:].reshape(-1, d),
                c,
                ratio[:, first:].reshape(-1),
                noise=noise[:, first:].reshape(-1, d),
            ).reshape(b, t - first, d)
            out.append((label, c, y, ratio))
    if x_sae is not None and opts.sae_points:
        y = x.clone()
        keep = max(first, 1 if ctx.sae is not None and ctx.sae.cfg.skip_bos else 0)
        y[:, keep:] = x_sae[:, keep:]
        out.append((SAE_LABEL, None, y, norm_ratio(x, x_sae)))
    return out


def same_cosine_shard(ctx: ShardContext, shard_id: str) -> pd.DataFrame:
    """Rows of one shard: every direction x grid cosine, then the SAE points (one sweep at
    length 1 along ``y - x`` per replacement, sharing the clean pass)."""
    opts: SameCosineOptions = ctx.config.same_cosine
    if opts.norm_ratio == SAE_RATIO and ctx.sae is None:
        raise ValueError(
            "same_cosine.norm_ratio: sae needs an SAE at the hook: set sae=... (a trained SAE "
            "folder or release:sae_id), or give the ratio as a number (e.g. 0.9)."
        )
    offset = ctx.shard_slice(shard_id).start
    clean = shard_clean(ctx, shard_id)
    x = clean.x.double()
    x_sae = None
    if ctx.sae is not None:
        with torch.no_grad():
            x_sae = ctx.sae(clean.x.to(ctx.sae.W_enc.dtype)).double()
    targets = _targets(ctx, shard_id, clean, x_sae)
    steps = {str(i): y - x for i, (_, _, y, _) in enumerate(targets)}
    rows = sweep(ctx.model, clean, steps, replace(ctx.plan, lengths=[1.0]), seq_offset=offset)
    frames = []
    for key, df in rows.groupby("direction", observed=True, sort=False):
        label, c, _, ratio = targets[int(key)]
        df = df.assign(direction=label, size=_at_rows(steps[key].norm(dim=-1), df, offset))
        own = _at_rows(cosine(x, x_sae), df, offset) if c is None else np.full(len(df), c)
        df["length"] = nearest(opts.cosines, own) if c is None else c
        df["cosine"] = own
        df["norm_ratio"] = _at_rows(ratio, df, offset)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    labels = list(dict.fromkeys(label for label, *_ in targets))
    out["direction"] = pd.Categorical(out["direction"], categories=labels)
    return out.astype({"cosine": np.float64, "norm_ratio": np.float32, "size": np.float32})


def same_cosine_tables(rows: pd.DataFrame, cfg: ExperimentConfig) -> dict[str, pd.DataFrame]:
    """Mean of the first metric per direction at every grid cosine (SAE(x): per nearest grid
    cosine, with the number of tokens in each bin)."""
    metric = cfg.metrics[0]
    means = rows.groupby(["direction", "length"], observed=True)[metric].mean().unstack("length")
    means.columns = [f"cos={c:g}" for c in means.columns]
    out = {f"mean {metric} by cosine to x (SAE(x): binned by its own cosine)": means.reset_index()}
    sae = rows[rows["direction"] == SAE_LABEL]
    if len(sae):
        bins = sae.groupby("length")["cosine"].agg(["count", "mean"]).T
        bins.columns = [f"cos={c:g}" for c in bins.columns]
        bins.index = ["SAE(x) tokens", "SAE(x) mean cos"]
        out["SAE(x) points per cosine bin"] = bins.rename_axis("direction").reset_index()
        out[f"SAE(x) against random targets at its own cosine ({metric})"] = sae_vs_random(
            rows, metric
        )
    return out


def sae_vs_random(
    rows: pd.DataFrame, metric: str = "kl", *, n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Is SAE(x) worse than random targets of the same cosine? Per generator: each token's curve
    of ``metric`` against the grid cosine, interpolated linearly at that token's own
    cos(SAE(x), x), paired with the token's SAE(x) value; ``ratio`` = mean over the tokens of
    SAE(x) / mean of the interpolated random values, with its paired 95 % interval from
    resampling sequences (the verdicts' bootstrap). Tokens whose SAE cosine lies outside the grid
    are left out (``n_tokens`` counts those used). The mean norm ratios of both are given: with a
    fixed ``norm_ratio`` (e.g. 0.9) and SAE(x) near ratio 1 the comparison mixes cosine and norm
    (near cosine 1 the norm change dominates); ``norm_ratio: sae`` compares at equal norm."""
    from perturb_lens.statistics.bootstrap import ratio_intervals

    sae = rows[rows["direction"] == SAE_LABEL].set_index(["seq", "pos"])
    out = []
    for label in [d for d in rows["direction"].cat.categories if d != SAE_LABEL]:
        curves = rows[rows["direction"] == label].pivot_table(
            index=["seq", "pos"], columns="length", values=metric, observed=True
        )
        both = curves.join(sae[["cosine", metric]], how="inner").dropna()
        grid = curves.columns.to_numpy(np.float64)
        inside = both["cosine"].between(grid.min(), grid.max())
        both = both[inside]
        values = both[curves.columns].to_numpy(np.float64)
        cos = both["cosine"].to_numpy(np.float64)
        at = np.array([np.interp(c, grid, v) for c, v in zip(cos, values, strict=True)])
        per_seq = pd.DataFrame(
            {"seq": both.index.get_level_values("seq"), "a": both[metric].to_numpy(), "b": at}
        ).groupby("seq")
        sums, n = per_seq[["a", "b"]].sum(), per_seq.size().to_numpy(np.float64)[:, None]
        res = ratio_intervals(
            (sums[["a"]].to_numpy(), n), (sums[["b"]].to_numpy(), n), n_boot=n_boot, seed=seed
        ).iloc[0]
        out.append(
            {
                "direction": label,
                f"mean {metric} SAE(x)": res["mean_a"],
                f"mean {metric} random, same cos": res["mean_b"],
                "ratio": res["ratio"],
                "ci_low": res["ci_low"],
                "ci_high": res["ci_high"],
                "norm ratio random": float(
                    rows.loc[rows["direction"] == label, "norm_ratio"].mean()
                )
                if "norm_ratio" in rows
                else float("nan"),
                "norm ratio SAE(x)": float(sae["norm_ratio"].mean())
                if "norm_ratio" in sae
                else float("nan"),
                "n_tokens": len(both),
                "n_seqs": int(res["n_seqs"]),
            }
        )
    return pd.DataFrame(out)
