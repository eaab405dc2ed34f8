"""Aggregate result mode: the quantile sketch against numpy, merged shard aggregates against the
aggregate of all rows and against pandas on the rows, and real runs in both result modes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_files, run_in_subprocess, shard_hashes
from hypothesis import given, settings
from hypothesis import strategies as st
from synthetic_runs import make_run

from perturb_lens.analysis import claim_intervals
from perturb_lens.analysis.tables import curves, histograms, threshold_lengths
from perturb_lens.analysis.tables import threshold_summary as rows_threshold_summary
from perturb_lens.config.schema import ConfigError, validate_config
from perturb_lens.plots.registry import RunReader, figures_for
from perturb_lens.results import ResultStore, config_hash, load_manifest
from perturb_lens.results.aggregate import (
    SAMPLE_SEQS,
    aggregate_curves,
    aggregate_rows,
    merge,
    run_aggregates,
    split,
    threshold_histogram,
    threshold_summary,
)
from perturb_lens.results.sketch import DEFAULT_ALPHA, sketch, sketch_quantiles
from perturb_lens.results.summary import summary_rows
from perturb_lens.workflows.experiment import run_experiment

QS = [0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0]
META = {"scope": "all-positions", "seq_len": 6, "drop_last_position": True, "include_bos": True}
GROUP = ["direction", "length"]


def _bound(sorted_values: np.ndarray, q: float, alpha: float) -> float:
    """The sketch's documented error at quantile q: alpha ((1 - f)|x_(i)| + f |x_(i+1)|)."""
    n = sorted_values.size
    h = q * (n - 1)
    i = int(np.floor(h))
    f = h - i
    return alpha * ((1 - f) * abs(sorted_values[i]) + f * abs(sorted_values[min(i + 1, n - 1)]))


def _check_sketch(values: np.ndarray, groups: np.ndarray, alpha: float = DEFAULT_ALPHA) -> None:
    sk = sketch(groups, values, alpha).rename(columns={"code": "g"})
    bounds = pd.DataFrame({"g": groups, "x": values}).groupby("g")["x"].agg(["min", "max"])
    got = sketch_quantiles(sk, ["g"], QS, alpha, bounds=bounds).set_index("g")
    for g in np.unique(groups):
        v = np.sort(values[groups == g])
        for q in QS:
            true = np.quantile(v, q)
            # 1e-9 relative slack: log() rounding can move a value on a bucket edge to its
            # neighbour (error ~1e-16 relative, far below this). Plus one ulp of the true value:
            # both sides interpolate in float64 and round to the nearest double, and among the
            # subnormals (e.g. the median of 0 and 5e-324) the relative bound underflows to 0
            # while the two roundings may differ by that one ulp.
            tol = _bound(v, q, alpha) * (1 + 1e-9) + np.spacing(abs(true))
            assert abs(got.loc[g, str(q)] - true) <= tol, (g, q, got.loc[g, str(q)], true)


def test_sketch_quantiles_on_adversarial_data() -> None:
    rng = np.random.default_rng(1)
    gamma = (1 + DEFAULT_ALPHA) / (1 - DEFAULT_ALPHA)
    parts = [
        rng.pareto(0.3, 4000) * 1e-6,  # heavy tail over ~20 decades
        -rng.lognormal(0.0, 8.0, 2000),  # negatives over many decades
        np.zeros(1500),  # zeros (a third of one group)
        np.full(800, 2.5),  # ties
        gamma ** rng.integers(-200, 200, 600).astype(float),  # exactly on bucket edges
        np.array([5e-324, 1e300, -1e300, np.finfo(float).tiny]),  # extremes
    ]
    values = np.concatenate(parts)
    groups = rng.integers(0, 4, values.size)
    groups[-4:] = 0
    _check_sketch(values, groups)
    _check_sketch(np.zeros(10), np.zeros(10, np.int64))  # only zeros
    _check_sketch(np.array([-3.0, 4.0]), np.zeros(2, np.int64))  # a sign change between two


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(-1e12, 1e12, allow_nan=False),
            st.sampled_from([0.0, 1.0, -1.0, 1e-300]),
        ),
        min_size=1,
        max_size=300,
    ),
    st.sampled_from([0.001, DEFAULT_ALPHA, 0.05]),
)
def test_sketch_quantiles_within_bound_property(values: list[float], alpha: float) -> None:
    v = np.asarray(values)
    _check_sketch(v, np.arange(v.size) % 2, alpha)


