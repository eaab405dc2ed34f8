"""The default executor: every shard in the driver's process, one after another."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import pandas as pd

from perturb_lens.executors.base import ShardJob

if TYPE_CHECKING:
    from perturb_lens.engine.shard import ShardContext


class LocalExecutor:
    """Computes shards in this process, in order, reusing the driver's context."""

    name = "local"

    def map(
        self, job: ShardJob, shard_ids: Sequence[str], ctx: ShardContext | None = None
    ) -> Iterator[tuple[str, pd.DataFrame]]:
        """Yield ``(shard_id, rows)`` for each shard in order."""
        ctx = ctx if ctx is not None else job.context()
        for sid in shard_ids:
            yield sid, job.compute(ctx, sid)
