"""Reading a run shard by shard: checked column-pruned record batches and per-sequence sums of a
metric over the summary rows (:func:`~perturb_lens.results.summary.summary_filters`).

Memory stays flat in the run size: one record batch of the columns asked for is held at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from perturb_lens.common.files import regular_file
from perturb_lens.config.schema import DirectionConfig
from perturb_lens.metrics.builtin import NONFINITE, metric_names
from perturb_lens.results.store import load_manifest, verified_shard_bytes
from perturb_lens.results.summary import summary_filters


def iter_batches(
    run_dir: str | Path,
    columns: Sequence[str],
    filters: Sequence[tuple[str, str, Any]] | None = None,
    *,
    verify: bool = True,
    manifest: dict[str, Any] | None = None,
) -> Iterator[tuple[str, pa.RecordBatch]]:
    """``(shard id, record batch)`` of ``columns`` for every shard (shard-id order), rows passing
    ``filters`` (pyarrow's ``[(column, op, value), ...]``, all must hold).

    With ``verify`` each shard's file is read once and checked against its manifest entry
    (:func:`~perturb_lens.results.store.verified_shard_bytes`); only the needed columns of one
    shard are held at a time. ``manifest``: the run's, as read by the caller (default: read).
    """
    run_dir = Path(run_dir)
    manifest = manifest if manifest is not None else load_manifest(run_dir)
    for shard_id in sorted(manifest["shards"]):
        entry = manifest["shards"][shard_id]
        source = (
            pa.BufferReader(verified_shard_bytes(run_dir, shard_id, entry))
            if verify
            else regular_file(run_dir / entry["file"], f"shard {shard_id}")
        )
        names = pq.read_schema(source).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise KeyError(
                f"columns {missing} not in shard {shard_id} of {run_dir} (it has {names})"
            )
        if isinstance(source, pa.BufferReader):
            source.seek(0)
        table = pq.read_table(
            source, columns=list(columns), filters=list(filters) if filters else None
        )
        for batch in table.to_batches():
            yield shard_id, batch


def shard_columns(run_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """The columns of a run's first shard (all shards of a run have the same), checked against
    its manifest entry."""
    shards = manifest["shards"]
    if not shards:
        return []
    first = min(shards)
    return pq.read_schema(
        pa.BufferReader(verified_shard_bytes(run_dir, first, shards[first]))
    ).names


def results_mode(manifest: dict[str, Any]) -> str:
    """``rows`` (one row per token x direction x length) or ``aggregate`` (config ``results``)."""
    return str(manifest["config"].get("results", "rows"))


def run_directions(manifest: dict[str, Any]) -> dict[str, DirectionConfig]:
    """The run's directions by label (from the config in its manifest)."""
    specs = [DirectionConfig.model_validate(d) for d in manifest["config"]["directions"]]
    return {s.label: s for s in specs}


def check_measured(run_dir: Path, manifest: dict[str, Any], metric: str, have: list[str]) -> None:
    """Refuse a metric the run did not measure (``have``: its shards' columns, or its config's
    metrics for an aggregate run), naming those it did."""
    if metric in have:
        return
    measured = manifest["config"].get("metrics") or [m for m in have if m in metric_names()]
    raise ValueError(
        f"{run_dir} has no metric {metric!r}: the run measured {', '.join(measured)}. Pick one "
        f"of those (e.g. --metric {measured[0] if measured else 'kl'}), or run the config again "
        f"with {metric} in its metrics."
    )


def sequence_sums(
    run_dir: str | Path,
    metric: str = "kl",
    directions: Iterable[str] | None = None,
    *,
    verify: bool = True,
) -> pd.DataFrame:
    """Per (direction, length, seq): ``sum`` and ``n`` of the metric over the summary rows (the
    published mean's rows, :func:`summary_filters`), and ``n_nan``
    rows whose metric is NaN (left out of ``sum`` and ``n``). ``directions``: labels to read
    (default: all of the run's); ``direction`` comes back as a Categorical over them.

    Streamed shard by shard, reading only the needed columns and rows, each shard summed as it is
    read: memory grows with the number of groups, not of rows. An aggregate run (config
    ``results: aggregate``) stored these sums per shard; they are read as they are.
    """
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    aggregate = results_mode(manifest) == "aggregate"
    have = manifest["config"].get("metrics", []) if aggregate else shard_columns(run_dir, manifest)
    if manifest["shards"]:
        check_measured(run_dir, manifest, metric, have)
    labels = sorted(set(directions if directions is not None else run_directions(manifest)))
    value_set = pa.array(labels, pa.string())
    keys = ["direction", "length", "seq"]
    columns = [*keys, "sum", "n", "n_nan"]
    shards = []
    if aggregate:
        wanted = [("kind", "=", "seq"), ("metric", "=", metric), ("direction", "in", labels)]
        batches = iter_batches(run_dir, [*keys, "sum", "count", "n_nan"], wanted, verify=verify)
        for _, batch in batches:
            table = pa.table(
                {
                    "direction": pc.index_in(batch.column("direction"), value_set=value_set),
                    **{k: batch.column(k) for k in ("length", "seq", "sum", "n_nan")},
                    "n": batch.column("count"),
                }
            )
            shards.append(table.select(columns).to_pandas())
    else:
        filters = [*(summary_filters(manifest["meta"]) or []), ("direction", "in", labels)]
        flag = [NONFINITE] if NONFINITE in have else []
        batches = iter_batches(run_dir, [*keys, metric, *flag], filters, verify=verify)
        for _, group in itertools.groupby(batches, key=lambda item: item[0]):
            parts = [_sum_by(_terms(batch, metric, value_set), keys) for _, batch in group]
            shards.append(_sum_by(pa.concat_tables(parts), keys).to_pandas())
    out = pd.concat(shards, ignore_index=True) if shards else pd.DataFrame(columns=columns)
    out = out.astype({"direction": np.int64, "length": np.float64, "seq": np.int64})
    out = out.sort_values(keys, ignore_index=True)
    if out.duplicated(keys).any():  # a group split over shards (not the engine's layout)
        out = out.groupby(keys, sort=True).sum().reset_index()
    out["direction"] = pd.Categorical.from_codes(out["direction"].to_numpy(), labels)
    return out[columns]


def _terms(batch: pa.RecordBatch | pa.Table, metric: str, value_set: pa.Array) -> pa.Table:
    """A batch as the terms of the sums: direction code, length, seq, value (0 for NaN or inf,
    rows a ``nonfinite: record`` run keeps, and for rows it flagged: ``summary_rows`` leaves
    them out), n, and the count of such left-out rows."""
    values = pc.cast(batch.column(metric), pa.float64())
    nan = pc.invert(pc.fill_null(pc.is_finite(values), False))
    if NONFINITE in batch.schema.names:  # a row flagged non-finite in any metric: left out
        nan = pc.or_(nan, pc.fill_null(pc.cast(batch.column(NONFINITE), pa.bool_()), False))
    return pa.table(
        {
            "direction": pc.index_in(batch.column("direction"), value_set=value_set),
            "length": pc.cast(batch.column("length"), pa.float64()),
            "seq": pc.cast(batch.column("seq"), pa.int64()),
            "sum": pc.if_else(nan, 0.0, values),
            "n": pc.cast(pc.invert(nan), pa.int64()),
            "n_nan": pc.cast(nan, pa.int64()),
        }
    )


def _sum_by(table: pa.Table, keys: list[str]) -> pa.Table:
    """``sum``, ``n`` and ``n_nan`` summed per ``keys`` (the columns keep their names), in one
    thread so that the float sums are the same on every call (aggregate shards are hashed)."""
    agg = table.group_by(keys, use_threads=False).aggregate(
        [(c, "sum") for c in ("sum", "n", "n_nan")]
    )
    return agg.rename_columns([*keys, "sum", "n", "n_nan"]).select([*keys, "sum", "n", "n_nan"])
