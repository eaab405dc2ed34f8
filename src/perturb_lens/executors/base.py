"""What an executor is: it computes the shards of a run and hands each back to the driver.

The driver (:func:`perturb_lens.workflows.experiment.run_experiment`) is the only writer of the
run directory:
it writes every shard it gets back through :class:`~perturb_lens.results.store.ResultStore`
(atomically, with its sha256 in the manifest). A shard is a pure function of the job and its id
(its seed is derived from the run seed and the shard id), so an executor may compute a shard again
after a worker died, in any order, on any machine, and the run directory stays consistent and
identical.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pandas as pd
from torch import Tensor

from perturb_lens.executors.compute import ComputeMismatchError, cpu_model, torch_threads

if TYPE_CHECKING:
    from perturb_lens.config.schema import ExperimentConfig
    from perturb_lens.engine.shard import ShardContext
    from perturb_lens.models.base import LensModel
    from perturb_lens.statistics.activations import ActivationStats

ShardFn = Callable[["ShardContext", str], pd.DataFrame]
"""Computes the rows of one shard from the run context and the shard id (module-level function,
so that it pickles by reference to a worker)."""

PrepareFn = Callable[..., "ShardContext"]
"""Builds the run context (:func:`perturb_lens.workflows.experiment.prepare`; module-level, so
    it pickles)."""


@dataclass
class ShardJob:
    """Everything a worker needs to compute any shard of one run (picklable, shipped once).

    A worker rebuilds the :class:`~perturb_lens.engine.shard.ShardContext` from it once per process
    with ``prepare``: the model from ``config.model`` (or ``model``, when the driver was handed
    one; the same for ``sae``), and the driver's tokens and fitted statistics, so nothing is
    refitted and no shared filesystem is needed.
    """

    config: ExperimentConfig
    run_dir: str
    tokens: Tensor
    stats: ActivationStats
    pool: Tensor
    shard_fn: ShardFn
    prepare: PrepareFn
    explicit: Mapping[str, Tensor] = field(default_factory=dict)
    model: LensModel | None = None
    sae: Any = None
    threads: int | None = None
    cpu: str | None = None
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def from_context(
        cls,
        ctx: ShardContext,
        run_dir: Path,
        shard_fn: ShardFn,
        prepare: PrepareFn,
        *,
        model: LensModel | None = None,
        sae: Any = None,
        threads: int | None = None,
        cpu: str | None = None,
    ) -> ShardJob:
        """The job for a context built by the driver (``model``, ``sae``: objects the driver was
        handed, shipped to workers instead of loading ``config.model`` / ``config.sae`` there;
        ``threads``, ``cpu``: the run's compute contract, see :meth:`compute`)."""
        return cls(
            config=ctx.config,
            run_dir=str(run_dir),
            tokens=ctx.tokens,
            stats=ctx.stats,
            pool=ctx.pool,
            shard_fn=shard_fn,
            prepare=prepare,
            explicit=dict(ctx.explicit),
            model=model,
            sae=sae,
            threads=threads,
            cpu=cpu,
        )

    def compute(self, ctx: ShardContext, shard_id: str) -> pd.DataFrame:
        """One shard's rows with the run's torch thread count (None: as set), refused on another
        CPU kind than ``cpu`` (None: any). Every executor computes shards through this."""
        if self.cpu is not None and cpu_model() != self.cpu:
            raise ComputeMismatchError(
                f"this worker's CPU is {cpu_model()!r}, the run's is {self.cpu!r}: float32 kernels "
                "differ between CPU kinds, so its shards would not match the others bit for bit. "
                "Use workers with the run's CPU kind, or pass --allow-cpu-change to accept it."
            )
        if self.threads is None:
            return self.shard_fn(ctx, shard_id)
        with torch_threads(self.threads):
            return self.shard_fn(ctx, shard_id)

    def context(self) -> ShardContext:
        """Rebuild the run context (loads the model unless the job carries one)."""
        return self.prepare(
            self.config,
            Path(self.run_dir),
            model=self.model,
            tokens=self.tokens,
            explicit=self.explicit,
            stats=(self.stats, self.pool),
            sae=self.sae,
            progress=False,
        )


@runtime_checkable
class Executor(Protocol):
    """Computes shards of a job; yields ``(shard_id, rows)`` as each finishes, each id once."""

    name: str

    def map(
        self, job: ShardJob, shard_ids: Sequence[str], ctx: ShardContext | None = None
    ) -> Iterator[tuple[str, pd.DataFrame]]:
        """Compute ``shard_ids`` (in any order, each with ``job.compute``); ``ctx`` is the
        driver's context, if useful."""
        ...
