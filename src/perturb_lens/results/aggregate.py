"""Aggregate results: per shard, statistics that merge exactly across shards; curves from them.

A shard's rows (one per token x direction x length) become one long table (:data:`SCHEMA`), a
``kind`` per part, each per metric and over the summary rows only (the published mean's rows,
:func:`~perturb_lens.results.summary.summary_filters`, without rows flagged non-finite, as
:func:`~perturb_lens.results.summary.summary_rows`):

- ``moments`` per (direction, length): ``count``, ``n_nan`` (rows left out), ``sum``, ``m2``
  (sum of squared deviations from the group mean; merged with Chan's formula, which keeps the
  precision a raw sum of squares loses when the spread is small against the mean), ``min``, ``max``;
- ``sketch`` per (direction, length): the quantile sketch's ``sign``, ``bucket``, ``count``
  (:mod:`~perturb_lens.results.sketch`); the runner stores it apart from the shard and merges it
  into one run-level sketch (:mod:`~perturb_lens.results.compaction`);
- ``seq`` per (direction, length, seq): ``sum``, ``count``, ``n_nan`` (the verdicts' unit, as
  :func:`~perturb_lens.results.shards.sequence_sums` sums them);
- ``threshold`` per (direction, first length): how many tokens first exceed the metric's
  registered ``threshold`` at that grid length (``length`` NaN: never);
- ``sample``: the rows of the first :data:`SAMPLE_SEQS` sequences (``sum`` holds the value), for
  the token-curve figures.

A token's whole curve lies in one shard, so merging (:func:`merge`) is exact: counts, min, max and
the sketch exactly, sums up to summation order. :func:`run_aggregates` gives the merged aggregates
of a run in either result mode, streaming a rows run shard by shard (one code path for both).

pyarrow and pandas rather than DuckDB: the shards are Parquet files already read (and checked
against their sha256) through pyarrow, and the groupings here are a few per shard; DuckDB would
add a dependency and a second reader without making either faster at this size.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from perturb_lens.metrics.builtin import NONFINITE, get_metric, metric_names
from perturb_lens.results.compaction import sketch_tables
from perturb_lens.results.frames import _quantile, pick_lengths
from perturb_lens.results.shards import (
    _sum_by,
    _terms,
    iter_batches,
    results_mode,
    run_directions,
    shard_columns,
)
from perturb_lens.results.sketch import (
    DEFAULT_ALPHA,
    counted_quantiles,
    merge_sketches,
    sketch,
    sketch_quantiles,
)
from perturb_lens.results.store import ChecksumError, load_manifest
from perturb_lens.results.summary import summary_filters
from perturb_lens.statistics.bootstrap import resample_weights

SAMPLE_SEQS = 4  # sequences whose rows an aggregate shard keeps (token-curve figures)
GROUP = ["direction", "length"]
KINDS = ("moments", "sketch", "seq", "threshold", "sample")
SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("metric", pa.string()),
        ("direction", pa.string()),
        ("length", pa.float64()),
        ("seq", pa.int64()),
        ("pos", pa.int64()),
        ("sign", pa.int8()),
        ("bucket", pa.int32()),
        ("count", pa.int64()),
        ("n_nan", pa.int64()),
        ("sum", pa.float64()),
        ("m2", pa.float64()),
        ("min", pa.float64()),
        ("max", pa.float64()),
        ("threshold", pa.float64()),
    ]
)
_MERGE_EVERY = 32  # per-shard parts held before they are merged (memory flat in the shards)
_READ_TRIES = 3  # reads of a run that a writer changes meanwhile (a compaction removes files)


def metric_threshold(metric: str) -> float | None:
    """The registered threshold of a metric (None: none, or not a registered metric)."""
    return get_metric(metric).threshold if metric in metric_names() else None


# ---------------------------------------------------------------------------------------------
# One shard


def aggregate_rows(
    rows: pd.DataFrame | pa.Table,
    metrics: Sequence[str],
    meta: Mapping[str, Any],
    *,
    alpha: float = DEFAULT_ALPHA,
) -> pa.Table:
    """A shard's rows as its aggregate table (:data:`SCHEMA`, the kinds of the module docstring)
    for each of ``metrics``, over the summary rows of a run with this ``meta``. Runs store
    sketches of the default ``alpha`` (the readers assume it)."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pandas(rows, preserve_index=False)
    filters = summary_filters(dict(meta))
    if filters:
        table = table.filter(pq.filters_to_expression(filters))
    flag = (
        table.column(NONFINITE).to_numpy().astype(bool)
        if NONFINITE in table.column_names
        else np.zeros(table.num_rows, bool)
    )
    keys = table.select(["seq", "pos", "direction", "length"]).to_pandas()
    keys["direction"] = keys["direction"].astype("category")  # grouped by its codes
    keys["length"] = keys["length"].astype(np.float64)
    codes, groups = _codes(keys[GROUP])
    kept = ~flag
    parts = []
    for metric in metrics:
        values = table.column(metric).to_numpy(zero_copy_only=False).astype(np.float64)
        valid = kept & np.isfinite(values)
        sk = sketch(codes[valid], values[valid], alpha)
        frames = {
            "moments": _moments(codes, groups, values, valid),
            "sketch": pd.concat([groups.iloc[sk.pop("code")].reset_index(drop=True), sk], axis=1),
            "seq": _seq_sums(table, metric),
            "threshold": _first_crossings(keys[kept], values[kept], metric_threshold(metric)),
            "sample": _sample(keys[kept], values[kept]),
        }
        for kind, frame in frames.items():
            parts.append(_typed(frame.assign(kind=kind, metric=metric)))
    return pa.concat_tables(parts) if parts else SCHEMA.empty_table()


