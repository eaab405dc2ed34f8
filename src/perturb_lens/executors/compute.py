"""The compute contract of a run: torch thread count and CPU kind, the same for every shard.

float32 reductions (matrix products, sums) depend on the thread count and on the CPU's kernels,
so shards computed with other threads or on another CPU kind differ in the last bits. A run
records both in its manifest; every executor computes its shards with that thread count, and a
resume that would change either is refused.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from perturb_lens.common.cores import available_cores


class ComputeMismatchError(ValueError):
    """A resume (or a worker) would compute shards with another thread count or CPU kind."""


@functools.cache
def cpu_model() -> str:
    """The CPU kind: /proc/cpuinfo's 'model name' (Linux), else what platform reports."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def resolve_threads(threads: int | None, recorded: Any = None, run_dir: Path | None = None) -> int:
    """The run's thread count: the config's, else the one a resumed run (``run_dir``) recorded,
    else torch's default in this process (its physical cores, or OMP_NUM_THREADS).

    Never more than the cores this process may use: torch's threads busy-wait for each other,
    so 1000 threads on 2 cores made a 6 s run take minutes, and a resume must keep the count
    (float32 results depend on it), so a count beyond the cores is refused, not lowered."""
    cores = available_cores()
    if threads is not None:
        if threads > cores:
            raise ComputeMismatchError(
                f"threads={threads} is more than the {cores} CPU core(s) this process may use, "
                "which only slows every shard down: set threads to at most "
                f"{cores}, or leave it unset (torch's default)."
            )
        return threads
    if isinstance(recorded, int) and recorded >= 1:
        if recorded > cores:
            raise ComputeMismatchError(
                f"cannot resume {run_dir}: its shards were computed with {recorded} torch "
                f"threads, more than the {cores} CPU core(s) here, and a resume must keep the "
                f"count (float32 results depend on it). Resume on a machine with at least "
                f"{recorded} cores, or start a fresh run with another --out."
            )
        return recorded
    import torch

    return min(torch.get_num_threads(), cores)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch intra-op threads set to ``n`` inside the block, restored after."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def check_same_compute(
    run_dir: Path, old_meta: dict, threads: int, cpu: str, *, allow_cpu_change: bool = False
) -> None:
    """Refuse to resume ``run_dir`` with another thread count or CPU kind than its manifest's
    (``allow_cpu_change``: accept another CPU kind, knowing the new shards may differ in the last
    bits). Manifests written before these were recorded are not checked."""
    old_threads, old_cpu = old_meta.get("threads"), old_meta.get("cpu")
    if old_threads is not None and old_threads != threads:
        raise ComputeMismatchError(
            f"cannot resume {run_dir}: its shards were computed with {old_threads} torch threads, "
            f"this run would use {threads} (float32 results depend on the thread count). Resume "
            f"with threads={old_threads} (or without a threads setting, which adopts the "
            "recorded count), or start a fresh run with another --out."
        )
    if old_cpu is not None and old_cpu != cpu and not allow_cpu_change:
        raise ComputeMismatchError(
            f"cannot resume {run_dir}: its shards were computed on a {old_cpu!r} CPU, this machine "
            f"has a {cpu!r} (float32 kernels differ between CPU kinds, so the new shards would "
            "not match the old ones bit for bit). Resume on a machine with the same CPU, pass "
            "--allow-cpu-change to accept the mix, or start a fresh run with another --out."
        )