def _rows(n_seq: int = 9, seq_len: int = 6, seed: int = 0) -> pd.DataFrame:
    """Rows with heavy-tailed, tied, zero and NaN values, and one flagged non-finite row."""
    rng = np.random.default_rng(seed)
    idx = pd.MultiIndex.from_product(
        [range(n_seq), range(seq_len), ["a", "b", "c"], [0.0, 1.0, 3.0, 9.0]],
        names=["seq", "pos", "direction", "length"],
    ).to_frame(index=False)
    kl = rng.pareto(1.5, len(idx)) * idx["length"] / 9
    kl[rng.random(len(idx)) < 0.1] = 0.25  # ties
    idx["kl"] = kl.astype(np.float32)
    idx["dce"] = rng.standard_t(2, len(idx)) * idx["length"]  # negatives, threshold 0.1
    idx.loc[7, "dce"] = np.nan
    idx["nonfinite"] = False
    idx.loc[7, "nonfinite"] = True
    idx["direction"] = pd.Categorical(idx["direction"], categories=["a", "b", "c"])
    return idx


def _kept(rows: pd.DataFrame) -> pd.DataFrame:
    """The summary rows by hand: last position dropped, flagged rows dropped."""
    keep = (rows["pos"] < META["seq_len"] - 1) & ~rows["nonfinite"]
    return rows[keep].reset_index(drop=True)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=9, max_size=9), st.integers(0, 10**6))
def test_merged_shards_equal_the_aggregate_of_all_rows(shard_of_seq: list[int], seed: int) -> None:
    """Any split of the sequences over shards merges to the aggregate of all rows."""
    rows = _rows(seed=seed)
    whole = split(aggregate_rows(rows, ["kl", "dce"], META), "kl")
    shard = np.asarray(shard_of_seq)[rows["seq"].to_numpy()]
    parts = [
        split(aggregate_rows(rows[shard == s], ["kl", "dce"], META), "kl")
        for s in np.unique(shard)[::-1]  # any order
    ]
    merged = merge(parts)
    one = merge([whole])
    m, w = merged["moments"], one["moments"]
    for col in ("direction", "length", "count", "n_nan", "min", "max"):
        np.testing.assert_array_equal(m[col], w[col])
    # float64 sums in another order: 1e-12 relative (a few ulp per term over <= 50 terms)
    np.testing.assert_allclose(m["sum"], w["sum"], rtol=1e-12, atol=1e-300)
    # m2 merged by Chan's formula: the between-shard term n_i (mean_i - mean)^2 rounds relative
    # to the means (not to m2), so 1e-10 leaves room for spreads 100x below the mean
    np.testing.assert_allclose(m["m2"], w["m2"], rtol=1e-10, atol=1e-300)
    pd.testing.assert_frame_equal(merged["sketch"], one["sketch"])
    pd.testing.assert_frame_equal(merged["threshold"], one["threshold"])
    s, ws = merged["seq"], one["seq"]
    pd.testing.assert_frame_equal(s.drop(columns="sum"), ws.drop(columns="sum"))
    np.testing.assert_allclose(s["sum"], ws["sum"], rtol=1e-12)


def test_aggregate_matches_pandas_on_the_rows() -> None:
    """Moments, quantiles, crossings against pandas/numpy on the summary rows (independent)."""
    rows = _rows()
    kept = _kept(rows)
    for metric in ("kl", "dce"):
        agg = split(aggregate_rows(rows, ["kl", "dce"], META), metric)
        m = merge([agg])["moments"].set_index(GROUP)
        x = kept.astype({metric: np.float64}).groupby(GROUP, observed=True)[metric]
        np.testing.assert_array_equal(m["count"], x.count())
        np.testing.assert_array_equal(m["min"], x.min())
        np.testing.assert_array_equal(m["max"], x.max())
        np.testing.assert_allclose(m["sum"], x.sum(), rtol=1e-12)
        # two-pass m2 against pandas' variance: 1e-12 relative
        np.testing.assert_allclose(m["m2"] / (m["count"] - 1), x.var(), rtol=1e-12)
        crossing = threshold_lengths(kept, metric, threshold=0.1)
        n_units = crossing.groupby("direction", observed=True).size()
        t = agg["threshold"].groupby("direction")["count"].sum()
        np.testing.assert_array_equal(t.to_numpy(), n_units.to_numpy())


