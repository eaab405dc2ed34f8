"""An aggregate run's quantile sketches: a file per shard, merged into one run-level file.

The sketch is ~98 % of an aggregate shard's bytes (with 8-16 sequences per shard nearly every value
has a bucket of its own), and merging sketches is exact (integer counts added, in any order). So
an aggregate shard is written as two files: its other aggregates (``shards/{id}.parquet``) and its
sketch (``sketches/{id}.parquet``, :data:`SKETCH_SCHEMA`, recorded with its sha256 in the shard's
manifest entry under ``sketch``). :func:`compact` (the runner calls it every
:data:`COMPACT_EVERY` shards and before it marks the run complete) merges the run-level sketch and
the shards' sketch files it does not cover into a new run-level file:

1. write ``sketch-{n}.parquet`` (``n``: the shards it covers) atomically; the manifest still names
   the previous one, so a crash here leaves an unused file (removed by the next compaction);
2. write the manifest with ``sketch: {file, sha256, shards, rows}`` (the commit point);
3. delete the previous run-level file and the merged shards' sketch files (a crash here leaves
   files no reader uses, removed by the next compaction).

Readers (:func:`sketch_tables`) take the run-level sketch plus the sketch files of the shards it
does not cover, so every state of the run directory reads the same counts. The run-level file is
sorted canonically (metric, direction, length, value), so it is the same bytes whichever shards
were merged when: a run killed at any point resumes to identical files.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from perturb_lens.results.sketch import ordinals
from perturb_lens.results.store import (
    RUN_SKETCH,
    RUN_SKETCH_FILE,
    SKETCH_FILE,
    SKETCHES,
    ChecksumError,
    ResultStore,
    atomic_write,
    covered_shards,
    file_sha256,
    sketch_entries,
    verified_bytes,
)

SKETCH_SCHEMA = pa.schema(
    [
        ("metric", pa.string()),
        ("direction", pa.string()),
        ("length", pa.float64()),
        ("sign", pa.int8()),
        ("bucket", pa.int32()),
        ("count", pa.int64()),
    ]
)
COMPACT_EVERY = 16  # shards' sketch files held before the runner merges them
_KEYS = ["metric", "direction", "length"]
_RUN = "the run's merged sketch"
logger = logging.getLogger(__name__)


def merge_sketch_tables(tables: Sequence[pa.Table]) -> pa.Table:
    """Sketch tables (:data:`SKETCH_SCHEMA` columns) merged: counts of equal (metric, direction,
    length, sign, bucket) added, sorted by metric, direction, length and value (canonical)."""
    if not tables:
        return SKETCH_SCHEMA.empty_table()
    both = pa.concat_tables([t.select(SKETCH_SCHEMA.names).cast(SKETCH_SCHEMA) for t in tables])
    g = both.group_by([*_KEYS, "sign", "bucket"], use_threads=False).aggregate([("count", "sum")])
    order = ordinals(g.column("sign").to_numpy(), g.column("bucket").to_numpy())
    g = g.append_column("_ord", pa.array(order, pa.int64()))
    g = g.take(pc.sort_indices(g, sort_keys=[(k, "ascending") for k in [*_KEYS, "_ord"]]))
    columns = {n: g.column("count_sum" if n == "count" else n) for n in SKETCH_SCHEMA.names}
    return pa.table(columns, schema=SKETCH_SCHEMA)


def shard_parts(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """An aggregate shard's table (:func:`~perturb_lens.results.aggregate.aggregate_rows`) as its
    rows of every kind but ``sketch``, and its sketch (:data:`SKETCH_SCHEMA`, canonical order)."""
    is_sketch = pc.equal(table.column("kind"), "sketch")
    return table.filter(pc.invert(is_sketch)), merge_sketch_tables([table.filter(is_sketch)])


def write_aggregate_shard(
    store: ResultStore, shard_id: str, table: pa.Table, *, info: dict | None = None
) -> None:
    """Write an aggregate shard: its sketch to its own file, the rest as the shard."""
    rest, sketch = shard_parts(table)
    store.write_shard(shard_id, rest, info=info, sketch=sketch)


def compact(store: ResultStore, *, min_pending: int = 1) -> bool:
    """Merge the shards' sketch files into the run-level sketch (the steps of the module
    docstring) when at least ``min_pending`` wait; then (or whenever ``min_pending`` <= 1) remove
    the files no reader uses. Returns whether it merged. ``store`` must be open for writing."""
    if not store.writing:
        raise RuntimeError("ResultStore.create() must be called before compact()")
    pending = sketch_entries(store.manifest)
    merged = bool(pending) and len(pending) >= min_pending and _merge(store, pending)
    if merged or min_pending <= 1:  # every merge, and the run's last compaction
        remove_unused(store)
    return merged


def _merge(store: ResultStore, pending: list[tuple[str, dict]]) -> bool:
    """Steps 1-2 of the module docstring for the ``pending`` sketch files that read back as
    recorded (a damaged one stays pending: its shard is recomputed on resume). Returns whether
    any was merged."""
    run_dir, manifest = store.run_dir, store.manifest
    tables, ids = [], []
    if manifest.get(RUN_SKETCH) is not None:
        tables.append(_read(run_dir, _RUN, manifest[RUN_SKETCH], RUN_SKETCH_FILE))
    for shard_id, entry in pending:
        try:
            tables.append(_read(run_dir, _of(shard_id), entry, SKETCH_FILE))
        except ChecksumError as e:
            logger.warning("%s; left out of the run's merged sketch", e)
            continue
        ids.append(shard_id)
    if not ids:
        return False
    covered = sorted(covered_shards(manifest) | set(ids))
    table = merge_sketch_tables(tables)
    rel = f"sketch-{len(covered)}.parquet"  # a new name: the manifest's file is left whole
    atomic_write(run_dir / rel, lambda f: pq.write_table(table, f))
    record = {
        "file": rel,
        "sha256": file_sha256(run_dir / rel),
        "shards": covered,
        "rows": table.num_rows,
    }
    store.update_manifest(lambda m: m.__setitem__(RUN_SKETCH, record))
    return True


def remove_unused(store: ResultStore) -> None:
    """Delete the run-level sketch files the manifest does not name and the sketch files of
    shards the run-level sketch covers (left by a compaction that stopped after its commit)."""
    manifest = store.manifest
    current = (manifest.get(RUN_SKETCH) or {}).get("file")
    for path in store.run_dir.glob("sketch-*.parquet"):
        if RUN_SKETCH_FILE.fullmatch(path.name) and path.name != current:
            path.unlink(missing_ok=True)
    folder = store.run_dir / SKETCHES
    for shard_id in covered_shards(manifest):
        (folder / f"{shard_id}.parquet").unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty, or absent
        folder.rmdir()


def sketch_tables(
    run_dir: Path, manifest: dict, metrics: Sequence[str] | None = None
) -> Iterator[pa.Table]:
    """The run's sketch tables kept outside its shards (of ``metrics``; None: all): the run-level
    sketch, then the sketch files of the shards it does not cover, each checked against the
    sha256 recorded in ``manifest``."""
    entries = []
    if manifest.get(RUN_SKETCH) is not None:
        entries.append((_RUN, manifest[RUN_SKETCH], RUN_SKETCH_FILE))
    entries += [(_of(s), e, SKETCH_FILE) for s, e in sketch_entries(manifest)]
    for name, entry, pattern in entries:
        yield _read(Path(run_dir), name, entry, pattern, metrics)


def _of(shard_id: str) -> str:
    return f"the sketch of shard {shard_id}"


def _read(
    run_dir: Path,
    name: str,
    entry: dict,
    pattern: re.Pattern[str],
    metrics: Sequence[str] | None = None,
) -> pa.Table:
    """A sketch file of the manifest (checked against its sha256), rows of ``metrics``."""
    filters = [("metric", "in", list(metrics))] if metrics is not None else None
    data = verified_bytes(run_dir, name, entry, pattern)
    return pq.read_table(pa.BufferReader(data), filters=filters)
