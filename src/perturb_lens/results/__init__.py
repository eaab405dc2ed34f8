"""Results: the run directory (Parquet shards + manifest, resumable) and pandas analysis helpers."""

from perturb_lens.results.analysis import (
    curves,
    summary_table,
    threshold_lengths,
    threshold_summary,
    token_curves,
)
from perturb_lens.results.store import (
    ChecksumError,
    ConfigMismatchError,
    RunLockedError,
    RunStore,
    atomic_write,
    atomic_write_json,
    config_hash,
    diff_configs,
    file_sha256,
    load_manifest,
    load_results,
)

__all__ = [
    "ChecksumError",
    "ConfigMismatchError",
    "RunLockedError",
    "RunStore",
    "atomic_write",
    "atomic_write_json",
    "config_hash",
    "curves",
    "diff_configs",
    "file_sha256",
    "load_manifest",
    "load_results",
    "summary_table",
    "threshold_lengths",
    "threshold_summary",
    "token_curves",
]
