"""Results: the run directory (Parquet shards + manifest, resumable; :mod:`.store`), its shards'
readers (:mod:`.shards`), the quantile sketches and aggregates of aggregate runs
(:mod:`.sketch`, :mod:`.aggregate`, :mod:`.compaction`)."""

from perturb_lens.common.writes import config_hash
from perturb_lens.results.aggregate import Aggregates, aggregate_curves, run_aggregates
from perturb_lens.results.shards import sequence_sums
from perturb_lens.results.store import (
    ChecksumError,
    ConfigMismatchError,
    InputsChangedError,
    ManifestError,
    ResultStore,
    RunLockedError,
    atomic_write,
    atomic_write_json,
    diff_configs,
    file_sha256,
    load_manifest,
    load_results,
)

__all__ = [
    "Aggregates",
    "ChecksumError",
    "ConfigMismatchError",
    "InputsChangedError",
    "ManifestError",
    "ResultStore",
    "RunLockedError",
    "aggregate_curves",
    "atomic_write",
    "atomic_write_json",
    "config_hash",
    "diff_configs",
    "file_sha256",
    "load_manifest",
    "load_results",
    "run_aggregates",
    "sequence_sums",
]


def __getattr__(name: str) -> object:
    """``RunStore``: the old name of :class:`ResultStore` (one release, with a warning)."""
    if name == "RunStore":
        import warnings

        warnings.warn("RunStore is now ResultStore", DeprecationWarning, stacklevel=2)
        return ResultStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
