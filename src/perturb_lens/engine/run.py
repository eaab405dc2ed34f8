"""Deprecated (one release): the shard context moved to :mod:`perturb_lens.engine.shard`, and
``RunContext`` is now :class:`~perturb_lens.engine.shard.ShardContext` ("run" names the run
folder and its :class:`~perturb_lens.Run` handle only)."""

from __future__ import annotations

import warnings

from perturb_lens.engine.shard import ShardContext, shard_clean, shard_directions, shard_ids

warnings.warn(
    "perturb_lens.engine.run is now perturb_lens.engine.shard (RunContext is ShardContext)",
    DeprecationWarning,
    stacklevel=2,
)

RunContext = ShardContext

__all__ = ["RunContext", "shard_clean", "shard_directions", "shard_ids"]
