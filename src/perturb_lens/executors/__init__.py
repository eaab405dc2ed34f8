"""Executors: where a run's shards are computed (``local``, the default, or ``ray``)."""

from __future__ import annotations

from perturb_lens.executors.base import Executor, ShardFn, ShardJob
from perturb_lens.executors.local import LocalExecutor

EXECUTORS = ("local", "ray")


def get_executor(executor: str | Executor = "local", address: str | None = None) -> Executor:
    """An executor by name (``address``: the Ray cluster to join), or the instance given."""
    if not isinstance(executor, str):
        if not isinstance(executor, Executor):
            raise TypeError(
                f"executor must be 'local', 'ray' or an object with .name and .map(job, shard_ids, "
                f"ctx); got {executor!r}"
            )
        if address is not None:
            raise ValueError("address= is for executor='ray'; configure your executor instead.")
        return executor
    if executor == "local":
        if address is not None:
            raise ValueError("--address needs --executor ray (the local executor has no cluster).")
        return LocalExecutor()
    if executor == "ray":
        from perturb_lens.executors.ray import RayExecutor

        return RayExecutor(address)
    raise ValueError(f"Unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}.")


__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "ShardFn", "ShardJob", "get_executor"]
