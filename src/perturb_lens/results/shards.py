"""Reading a run shard by shard: the summary row rule and checked, column-pruned record batches.

Memory stays flat in the run size: one record batch of the columns asked for is held at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from perturb_lens.results.store import ChecksumError, file_sha256, load_manifest


def summary_filters(meta: dict[str, Any]) -> list[tuple[str, str, Any]] | None:
    """The rows that enter the published mean, as pyarrow filters on ``pos`` (None: all rows).

    Under the all-positions scope the last position is dropped unless the run says
    ``drop_last_position: false`` (its next-token prediction has no target in the published
    setup); BOS (``pos`` 0) is dropped when the run says ``include_bos: false``.
    """
    filters: list[tuple[str, str, Any]] = []
    if meta["scope"] == "all-positions" and meta.get("drop_last_position", True):
        filters.append(("pos", "<", int(meta["seq_len"]) - 1))
    if not meta.get("include_bos", True):
        filters.append(("pos", ">", 0))
    return filters or None


def iter_batches(
    run_dir: str | Path,
    columns: Sequence[str],
    filters: Sequence[tuple[str, str, Any]] | None = None,
    *,
    verify: bool = True,
) -> Iterator[tuple[str, pa.RecordBatch]]:
    """``(shard id, record batch)`` of ``columns`` for every shard (shard-id order), rows passing
    ``filters`` (pyarrow's ``[(column, op, value), ...]``, all must hold).

    With ``verify`` each shard's file is first checked against the sha256 in the manifest (read
    in 1 MiB blocks).
    """
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    expr = pq.filters_to_expression(list(filters)) if filters else None
    for shard_id in sorted(manifest["shards"]):
        entry = manifest["shards"][shard_id]
        path = run_dir / entry["file"]
        if not path.is_file():
            raise ChecksumError(
                f"shard {shard_id} ({path}) is missing: rerun the run with --resume to recompute it"
            )
        if verify and file_sha256(path) != entry["sha256"]:
            raise ChecksumError(
                f"shard {shard_id} ({path}) does not match its recorded sha256 (damaged or "
                "changed after the run): rerun the run with --resume to recompute it"
            )
        dataset = ds.dataset(path, format="parquet")
        missing = [c for c in columns if c not in dataset.schema.names]
        if missing:
            raise KeyError(
                f"columns {missing} not in shard {shard_id} of {run_dir} (it has "
                f"{dataset.schema.names})"
            )
        for batch in dataset.to_batches(columns=list(columns), filter=expr):
            yield shard_id, batch
