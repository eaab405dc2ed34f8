"""SAE-substitution figures, ``compare`` of runs with a ``size`` column and SAE suites read the
streamed aggregates, never every row: their numbers equal pandas on the rows (means, counts) and a
plain sequence bootstrap (intervals), and a rows run and an aggregate run of the same rows give the
same figures and summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synthetic_runs import make_run, small_config, synthetic_rows

from perturb_lens.config.schema import load_config, validate_config
from perturb_lens.plots import figures_for
from perturb_lens.plots.registry import RunReader
from perturb_lens.plots.report import compare_plots
from perturb_lens.plots.suite import suite_figures
from perturb_lens.results import ResultStore, config_hash
from perturb_lens.results.aggregate import aggregate_rows
from perturb_lens.results.summary import summary_rows
from perturb_lens.workflows.sae_suite import suite_summary

SUBSTITUTION = ["SAE(x)", "isotropic", "cov-random-mixture", "real-mixture"]
N_BOOT = 1000  # the figures' default resamples (seed 0)


def _mean_rtol(n: int) -> float:
    """Means of ``n`` float32 values summed in float64 in two orders: each sum errs by at most
    n x 2^-53 of the sum of magnitudes (values here are positive, so of the sum)."""
    return 2 * n * 2.0**-53


def naive_ci(rows: pd.DataFrame, column: str) -> tuple[float, float]:
    """95 % percentile bootstrap of the mean of ``column`` resampling sequences, written plainly:
    resample b draws sequences ``rng.integers(0, k, k)`` (seed 0, all resamples in one array)."""
    values = rows.astype({column: np.float64})
    per_seq = values.groupby("seq")[column].agg(["sum", "count"]).sort_index()
    sums, counts = per_seq["sum"].to_numpy(np.float64), per_seq["count"].to_numpy(np.float64)
    draws = np.random.default_rng(0).integers(0, len(per_seq), size=(N_BOOT, len(per_seq)))
    means = [sums[d].sum() / counts[d].sum() for d in draws]
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def substitution_rows(seed: int, *, size_scale: float = 1.0) -> pd.DataFrame:
    """SAE(x) and three epsilon-baselines at one length: KL (exponential) and ``size``."""
    rng = np.random.default_rng(seed)
    rows = pd.MultiIndex.from_product(
        [range(6), range(5), SUBSTITUTION, [1.0]], names=["seq", "pos", "direction", "length"]
    ).to_frame(index=False)
    rows["kl"] = rng.exponential(size=len(rows)).astype(np.float32) * (seed + 1)
    rows["size"] = (rng.random(len(rows)) + 3 * size_scale).astype(np.float32)
    return rows


def substitution_config() -> dict:
    cfg = {**small_config(), "metrics": ["kl"]}
    cfg["directions"] = [{"name": "sae-error", "scale": "raw", "label": "SAE(x)"}] + [
        {"name": d, "scale": "sae-error"} for d in SUBSTITUTION[1:]
    ]
    return cfg


def aggregate_run(folder: Path, cfg: dict, rows: pd.DataFrame, metrics: list[str]) -> Path:
    """The same rows as an aggregate run (two shards through ``aggregate_rows``, as the runner
    writes them; written directly, since the config refuses some of these shapes up front)."""
    cfg = {**cfg, "results": "aggregate"}
    meta = {
        "scope": cfg["scope"],
        "seq_len": int(rows["pos"].max()) + 1,
        "lengths": sorted(rows["length"].unique().tolist()),
        "hook": "blocks.6.hook_resid_pre",
        "drop_last_position": True,
        "include_bos": True,
    }
    half = rows["seq"].max() // 2
    with ResultStore(folder) as store:
        store.create(cfg, config_hash(cfg), meta, resume=False)
        for i, part in enumerate((rows[rows.seq <= half], rows[rows.seq > half])):
            store.write_shard(f"s{i}", aggregate_rows(part, metrics, meta))
        store.finish()
    return folder


@pytest.fixture
def no_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any figure that reads every row of a run (``RunReader.rows``)."""

    def refuse(self: RunReader) -> None:
        pytest.fail(f"{self.run_dir}: a figure read every row instead of the aggregates")

    monkeypatch.setattr(RunReader, "rows", property(refuse))


def test_substitution_figures_stream_and_agree_across_modes(tmp_path: Path, no_rows) -> None:
    rows = substitution_rows(0)
    cfg = substitution_config()
    rows_run = make_run(tmp_path / "rows", cfg, rows=rows)
    agg_run = aggregate_run(tmp_path / "agg", cfg, rows, ["kl"])
    by_rows = {p.name: p for p in figures_for(rows_run)}
    by_agg = {p.name: p for p in figures_for(agg_run)}
    assert set(by_rows) == {"substitution_kl", "scatter_size_kl"}
    assert set(by_agg) == {"substitution_kl"}  # an aggregate run stores no size

    kept = rows[rows["pos"] < 4]  # the summary rows (the last position is not averaged)
    data = by_rows["substitution_kl"].data.set_index("direction")
    assert list(data.index.astype(str)) == SUBSTITUTION  # the run's direction order
    g = kept.astype({"kl": np.float64}).groupby("direction")["kl"]
    assert (data["n"] == g.count().loc[SUBSTITUTION].to_numpy()).all()
    rtol = _mean_rtol(int(data["n"].max()))
    np.testing.assert_allclose(data["mean"], g.mean().loc[SUBSTITUTION], rtol=rtol)
    for d in SUBSTITUTION:
        ci = naive_ci(kept[kept["direction"] == d], "kl")
        np.testing.assert_allclose(data.loc[d, ["ci_low", "ci_high"]], ci, rtol=rtol)
    heights = [r.get_height() for r in by_rows["substitution_kl"].figure.axes[0].patches]
    np.testing.assert_allclose(heights, data["mean"], rtol=0)  # the bars draw these numbers

    agg = by_agg["substitution_kl"].data.set_index("direction")
    assert (agg["n"] == data["n"]).all()
    assert (agg["median"] == data["median"]).all()  # the same sketch, merged exactly
    cols = ["mean", "ci_low", "ci_high"]
    np.testing.assert_allclose(agg[cols], data[cols], rtol=rtol)

    points = by_rows["scatter_size_kl"].data.set_index("direction")
    sae = kept[kept["direction"] == "SAE(x)"].astype({"size": np.float64, "kl": np.float64})
    assert list(points.index) == ["SAE(x)"] and points.loc["SAE(x)", "n"] == len(sae)
    for col in ("size", "kl"):
        np.testing.assert_allclose(points.loc["SAE(x)", f"{col}_mean"], sae[col].mean(), rtol=rtol)
        ci = points.loc["SAE(x)", [f"{col}_ci_low", f"{col}_ci_high"]]
        np.testing.assert_allclose(ci.to_numpy(float), naive_ci(sae, col), rtol=rtol)


