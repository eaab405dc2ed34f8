"""Sensitive directions (Lee & Heimersheim): perturb activations along baseline and SAE directions
by a grid of lengths and measure how the output changes (the plain sweep)."""

from __future__ import annotations

import pandas as pd

from perturb_lens.engine.shard import ShardContext, shard_clean, shard_directions
from perturb_lens.engine.sweep import sweep


def sweep_shard(ctx: ShardContext, shard_id: str) -> pd.DataFrame:
    """Rows of one shard: clean pass, directions for every token, the sweep."""
    clean = shard_clean(ctx, shard_id)
    dirs = shard_directions(ctx, shard_id, clean.x)
    return sweep(ctx.model, clean, dirs, ctx.plan, seq_offset=ctx.shard_slice(shard_id).start)