def _synthetic_run(folder: Path, rows: pd.DataFrame, results: str) -> Path:
    cfg = validate_config(
        {"directions": ["a", "b", "c"], "metrics": ["kl", "dce"], "results": results}
    ).model_dump(mode="json")
    if results == "rows":
        return make_run(folder, cfg, rows=rows)
    meta = {"scope": "all-positions", "seq_len": 6, "lengths": [0.0, 1.0, 3.0, 9.0]}
    with ResultStore(folder) as store:
        store.create(cfg, config_hash(cfg), meta, resume=False)
        for i, part in enumerate((rows[rows.seq < 5], rows[rows.seq >= 5])):
            store.write_shard(f"s{i}", aggregate_rows(part, ["kl", "dce"], meta))
        store.finish()
    return folder


@pytest.fixture(scope="module")
def synthetic_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    rows = _rows()
    root = tmp_path_factory.mktemp("pair")
    return _synthetic_run(root / "rows", rows, "rows"), _synthetic_run(
        root / "agg", rows, "aggregate"
    )


def test_curves_from_aggregates_match_analysis_curves(synthetic_pair: tuple[Path, Path]) -> None:
    rows_run, agg_run = synthetic_pair
    kept = summary_rows(rows_run)
    for metric in ("kl", "dce"):
        ref = curves(kept, metric, stat=("mean", "std", "min", "max", "median", "q05", "q95"))
        for run in (rows_run, agg_run):
            got = aggregate_curves(
                run_aggregates(run, metric),
                stat=("mean", "std", "min", "max", "median", "q05", "q95"),
            )
            assert got["direction"].astype(str).tolist() == ref["direction"].astype(str).tolist()
            np.testing.assert_array_equal(got["n"], ref["n"])
            np.testing.assert_array_equal(got[["min", "max"]], ref[["min", "max"]])
            np.testing.assert_allclose(got["mean"], ref["mean"], rtol=1e-12, atol=1e-300)
            np.testing.assert_allclose(got["std"], ref["std"], rtol=1e-12)
            for name, q in (("median", 0.5), ("q05", 0.05), ("q95", 0.95)):
                for (d, length), g in kept.groupby(GROUP, observed=True):
                    v = np.sort(g[metric].to_numpy(np.float64))
                    row = got[(got.direction == d) & (got.length == length)].iloc[0]
                    assert abs(row[name] - np.quantile(v, q)) <= _bound(v, q, DEFAULT_ALPHA) * (
                        1 + 1e-9
                    )


def test_sequence_bootstrap_matches_a_naive_one(synthetic_pair: tuple[Path, Path]) -> None:
    """The curves' interval: resample sequences (with the shared draws), ratio of sums."""
    _, agg_run = synthetic_pair
    got = aggregate_curves(run_aggregates(agg_run, "kl"), ci=0.9, n_boot=200, seed=3)
    kept = _kept(_rows())
    seqs = np.sort(kept["seq"].unique())
    rng = np.random.default_rng(3)
    draws = rng.integers(0, seqs.size, size=(200, seqs.size))  # the same stream, one chunk
    for _, row in got.iterrows():
        g = kept[(kept.direction == row.direction) & (kept.length == row.length)]
        s = np.array([g.loc[g.seq == q, "kl"].astype(np.float64).sum() for q in seqs])
        n = np.array([(g.seq == q).sum() for q in seqs])
        means = [s[d].sum() / n[d].sum() for d in draws]
        lo, hi = np.quantile(means, [0.05, 0.95])
        np.testing.assert_allclose([row.ci_low, row.ci_high], [lo, hi], rtol=1e-12)
    assert (got["ci_method"] == "sequence-bootstrap").all()


def test_threshold_tables_match_the_rows(synthetic_pair: tuple[Path, Path]) -> None:
    rows_run, agg_run = synthetic_pair
    kept = summary_rows(rows_run)
    tl = threshold_lengths(kept, "kl", threshold=0.1)
    edges = np.r_[-1.0, 0.0, 1.0, 3.0, 9.0]
    ref_hist = histograms(tl, "threshold_length", bins=edges, right=True)
    ref_sum = rows_threshold_summary(kept, "kl", threshold=0.1)
    for run in (rows_run, agg_run):
        agg = run_aggregates(run, "kl")
        hist = threshold_histogram(agg, edges)
        cols = ["count", "n", "n_total", "bin_left", "bin_right"]
        np.testing.assert_array_equal(hist[cols], ref_hist[cols])
        np.testing.assert_allclose(hist[["fraction", "density"]], ref_hist[["fraction", "density"]])
        summ = threshold_summary(agg)
        pd.testing.assert_frame_equal(
            summ.drop(columns="direction"), ref_sum.drop(columns="direction"), check_dtype=False
        )