def test_compare_with_size_streams_the_scatter(tmp_path: Path, no_rows) -> None:
    """The per-run point of supplementary figure 3 pools each run's SAE directions over every
    length (two SAE directions, two lengths here)."""
    names = ["sae-error", "sae-feature", "isotropic"]
    cfg = {**load_config().model_dump(mode="json"), "metrics": ["kl"]}
    cfg["directions"] = [{"name": n} for n in names]
    runs = []
    for i in range(2):
        rows = synthetic_rows(names, lengths=[1.0, 2.0], n_seq=5, seed=i)
        rows["size"] = (np.random.default_rng(i).random(len(rows)) + i + 1).astype(np.float32)
        runs.append(
            make_run(tmp_path / f"run{i}", cfg, rows=rows, hook=f"blocks.{i}.hook_resid_pre")
        )
    views = [RunReader(r, f"L{i}") for i, r in enumerate(runs)]
    plots = {p.name: p for p in compare_plots(views, "kl")}
    points = plots["scatter_size_kl"].data.set_index("run")
    assert list(points.index) == ["L0", "L1"]
    for view in views:
        rows = summary_rows(view.run_dir)
        sae = rows[rows["direction"].isin(["sae-error", "sae-feature"])]
        assert points.loc[view.label, "n"] == len(sae)
        rtol = _mean_rtol(len(sae))
        for col in ("size", "kl"):
            got = points.loc[view.label, [f"{col}_mean", f"{col}_ci_low", f"{col}_ci_high"]]
            expect = [sae[col].astype(np.float64).mean(), *naive_ci(sae, col)]
            np.testing.assert_allclose(got.to_numpy(float), expect, rtol=rtol)


def _suite(folder: Path, *, aggregate: bool) -> Path:
    """Two SAE error-extrapolation runs (``saes.json``: type and L0), rows or aggregate mode."""
    names = ["sae-error", "isotropic"]
    cfg = validate_config({"directions": names, "metrics": ["kl", "l2"]}).model_dump(mode="json")
    folder.mkdir()
    for i, label in enumerate(["local-a", "local-b"]):
        rows = synthetic_rows(names, seed=i)
        if aggregate:
            aggregate_run(folder / label, cfg, rows, ["kl", "l2"])
        else:
            make_run(folder / label, cfg, rows=rows)
    records = [{"label": "local-a", "type": "local", "l0": 10.0}, {"label": "local-b", "l0": 30.0}]
    (folder / "saes.json").write_text(json.dumps(records))
    return folder


def test_sae_suite_over_aggregate_runs(tmp_path: Path, no_rows) -> None:
    rows_suite, agg_suite = (
        _suite(tmp_path / "rows", aggregate=False),
        _suite(tmp_path / "agg", aggregate=True),
    )
    by_rows, by_agg = (suite_summary(s, reference="sae-error") for s in (rows_suite, agg_suite))
    keys = ["sae", "direction", "length"]
    by_rows, by_agg = by_rows.set_index(keys), by_agg.set_index(keys)
    assert by_rows.index.equals(by_agg.index) and list(by_rows.columns) == list(by_agg.columns)
    rtol = _mean_rtol(5 * 4)  # 4 sequences x 5 summary positions per group
    for label in ("local-a", "local-b"):
        rows = summary_rows(rows_suite / label).astype({"kl": np.float64, "l2": np.float64})
        expect = rows.groupby(["direction", "length"], observed=True)[["kl", "l2"]].mean()
        got = by_rows.loc[label]
        np.testing.assert_allclose(got[["kl", "l2"]], expect.loc[got.index], rtol=rtol)
    np.testing.assert_allclose(by_agg[["kl", "l2"]], by_rows[["kl", "l2"]], rtol=rtol)
    ref = by_rows.xs("sae-error", level="direction")["kl"]
    ratio = ref.reindex(by_rows.index.droplevel("direction")).to_numpy() / by_rows["kl"]
    np.testing.assert_allclose(by_rows["ratio_kl"], ratio, rtol=0)
    np.testing.assert_allclose(by_agg["ratio_kl"], by_rows["ratio_kl"], rtol=2 * rtol)

    (fig_rows,), (fig_agg,) = (suite_figures(s, metrics=("kl",)) for s in (rows_suite, agg_suite))
    cols = ["sae", "direction", "length", "n", "mean", "ci_low", "ci_high"]
    a, b = fig_rows.data[cols], fig_agg.data[cols]
    pd.testing.assert_frame_equal(a.drop(columns=cols[4:]), b.drop(columns=cols[4:]))
    np.testing.assert_allclose(a[cols[4:]], b[cols[4:]], rtol=rtol)
