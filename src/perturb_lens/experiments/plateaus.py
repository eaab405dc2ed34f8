"""Activation plateaus (Heimersheim): how long the output stays flat as a base activation is
perturbed by growing random steps, for real, synthetic and cov-random base points.

A base point replaces the last position's activation (``real`` keeps the clean one; any other
base is a registered direction whose raw vector moves ``x`` there, e.g. ``synthetic`` or
``cov-random-difference``). The run's ``directions`` (default: isotropic unit directions, the same
ones for every base) then perturb the base by each length, and every metric is measured against
the base's own output. Rows carry a ``base`` column;
:func:`~perturb_lens.analysis.curve_shape.curve_statistics` gives one row per curve (plateau length,
max-slope step, sharpness).
"""

from __future__ import annotations

import dataclasses

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from perturb_lens.analysis.curve_shape import curve_metric, curve_statistics, statistic_summary
from perturb_lens.config.schema import DirectionConfig, DirectionList, ExperimentConfig
from perturb_lens.engine.shard import ShardContext, shard_clean, shard_directions
from perturb_lens.engine.sweep import SweepPlan, sweep
from perturb_lens.models.base import CleanRun, LensModel

REAL = "real"


class PlateauOptions(BaseModel):
    """The ``plateaus`` section: the base points that random perturbations start from."""

    model_config = ConfigDict(extra="forbid")
    bases: DirectionList = Field(
        default_factory=lambda: [
            DirectionConfig(name=REAL),
            DirectionConfig(name="synthetic", kind="bag"),
            DirectionConfig(name="cov-random-difference", label="cov-random"),
        ],
        description="'real' (the clean activation) or a direction whose raw vector moves x there",
    )


def rebase_last(model: LensModel, clean: CleanRun, x_base: Tensor, plan: SweepPlan) -> CleanRun:
    """``clean`` with the last position's activation replaced by ``x_base`` [B, d] and its output
    (final hidden state, downstream reads) recomputed: a clean run to perturb around ``x_base``.

    Valid for single-row continuation (``continue_at``): earlier positions are unaffected.
    """
    b, t, _ = clean.x.shape
    read = plan.read or model.default_read
    reads = [read] if plan.needs_read else []
    last = torch.full((b, 1), t - 1, dtype=torch.long, device=clean.x.device)
    final, got = model.continue_at(clean, x_base.unsqueeze(1).to(clean.x.dtype), last, reads=reads)

    def put(v: Tensor, new: Tensor) -> Tensor:
        v = v.clone()
        v[:, -1] = new.to(v.dtype)
        return v

    new_reads = dict(clean.reads)
    if reads:
        new_reads[read] = put(clean.reads[read], got[read][:, 0])
    return dataclasses.replace(
        clean, x=put(clean.x, x_base), final=put(clean.final, final[:, 0]), reads=new_reads
    )


def base_points(ctx: ShardContext, shard_id: str, x: Tensor) -> dict[str, Tensor]:
    """Base activations [B, d] at the last position, per base label of ``config.plateaus``."""
    x_last = x[:, -1].float()
    out: dict[str, Tensor] = {}
    for base in ctx.config.plateaus.bases:
        if base.name == REAL:
            out[base.label] = x_last
            continue
        opts = {**base.options, "scale": "raw", "label": f"base/{base.label}"}  # own seed
        raw = DirectionConfig(name=base.name, **opts)
        moved = shard_directions(ctx, shard_id, x, [raw])[raw.label][:, -1]
        out[base.label] = x_last + moved
    return out


def plateau_shard(ctx: ShardContext, shard_id: str) -> pd.DataFrame:
    """Rows of one shard: for every base point, the sweep of ``directions`` x ``lengths`` around
    it, measured against the base's output (column ``base``)."""
    sl = ctx.shard_slice(shard_id)  # the config guarantees scope=last-position
    clean = shard_clean(ctx, shard_id)
    frames = []
    for label, x_base in base_points(ctx, shard_id, clean.x).items():
        rebased = rebase_last(ctx.model, clean, x_base, ctx.plan)
        dirs = shard_directions(ctx, shard_id, rebased.x)
        df = sweep(ctx.model, rebased, dirs, ctx.plan, seq_offset=sl.start)
        df.insert(2, "base", label)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def plateau_tables(rows: pd.DataFrame, cfg: ExperimentConfig) -> dict[str, pd.DataFrame]:
    """Plateau lengths per base point and direction."""
    metric = curve_metric(cfg.metrics)
    stats = curve_statistics(rows, metric)
    return {
        f"plateau length in steps ({metric}, 10% of the end value)": statistic_summary(
            stats, "plateau_length", by=("base", "direction")
        )
    }