def test_aggregate_run_reports_like_the_rows_run(synthetic_pair: tuple[Path, Path]) -> None:
    """The same figures from both runs, with the same numbers (token sample included)."""
    rows_run, agg_run = synthetic_pair
    a, b = {p.name: p for p in figures_for(rows_run)}, {p.name: p for p in figures_for(agg_run)}
    assert a.keys() == b.keys() and {"all_kl", "bars_kl", "threshold_kl", "tokens_kl"} <= a.keys()
    for name in a:
        pd.testing.assert_frame_equal(a[name].data, b[name].data, rtol=1e-12)
    view = RunReader(agg_run)
    assert set(view.token_sample("kl")["seq"]) == set(range(SAMPLE_SEQS))
    with pytest.raises(ValueError, match="aggregate run"):
        _ = view.rows
    with pytest.raises(ValueError, match="aggregate run"):
        summary_rows(agg_run)


def test_aggregate_refused_where_figures_need_every_row() -> None:
    with pytest.raises((ConfigError, ValueError), match="results: rows"):
        validate_config({"experiment": "stable-regions", "results": "aggregate"})
    with pytest.raises((ConfigError, ValueError), match=r"one-length run.*results: rows"):
        validate_config({"lengths": [5.0], "results": "aggregate"})
    assert validate_config({"results": "aggregate"}).results == "aggregate"
    assert validate_config({}).results == "rows"


def test_aggregate_shards_are_much_smaller() -> None:
    """A shard of 64 sequences x 128 positions: the sketch's buckets, not the rows, set the size."""
    rows = _rows(n_seq=64, seq_len=128)
    rows = rows[rows.seq >= SAMPLE_SEQS]  # a shard past the token sample
    meta = {**META, "seq_len": 128}
    sizes = {}
    for name, table in (
        ("rows", pa.Table.from_pandas(rows, preserve_index=False)),
        ("aggregate", aggregate_rows(rows, ["kl", "dce"], meta)),
    ):
        buf = io.BytesIO()
        pq.write_table(table, buf)  # as ResultStore.write_shard writes them
        sizes[name] = buf.tell()
    assert sizes["aggregate"] * 3 < sizes["rows"], sizes


# ---------------------------------------------------------------------------------------------
# Real runs (tiny GPT-2)


def test_real_run_same_curves_and_verdicts_in_both_modes(
    shard_reference: Path, aggregate_reference: Path
) -> None:
    for metric in ("kl", "l2"):
        a = aggregate_curves(run_aggregates(shard_reference, metric))
        b = aggregate_curves(run_aggregates(aggregate_reference, metric))
        pd.testing.assert_frame_equal(a, b)  # the same rows, aggregated by the same code
        ref = curves(summary_rows(shard_reference), metric, ci=None)
        np.testing.assert_array_equal(b["n"], ref["n"])
        np.testing.assert_allclose(b["mean"], ref["mean"], rtol=1e-12, atol=1e-300)
    claims = ["real-difference > isotropic", "cov-random-mixture ~ isotropic"]
    pd.testing.assert_frame_equal(
        claim_intervals(shard_reference, claims), claim_intervals(aggregate_reference, claims)
    )


def test_killed_aggregate_run_resumes_identically(
    tmp_path: Path, shard_config: dict, aggregate_reference: Path
) -> None:
    cfg = {**shard_config, "results": "aggregate"}
    run_dir = tmp_path / "killed"
    run_in_subprocess(cfg, run_dir, kill_after_first_shard=True)
    partial = load_manifest(run_dir)
    assert 1 <= len(partial["shards"]) < 4 and not partial["complete"]
    # killed between writing the shards' sketch files and their compaction (at the run's end)
    assert "sketch" not in partial and list((run_dir / "sketches").iterdir())
    run_experiment(cfg, run_dir, resume=True, progress=False)
    assert load_manifest(run_dir)["complete"]
    assert shard_hashes(run_dir) == shard_hashes(aggregate_reference)
    assert run_files(run_dir) == run_files(aggregate_reference)
    assert load_manifest(run_dir)["sketch"] == load_manifest(aggregate_reference)["sketch"]
