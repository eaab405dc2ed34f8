"""Stable regions (Janiak et al.): interpolate between the activations of two prompts that differ
only in their last token, and measure how sharp the transition of the output is.

Prompt A is a row of the dataset; prompt B is A with its last token replaced (by the next prompt's
last token, as the published code pairs consecutive prompts, or by a random token). Their
activations at the hook (default: after the first layer, ``blocks.1.hook_resid_pre``) agree except
at the last position, so perturbing A's last position along ``x_B - x_A`` by ``t`` in [0, 1]
walks exactly from A's output (t = 0) to B's (t = 1). Sharpness: the largest step-to-step increase
of the L2 distance (at the last layer's ``resid_post``) over its value at t = 1.

:func:`perturb_lens.workflows.sharpness.stable_region_sharpness` runs several models (sizes,
checkpoints)
and returns one frame with a ``model`` column; :func:`sharpness_quantiles` summarises it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from perturb_lens.analysis.curve_shape import curve_metric, curve_statistics, statistic_summary
from perturb_lens.common.seeds import derive_seed
from perturb_lens.config.schema import ExperimentConfig
from perturb_lens.engine.shard import ShardContext, shard_clean
from perturb_lens.engine.sweep import sweep

PAIR = "prompt-pair"


class StableRegionsOptions(BaseModel):
    """The ``stable_regions`` section: how prompt B gets its different last token."""

    model_config = ConfigDict(extra="forbid")
    replacement: Literal["next-prompt", "random"] = Field(
        "next-prompt", description="the next prompt's last token (published), or a random token"
    )


def replacement_tokens(ctx: ShardContext, shard_id: str) -> Tensor:
    """The last token of each prompt B [B] (always different from prompt A's last token)."""
    sl = ctx.shard_slice(shard_id)
    last = ctx.tokens[:, -1]
    own = last[sl]
    if ctx.config.stable_regions.replacement == "next-prompt":
        out = own.clone()
        n = len(last)
        for i, g in enumerate(range(sl.start, sl.stop)):
            j = next((k % n for k in range(g + 1, g + n) if last[k % n] != last[g]), None)
            if j is None:
                raise ValueError("Every prompt ends in the same token: use replacement=random.")
            out[i] = last[j]
        return out
    gen = torch.Generator().manual_seed(derive_seed(ctx.config.seed, shard_id, PAIR))
    vocab = ctx.model.spec.vocab_size
    out = torch.randint(vocab - 1, own.shape, generator=gen)
    return out + (out >= own).long()  # uniform over the vocabulary without the original token


def stable_region_shard(ctx: ShardContext, shard_id: str) -> pd.DataFrame:
    """Rows of one shard: the interpolation from each prompt A to its prompt B (direction
    ``prompt-pair``), with the two last tokens in ``token_a`` / ``token_b``."""
    sl = ctx.shard_slice(shard_id)  # the config guarantees scope=last-position
    tokens_a = ctx.tokens[sl].to(ctx.model.device)
    tokens_b = tokens_a.clone()
    tokens_b[:, -1] = replacement_tokens(ctx, shard_id).to(tokens_a.device)
    clean = shard_clean(ctx, shard_id, tokens_a)
    x_b = ctx.model.run_to_hook(tokens_b, ctx.config.hook)[:, -1]
    dirs = torch.zeros(clean.x.shape, dtype=torch.float32, device=clean.x.device)
    dirs[:, -1] = x_b.float() - clean.x[:, -1].float()
    df = sweep(ctx.model, clean, {PAIR: dirs}, ctx.plan, seq_offset=sl.start)
    seq = df["seq"].to_numpy() - sl.start
    df["token_a"] = tokens_a[:, -1].cpu().numpy()[seq]
    df["token_b"] = tokens_b[:, -1].cpu().numpy()[seq]
    return df


def sharpness_quantiles(stats: pd.DataFrame, by: Sequence[str] = ("model",)) -> pd.DataFrame:
    """Quartiles (and mean) of the sharpness per group (Janiak et al. report quartiles)."""
    return statistic_summary(stats, "sharpness", by=by, stat=("q25", "median", "q75", "mean"))


def stable_region_tables(rows: pd.DataFrame, cfg: ExperimentConfig) -> dict[str, pd.DataFrame]:
    """Sharpness quartiles (and mean) per direction."""
    metric = curve_metric(cfg.metrics)
    stats = curve_statistics(rows, metric)
    quartiles = ("q25", "median", "q75", "mean")
    return {f"sharpness ({metric})": statistic_summary(stats, "sharpness", stat=quartiles)}