def _typed(frame: pd.DataFrame) -> pa.Table:
    """``frame`` as a table of :data:`SCHEMA` (its absent columns null)."""
    n = len(frame)
    if isinstance(frame["direction"].dtype, pd.CategoricalDtype):
        frame = frame.astype({"direction": str})
    cols = {
        f.name: pa.array(frame[f.name], f.type, from_pandas=True)
        if f.name in frame.columns
        else pa.nulls(n, f.type)
        for f in SCHEMA
    }
    return pa.table(cols, schema=SCHEMA)


def _codes(frame: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Group code of every row of ``frame`` (groups sorted) and the groups' keys."""
    g = frame.groupby(list(frame.columns), sort=True, observed=True)
    return g.ngroup().to_numpy(), g.size().index.to_frame(index=False)


def _moments(
    codes: np.ndarray, groups: pd.DataFrame, values: np.ndarray, valid: np.ndarray
) -> pd.DataFrame:
    """count, n_nan, sum, m2, min, max of the ``valid`` values per group (rows: ``codes`` into
    ``groups``; two passes)."""
    out = groups.copy()
    size = len(out)
    count = np.bincount(codes, weights=valid, minlength=size).astype(np.int64)
    x = np.where(valid, values, 0.0)
    total = np.bincount(codes, weights=x, minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
    dev = np.where(valid, values - mean[codes], 0.0)
    lo, hi = np.full(size, np.inf), np.full(size, -np.inf)
    np.minimum.at(lo, codes, np.where(valid, values, np.inf))
    np.maximum.at(hi, codes, np.where(valid, values, -np.inf))
    empty = count == 0
    out["count"] = count
    out["n_nan"] = np.bincount(codes, minlength=size) - count
    out["sum"] = total
    out["m2"] = np.bincount(codes, weights=dev * dev, minlength=size)
    out["min"], out["max"] = np.where(empty, np.nan, lo), np.where(empty, np.nan, hi)
    return out


def _seq_sums(table: pa.Table, metric: str) -> pd.DataFrame:
    """Per (direction, length, seq) sums as :func:`~perturb_lens.results.shards.sequence_sums`."""
    labels = pc.unique(pc.cast(table.column("direction"), pa.string())).sort()
    keys = ["direction", "length", "seq"]
    out = _sum_by(_terms(table, metric, labels), keys).to_pandas()
    out["direction"] = labels.to_numpy(zero_copy_only=False)[out["direction"].to_numpy()]
    out = out.sort_values(keys, ignore_index=True)
    return out.rename(columns={"n": "count"})


def _first_crossings(
    keys: pd.DataFrame, values: np.ndarray, threshold: float | None
) -> pd.DataFrame:
    """Tokens per (direction, first length whose value exceeds ``threshold``; NaN: never), as
    :func:`~perturb_lens.analysis.tables.threshold_lengths` finds them per token."""
    if threshold is None:
        return pd.DataFrame(columns=[*GROUP, "count", "threshold"])
    codes, units = _codes(keys[["seq", "pos", "direction"]])
    first = np.full(len(units), np.inf)
    np.minimum.at(first, codes, np.where(values > threshold, keys["length"].to_numpy(), np.inf))
    units["length"] = np.where(np.isinf(first), np.nan, first)
    out = units.groupby(GROUP, sort=True, dropna=False).size().rename("count").reset_index()
    return out.assign(threshold=threshold)


def _sample(keys: pd.DataFrame, values: np.ndarray) -> pd.DataFrame:
    """The rows of the first :data:`SAMPLE_SEQS` sequences (value in ``sum``)."""
    keep = keys["seq"].to_numpy() < SAMPLE_SEQS
    return keys[keep].assign(sum=values[keep], count=1).reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Merged aggregates of a metric


@dataclass
class Aggregates:
    """The merged aggregates of one metric (frames per kind; ``direction`` a Categorical in the
    run's direction order)."""

    metric: str
    moments: pd.DataFrame
    sketch: pd.DataFrame
    seq: pd.DataFrame
    threshold: pd.DataFrame
    sample: pd.DataFrame
    alpha: float = DEFAULT_ALPHA
    labels: list[str] = field(default_factory=list)

    @property
    def grid(self) -> np.ndarray:
        """The lengths with kept rows (of finite value), sorted."""
        return np.sort(self.moments.loc[self.moments["count"] > 0, "length"].unique())


def _kind(table: pd.DataFrame, kind: str, columns: list[str]) -> pd.DataFrame:
    return table.loc[table["kind"] == kind, columns].reset_index(drop=True)


_COLUMNS = {
    "moments": [*GROUP, "count", "n_nan", "sum", "m2", "min", "max"],
    "sketch": [*GROUP, "sign", "bucket", "count"],
    "seq": [*GROUP, "seq", "count", "n_nan", "sum"],
    "threshold": [*GROUP, "count", "threshold"],
    "sample": ["seq", "pos", *GROUP, "sum"],
}


def split(table: pa.Table, metric: str) -> dict[str, pd.DataFrame]:
    """One metric's frames per kind from an aggregate table (:func:`aggregate_rows`)."""
    frame = table.filter(pc.equal(table.column("metric"), metric)).to_pandas()
    frame["direction"] = frame["direction"].astype(str)
    out = {k: _kind(frame, k, cols) for k, cols in _COLUMNS.items()}
    for k in ("moments", "seq", "sketch", "threshold"):
        ints = [c for c in ("count", "n_nan", "seq", "bucket") if c in out[k].columns]
        out[k] = out[k].astype(dict.fromkeys(ints, np.int64))
    out["sketch"] = out["sketch"].astype({"sign": np.int8})
    out["sample"] = out["sample"].astype({"seq": np.int64, "pos": np.int64})
    return out


def merge(parts: Sequence[Mapping[str, pd.DataFrame]]) -> dict[str, pd.DataFrame]:
    """Per-shard frames (of :func:`split`) merged exactly: counts, min, max and sketch counts
    exactly; sums and ``m2`` (Chan et al.'s pairwise formula) up to rounding."""
    cat = {k: pd.concat([p[k] for p in parts], ignore_index=True) for k in _COLUMNS}
    out = {"sketch": merge_sketches([cat["sketch"]], GROUP), "sample": cat["sample"]}
    m = cat["moments"]
    g = m.groupby(GROUP, sort=True, observed=True)
    merged = g.agg(
        count=("count", "sum"),
        n_nan=("n_nan", "sum"),
        sum=("sum", "sum"),
        min=("min", "min"),
        max=("max", "max"),
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        part_mean = (m["sum"] / m["count"]).to_numpy()
        mean = (merged["sum"] / merged["count"]).reindex(pd.MultiIndex.from_frame(m[GROUP]))
    between = np.where(m["count"] > 0, m["count"] * (part_mean - mean.to_numpy()) ** 2, 0.0)
    merged["m2"] = m.assign(_b=between).groupby(GROUP, sort=True)[["m2", "_b"]].sum().sum(axis=1)
    out["moments"] = merged.reset_index()[_COLUMNS["moments"]]
    seq_keys = [*GROUP, "seq"]
    s = cat["seq"]
    if s.duplicated(seq_keys).any():  # a group split over shards (not the engine's layout)
        s = s.groupby(seq_keys, sort=True).sum().reset_index()
    out["seq"] = s.sort_values(seq_keys, ignore_index=True)
    t = cat["threshold"].groupby([*GROUP, "threshold"], sort=True, dropna=False)["count"].sum()
    out["threshold"] = t.reset_index()[_COLUMNS["threshold"]]
    return out


def _shard_tables(run_dir: Path, manifest: dict, metrics: Sequence[str]) -> Iterator[pa.Table]:
    """Each shard's aggregate table of ``metrics``: read (aggregate runs) or made from its rows
    (one read per shard, whatever the number of metrics)."""
    if results_mode(manifest) == "aggregate":
        columns = [f.name for f in SCHEMA]
        wanted = [("metric", "in", list(metrics))]
        batches = iter_batches(run_dir, columns, wanted, manifest=manifest)
        for _, group in itertools.groupby(batches, key=lambda item: item[0]):
            yield pa.Table.from_batches([b for _, b in group])
        return
    columns = ["seq", "pos", "direction", "length", *metrics]
    if NONFINITE in shard_columns(run_dir, manifest):
        columns.append(NONFINITE)  # flagged rows are left out, as by summary_rows
    batches = iter_batches(run_dir, columns, summary_filters(manifest["meta"]), manifest=manifest)
    for _, group in itertools.groupby(batches, key=lambda item: item[0]):
        table = pa.Table.from_batches([b for _, b in group])
        yield aggregate_rows(table, metrics, manifest["meta"])


def _sketch_frames(
    run_dir: Path, manifest: dict, metrics: Sequence[str]
) -> dict[str, list[pd.DataFrame]]:
    """Per metric, the sketch frames (as :func:`split` gives them) kept outside the shards: the
    run-level sketch and the shards' sketch files it does not cover (merged as they come)."""
    held: dict[str, list[pd.DataFrame]] = {m: [] for m in metrics}
    for table in sketch_tables(run_dir, manifest, metrics):
        for metric, frames in held.items():
            frame = table.filter(pc.equal(table.column("metric"), metric)).to_pandas()
            frame = frame[_COLUMNS["sketch"]].astype({"direction": str, "bucket": np.int64})
            frames.append(frame)
            if len(frames) >= _MERGE_EVERY:
                held[metric] = [merge_sketches(frames, GROUP)]
    return held


def run_metric_aggregates(run_dir: str | Path, metrics: Sequence[str]) -> dict[str, Aggregates]:
    """The merged aggregates of each of ``metrics`` over a run, in one pass over its shards in
    either result mode (a rows run's shards are read column-pruned and aggregated one at a time:
    memory grows with the groups and sequences, not with the rows), with its sketch files.

    One manifest is read for all files; if a writer changes the run meanwhile (a compaction
    removes the sketch files it merged), the run is read again.
    """
    run_dir = Path(run_dir)
    for attempt in range(_READ_TRIES):
        manifest = load_manifest(run_dir)
        try:
            return _metric_aggregates(run_dir, manifest, metrics)
        except ChecksumError:
            if attempt + 1 == _READ_TRIES or load_manifest(run_dir) == manifest:
                raise
    raise AssertionError("unreachable")


def _metric_aggregates(
    run_dir: Path, manifest: dict, metrics: Sequence[str]
) -> dict[str, Aggregates]:
    """:func:`run_metric_aggregates` of the files ``manifest`` lists."""
    labels = list(run_directions(manifest))
    parts: dict[str, list[dict[str, pd.DataFrame]]] = {m: [] for m in metrics}
    for table in _shard_tables(run_dir, manifest, metrics):
        for metric, held in parts.items():
            held.append(split(table, metric))
            if len(held) >= _MERGE_EVERY:
                parts[metric] = [merge(held)]
    sketches = _sketch_frames(run_dir, manifest, metrics)
    out = {}
    for metric, held in parts.items():
        if not held:
            raise ValueError(f"{run_dir} has no finished shard yet: run or resume it first")
        merged = merge(held)
        if sketches[metric]:  # exact: integer counts added, sorted by key
            inline = [merged["sketch"]] if len(merged["sketch"]) else []
            merged["sketch"] = merge_sketches([*inline, *sketches[metric]], GROUP)
        seen = {str(d) for frame in merged.values() for d in frame["direction"].unique()}
        labels = [*labels, *sorted(seen - set(labels))]  # rows an experiment labels itself
        for frame in merged.values():
            frame["direction"] = pd.Categorical(frame["direction"], categories=labels)
        out[metric] = Aggregates(metric, **merged, labels=labels)
    return out


def run_aggregates(run_dir: str | Path, metric: str = "kl") -> Aggregates:
    """The merged aggregates of one metric over a run (:func:`run_metric_aggregates`)."""
    return run_metric_aggregates(run_dir, [metric])[metric]


# ---------------------------------------------------------------------------------------------
# Curves and tables from aggregates


def aggregate_curves(
    agg: Aggregates,
    *,
    stat: Sequence[str] = ("mean", "median", "q05", "q25", "q75", "q95"),
    ci: float | None = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per (direction, length): ``n`` and ``stat`` in the layout of
    :func:`~perturb_lens.analysis.tables.curves`.

    ``mean``, ``std``, ``min``, ``max`` are exact (from the moments); ``median`` and ``qXX`` come
    from the sketch (within its relative error, :mod:`~perturb_lens.results.sketch`).
    ``ci_low``/``ci_high``: a percentile bootstrap of the mean resampling *sequences* (their
    per-sequence sums and counts; tokens of one sequence are not independent), ``n_boot``
    resamples from ``seed``, shared by all groups; ``ci_method`` is ``sequence-bootstrap``. NaN
    where fewer than 2 sequences have rows.
    """
    m = agg.moments[agg.moments["count"] > 0].sort_values(GROUP, ignore_index=True)
    out = m[GROUP].copy()
    out["n"] = m["count"].to_numpy()
    n = m["count"].to_numpy(np.float64)
    exact = {
        "mean": m["sum"].to_numpy() / n,
        "std": np.sqrt(m["m2"].to_numpy() / (n - 1)) if (n > 1).all() else _std(m),
        "min": m["min"].to_numpy(),
        "max": m["max"].to_numpy(),
    }
    wanted = {name: _quantile(name) for name in stat if name not in exact}
    wanted = {k: 0.5 if k == "median" else q for k, q in wanted.items()}
    bad = [k for k, q in wanted.items() if q is None]
    if bad:
        raise ValueError(f"unknown statistic {bad[0]!r}: use mean, median, std, min, max or qXX")
    if wanted:
        bounds = m.set_index(GROUP)[["min", "max"]]
        q = sketch_quantiles(agg.sketch, GROUP, list(wanted.values()), agg.alpha, bounds=bounds)
        q = q.set_index(GROUP).reindex(pd.MultiIndex.from_frame(m[GROUP]))
    for name in stat:
        out[name] = exact[name] if name in exact else q[str(wanted[name])].to_numpy()
    if ci is not None:
        if not 0.0 < ci < 1.0:
            raise ValueError(f"ci must be in (0, 1), got {ci}")
        out["ci_low"], out["ci_high"] = sequence_ci(agg.seq, out[GROUP], ci, n_boot, seed)
        out["ci_method"] = "sequence-bootstrap"
    out.attrs.update(metric=agg.metric, ci=ci, n_boot=n_boot, seed=seed, alpha=agg.alpha)
    return out


def _std(m: pd.DataFrame) -> np.ndarray:
    n = m["count"].to_numpy(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 1, np.sqrt(m["m2"].to_numpy() / (n - 1)), np.nan)


def sequence_ci(
    seq: pd.DataFrame, groups: pd.DataFrame, ci: float, n_boot: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``ci`` percentile-bootstrap interval of each group's mean (sum of its sequences' sums over
    the sum of their counts), resampling sequences; rows of ``groups`` are (direction, length)."""
    seqs = np.sort(seq["seq"].unique())
    index = pd.MultiIndex.from_frame(groups)
    j = index.get_indexer(pd.MultiIndex.from_frame(seq[GROUP]))
    keep = j >= 0
    i = np.searchsorted(seqs, seq["seq"].to_numpy()[keep])
    sums, counts = np.zeros((seqs.size, len(index))), np.zeros((seqs.size, len(index)))
    sums[i, j[keep]] = seq["sum"].to_numpy()[keep]
    counts[i, j[keep]] = seq["count"].to_numpy()[keep]
    boot = np.empty((n_boot, len(index)))
    with np.errstate(invalid="ignore", divide="ignore"):
        for start, w in resample_weights(seqs.size, n_boot, seed):
            boot[start : start + w.shape[0]] = (w @ sums) / (w @ counts)
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.full(len(index), np.nan), np.full(len(index), np.nan)
    enough = (counts > 0).sum(axis=0) >= 2
    if enough.any():
        lo[enough], hi[enough] = np.nanquantile(boot[:, enough], [alpha, 1.0 - alpha], axis=0)
    return lo, hi


def threshold_table(agg: Aggregates) -> pd.DataFrame:
    """Per direction and first-crossing length: tokens (``length`` NaN: never crossed)."""
    if agg.threshold.empty:
        raise ValueError(f"metric {agg.metric!r} has no registered threshold: no crossing counts")
    return agg.threshold


def threshold_summary(
    agg: Aggregates, stat: Sequence[str] = ("median", "q05", "q25", "q75", "q95")
) -> pd.DataFrame:
    """:func:`~perturb_lens.analysis.tables.threshold_summary` from the crossing counts (exact:
    the first lengths are grid values): per direction ``n``, ``frac_never``, ``n_crossed``,
    ``stat``."""
    t = threshold_table(agg)
    by_dir = t.groupby("direction", observed=True, sort=True)["count"]
    out = pd.DataFrame({"n": by_dir.sum()})
    crossed = t[t["length"].notna()].sort_values(GROUP, ignore_index=True)
    out["n_crossed"] = crossed.groupby("direction", observed=True)["count"].sum()
    out["n_crossed"] = out["n_crossed"].fillna(0).astype(np.int64)
    out.insert(1, "frac_never", 1.0 - out["n_crossed"] / out["n"])
    qs = [0.5 if s == "median" else _quantile(s) for s in stat]
    codes = out.index.get_indexer(crossed["direction"])
    vals = counted_quantiles(
        codes, crossed["length"].to_numpy(), crossed["count"].to_numpy(), qs, len(out)
    )
    for k, name in enumerate(stat):
        out[name] = vals[:, k]
    out = out.reset_index()
    out.attrs.update(metric=agg.metric, threshold=float(t["threshold"].iloc[0]))
    return out


def threshold_histogram(agg: Aggregates, edges: np.ndarray) -> pd.DataFrame:
    """:func:`~perturb_lens.analysis.tables.histograms` (``right=True``) of the first-crossing
    lengths per direction on ``edges``, from the crossing counts."""
    t = threshold_table(agg)
    edges = np.asarray(edges, np.float64)
    frames = []
    for direction, g in t.groupby("direction", observed=True, sort=True):
        crossed = g[g["length"].notna()]
        idx = np.searchsorted(edges, crossed["length"].to_numpy(), side="left") - 1
        ok = (idx >= 0) & (idx < edges.size - 1)
        count = np.bincount(
            idx[ok], weights=crossed["count"].to_numpy()[ok], minlength=edges.size - 1
        )
        frame = pd.DataFrame(
            {
                "direction": direction,
                "bin_left": edges[:-1],
                "bin_right": edges[1:],
                "count": count.astype(np.int64),
                "n": int(crossed["count"].sum()),
                "n_total": int(g["count"].sum()),
            }
        )
        frames.append(frame)
    out = pd.concat(frames, ignore_index=True)
    out["direction"] = pd.Categorical(out["direction"], categories=agg.labels)
    width = out["bin_right"] - out["bin_left"]
    out["fraction"] = out["count"] / out["n_total"]
    out["density"] = (out["count"] / (out["n"] * width)).where(out["n"] > 0, 0.0)
    out.attrs["column"] = "threshold_length"
    return out


def sample_rows(agg: Aggregates) -> pd.DataFrame:
    """The kept rows of the first :data:`SAMPLE_SEQS` sequences: seq, pos, direction, length and
    the metric (for token curves)."""
    out = agg.sample.rename(columns={"sum": agg.metric})
    return out.sort_values(["seq", "pos", *GROUP], ignore_index=True)


def run_summary_table(
    run_dir: str | Path, metric: str, lengths: Sequence[float] | None = None
) -> pd.DataFrame:
    """:func:`~perturb_lens.analysis.tables.summary_table` of one metric of a run, streamed
    (either result mode)."""
    agg = run_aggregates(run_dir, metric)
    cv = aggregate_curves(agg, stat=("mean",), ci=None)
    return summary_means(cv, metric, pick_lengths(pd.DataFrame({"length": agg.grid}), lengths))


def summary_means(curves: pd.DataFrame, metric: str, picked: Iterable[float]) -> pd.DataFrame:
    """:func:`~perturb_lens.analysis.tables.summary_table` of one metric from its curves: mean
    per direction (index) at the ``picked`` grid lengths, columns ``{metric}@{length:g}``."""
    wide = curves.pivot_table(index="direction", columns="length", values="mean", observed=True)
    return pd.DataFrame({f"{metric}@{float(x):g}": wide[x] for x in picked}, index=wide.index)
