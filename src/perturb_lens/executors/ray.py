"""The Ray executor: shards as Ray tasks on a cluster (or a local one), retried if a worker dies.

Needs the optional extra: ``pip install 'perturb-lens[ray]'``. The job (config, tokens, statistics)
is put in the object store once; each worker process rebuilds the run context from it on its first
shard and keeps it for the next ones. Workers send each shard's rows back to the driver, which
writes them: workers need no access to the run directory, only to the model (``config.model``
must load on every node: a hub id, or a path that exists there).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from perturb_lens.executors.base import ShardJob

if TYPE_CHECKING:
    from perturb_lens.engine.shard import ShardContext

RAY_INSTALL = "pip install 'perturb-lens[ray]'"

# One run context per worker process: (job id, job, context) of the last job it served.
_WORKER_CACHE: tuple[str, ShardJob, Any] | None = None


def import_ray() -> Any:
    """The ``ray`` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as err:
        raise ImportError(
            f"the Ray executor needs Ray, which is not installed: {RAY_INSTALL} "
            "(or run with the default --executor local)"
        ) from err
    return ray


def _run_shard(job_id: str, job_box: list[Any], shard_id: str) -> pd.DataFrame:
    """Worker side: build (once per process) the job's context, compute one shard."""
    global _WORKER_CACHE
    if _WORKER_CACHE is None or _WORKER_CACHE[0] != job_id:
        _WORKER_CACHE = None  # free the previous job's model before loading this one
        job = import_ray().get(job_box[0])
        _WORKER_CACHE = (job_id, job, job.context())
    _, job, ctx = _WORKER_CACHE
    return job.compute(ctx, shard_id)


def _check_cpus(ray: Any, threads: int) -> None:
    """Refuse (instead of waiting forever) when no Ray node has ``threads`` CPUs."""
    most = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if most < threads:
        raise ValueError(
            f"each shard needs {threads} CPUs (threads={threads}) but the largest Ray node has "
            f"{most:g}: set threads={max(1, int(most))} or less in the config (or join a cluster "
            "with larger nodes)"
        )


class RayExecutor:
    """Shards as Ray tasks; a task whose worker process dies is retried (``max_retries``).

    Each task requests as many CPUs as the run's torch threads (``job.threads``) and computes
    with that many, as the local executor does, so both give bit-identical shards.

    ``address``: a running cluster (``ray://host:10001``, ``host:6379`` or ``auto``); None starts
    a local one unless Ray is already initialised in this process (then that one is used). A
    cluster this executor started is shut down when the shards are done.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        max_retries: int = 3,
        init_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.address = address
        self.max_retries = max_retries
        self.init_kwargs = dict(init_kwargs or {})
        import_ray()  # fail now, before any work, if Ray is missing

    def map(
        self, job: ShardJob, shard_ids: Sequence[str], ctx: ShardContext | None = None
    ) -> Iterator[tuple[str, pd.DataFrame]]:
        """Submit every shard, yield ``(shard_id, rows)`` as each finishes."""
        ray = import_ray()
        if not shard_ids:
            return
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, **self.init_kwargs)
        threads = job.threads or 1
        _check_cpus(ray, threads)
        task = ray.remote(num_cpus=threads, max_retries=self.max_retries)(_run_shard)
        box = [ray.put(job)]  # boxed: workers fetch it only when they have no context for it
        pending = {task.remote(job.job_id, box, sid): sid for sid in shard_ids}
        refs = list(pending)
        try:
            while refs:
                ready, refs = ray.wait(refs, num_returns=1)
                sid = pending.pop(ready[0])
                yield sid, self._result(ray, ready[0], sid)
        finally:
            for ref in refs:
                ray.cancel(ref, force=True)
            if started:
                ray.shutdown()

    def _result(self, ray: Any, ref: Any, shard_id: str) -> pd.DataFrame:
        """The shard's rows; its own error if it raised one; a clear one if its workers died."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            cause = err.cause if isinstance(err.cause, Exception) else err
            cause.add_note(f"(raised computing shard {shard_id} on a Ray worker)")
            raise cause from None
        except ray.exceptions.RayError as err:
            raise RuntimeError(
                f"shard {shard_id} failed on Ray after {self.max_retries} retries ({err}); the "
                "shards done so far are saved: fix the cluster (memory? nodes?) and rerun with "
                "--resume"
            ) from err
