"""The shard context and the shard building blocks the experiments compose.

A run is split into shards of ``shard_seqs`` sequences. Each shard is a pure function of the
context (config, tokens, fitted statistics) and its id: its directions are seeded by (run seed,
token batch, direction label), so a re-executed shard gives identical rows wherever it runs. The
runner (:mod:`perturb_lens.workflows.experiment`) builds the context and writes the shards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from perturb_lens.common.seeds import derive_seed
from perturb_lens.config.schema import DirectionConfig, ExperimentConfig
from perturb_lens.directions.base import (
    DirectionContext,
    DirectionFn,
    explicit_directions,
    scaled_directions,
)
from perturb_lens.engine.sweep import SweepPlan, clean_pass
from perturb_lens.models.base import CleanRun, LensModel
from perturb_lens.statistics.activations import ActivationStats


def shard_ids(n_seqs: int, shard_seqs: int, n_directions: int = 0) -> list[str]:
    """Shard ids s00000, s00001, ... covering ``n_seqs`` sequences; with ``n_directions``, one
    per batch and direction: s00000-d00, s00000-d01, ..."""
    batches = [f"s{i:05d}" for i in range(math.ceil(n_seqs / shard_seqs))]
    if not n_directions:
        return batches
    return [f"{b}-d{j:02d}" for b in batches for j in range(n_directions)]


@dataclass
class ShardContext:
    """Everything a shard needs; built once per process (driver or worker)."""

    config: ExperimentConfig
    model: LensModel
    tokens: Tensor  # [N, T]
    stats: ActivationStats
    pool: Tensor  # [M, d] float32 real non-BOS activations
    plan: SweepPlan
    explicit: Mapping[str, Tensor]
    sae: Any = None  # the SAE at the hook (config ``sae``), for the SAE directions
    stats_files: Path | None = None  # the folder stats and pool were read from (driver only)

    @staticmethod
    def batch_id(shard_id: str) -> str:
        """The token batch of a shard (``s00003`` for ``s00003`` and ``s00003-d01``)."""
        return shard_id.partition("-")[0]

    def directions_of(self, shard_id: str) -> list[DirectionConfig]:
        """The directions of a shard: all of the config's, or the one its ``-dNN`` names."""
        _, _, d = shard_id.partition("-")
        return [self.config.directions[int(d[1:])]] if d else list(self.config.directions)

    def shard_slice(self, shard_id: str) -> slice:
        i = int(self.batch_id(shard_id)[1:])
        n = self.config.shard_seqs
        return slice(i * n, min((i + 1) * n, self.tokens.shape[0]))


def shard_clean(ctx: ShardContext, shard_id: str, tokens: Tensor | None = None) -> CleanRun:
    """The clean pass of a shard's token rows (or of ``tokens`` standing in for them), with
    non-finite activations reported by their sequence number in the whole run."""
    sl = ctx.shard_slice(shard_id)
    rows = ctx.tokens[sl] if tokens is None else tokens
    return clean_pass(ctx.model, rows.to(ctx.model.device), ctx.plan, seq_offset=sl.start)


def shard_directions(
    ctx: ShardContext,
    shard_id: str,
    x: Tensor,
    configs: Sequence[DirectionConfig] | None = None,
) -> dict[str, Tensor]:
    """Directions [B, T, d] per label (``configs``: default the shard's) for the activations
    ``x`` [B, T, d] of a shard, seeded by (run seed, token batch, label). Under the last-position
    scope only the last position gets one (zeros elsewhere)."""
    cfg = ctx.config
    sl = ctx.shard_slice(shard_id)
    b, t, d = x.shape
    first = ctx.plan.first_position(t)
    flat = x[:, first:].reshape(-1, d).float()
    dirs: dict[str, Tensor] = {}
    for direction in ctx.directions_of(shard_id) if configs is None else configs:
        gen = torch.Generator(device=flat.device).manual_seed(
            derive_seed(cfg.seed, ctx.batch_id(shard_id), direction.label)
        )
        dctx = DirectionContext(
            x=flat,
            stats=ctx.stats,
            pool=ctx.pool.to(flat.device),
            generator=gen,
            options=direction.generator_options,
            sae=ctx.sae,
            sequences=x,
            seq_of_row=torch.arange(b, device=flat.device).repeat_interleave(t - first),
            pos_of_row=torch.arange(first, t, device=flat.device).repeat(b),
        )
        source: str | DirectionFn = direction.name
        if direction.name in ctx.explicit:
            fixed = ctx.explicit[direction.name]
            fixed = fixed[sl, first:].reshape(-1, d) if fixed.ndim == 3 else fixed
            source = explicit_directions(fixed)
        out = torch.zeros(b, t, d, dtype=torch.float32, device=flat.device)
        out[:, first:] = scaled_directions(source, dctx, direction.scale).reshape(b, t - first, d)
        dirs[direction.label] = out
    return dirs
