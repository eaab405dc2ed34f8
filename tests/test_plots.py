"""Figures, reports and comparisons: every plotted number equals the analysis API's aggregation.

Run directories are synthetic (written with ResultStore from a preset's validated config), so these
tests need no model and take seconds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import EPS32
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.lines import Line2D
from synthetic_runs import REPO, make_run, small_config, tiny_figure_run
from typer.testing import CliRunner

from perturb_lens.analysis import (
    bars,
    curves,
    histograms,
    kde_curves,
    ks_distances,
    scatter_points,
    threshold_lengths,
    token_curves,
)
from perturb_lens.config.schema import BASELINES, load_config
from perturb_lens.experiments import get_experiment
from perturb_lens.plots import (
    Plot,
    figure_set,
    figures_for,
    register_figures,
    registered,
    write_comparison,
    write_report,
)
from perturb_lens.plots.registry import RunReader
from perturb_lens.plots.report import inline_svg, run_labels
from perturb_lens.plots.sets import (
    FIG1_PANELS,
    FIG2_PANELS,
    distribution_plot,
    sharpness_plot,
)
from perturb_lens.plots.style import DIRECTION_COLORS, color_for
from perturb_lens.results.aggregate import aggregate_curves, run_aggregates
from perturb_lens.results.sketch import DEFAULT_ALPHA as SKETCH_ALPHA
from perturb_lens.results.summary import summary_rows


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "layer6")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "small", small_config())


@pytest.fixture(scope="module")
def plots(run_dir: Path) -> dict[str, Plot]:
    return {p.name: p for p in figures_for(run_dir)}


def _lines(plot: Plot) -> dict[str, list[Line2D]]:
    out: dict[str, list[Line2D]] = {}
    for ax in plot.figure.axes:
        for line in ax.get_lines():
            out.setdefault(line.get_label(), []).append(line)
    return out


def _dots(plot: Plot) -> np.ndarray:
    """y values of the median dots of an interval figure."""
    (dots,) = [c for c in plot.figure.axes[0].collections if isinstance(c, PathCollection)]
    return dots.get_offsets()[:, 1]


ALL_PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def preset_run(preset: Path, folder: Path) -> Path:
    """A synthetic run shaped like ``preset`` (an SAE suite: one of its runs): its directions,
    lengths, metrics, scope and experiment; ``size`` when it has SAE directions; plateau bases."""
    from perturb_lens.config.lengths import resolve_lengths
    from perturb_lens.config.schema import read_config_source

    raw = read_config_source(preset)
    if "saes" in raw and "base" not in raw:
        pytest.skip("an SAE training config: it trains SAEs, its runs have no figure set")
    if "saes" in raw:
        raw = {**raw["base"], "sae": raw["saes"][0]["sae"]}
    cfg = {**load_config().model_dump(mode="json"), **raw}
    cfg["directions"] = [{"name": d} if isinstance(d, str) else d for d in cfg["directions"]]
    names = [str(d.get("label") or d["name"]) for d in cfg["directions"]]
    positions = [9] if cfg["scope"] == "last-position" else range(4)
    grid = resolve_lengths(cfg["lengths"])
    idx = [range(3), positions, names, grid]
    keys = ["seq", "pos", "direction", "length"]
    bases = (cfg.get("plateaus") or {}).get("bases")
    if bases:
        idx.append([b if isinstance(b, str) else b.get("label") or b["name"] for b in bases])
        keys.append("base")
    rows = pd.MultiIndex.from_product(idx, names=keys).to_frame(index=False)
    rng = np.random.default_rng(0)
    for metric in cfg["metrics"]:
        rows[metric] = rng.random(len(rows)) + rows["length"]
    if any(str(d["name"]).startswith("sae") for d in cfg["directions"]):
        rows["size"] = rng.random(len(rows)) + 1
    return make_run(folder, cfg, rows=rows)


@pytest.mark.parametrize("preset", ALL_PRESETS, ids=lambda p: p.stem)
def test_each_preset_yields_its_figure_set(preset: Path, tmp_path: Path) -> None:
    run = preset_run(preset, tmp_path / "run")
    view = RunReader(run)
    info = get_experiment(view.experiment)
    assert info.figures in registered()
    names = {p.name for p in figures_for(view)}
    metrics = view.metrics
    if info.curve_stats:  # interpolation experiments
        metric = "l2" if "l2" in metrics else metrics[0]
        expected = {f"dist_{c}" for c in info.curve_stats}
        expected |= {f"all_{metric}", f"quantiles_{metric}", f"tokens_{metric}"}
    elif info.figures == "same-cosine":
        expected = {f"same_cosine_{m}" for m in metrics}
    elif view.rows["length"].nunique() == 1:  # SAE substitution
        expected = {f"substitution_{m}" for m in metrics} | {"scatter_size_kl"}
    else:
        expected = {f"{k}_{m}" for k in ("all", "quantiles", "tokens", "bars") for m in metrics}
        dirs = set(view.rows["direction"].astype(str))
        for fig, panels in (("fig1", FIG1_PANELS), ("fig2", FIG2_PANELS)):
            if dirs & {d for names in panels.values() for d in names}:
                expected |= {f"{fig}_{m}" for m in metrics}
        if "kl" in metrics:
            expected.add("threshold_kl")
    assert expected <= names, expected - names


def test_plotted_curves_equal_the_analysis(run_dir: Path, plots: dict[str, Plot]) -> None:
    """Lines of every curve figure are the numbers of curves(summary_rows(run)) (medians within
    the sketch's error); the bands are the streamed curves' sequence-bootstrap intervals."""
    rows = summary_rows(run_dir)
    assert rows["pos"].max() == 4  # the last position is dropped (published averaging)
    for metric in ("kl", "l2"):
        cv = curves(rows, metric).set_index(["direction", "length"])
        for name in (f"fig1_{metric}", f"fig2_{metric}", f"all_{metric}", f"quantiles_{metric}"):
            lines = _lines(plots[name])
            for label, found in lines.items():
                direction = label.split(" (")[0]
                stat = "median" if label.endswith("(median)") else "mean"
                expect = cv.loc[direction]
                for line in found:
                    np.testing.assert_allclose(line.get_xdata(), expect.index.to_numpy())
                    # means exact up to summation order (1e-12); medians from the quantile
                    # sketch, within its relative error alpha of numpy's (values >= 0 here)
                    rtol = SKETCH_ALPHA * (1 + 1e-9) if stat == "median" else 1e-12
                    np.testing.assert_allclose(
                        line.get_ydata(), expect[stat].to_numpy(), rtol=rtol, atol=1e-300
                    )
        bands = [
            c
            for ax in plots[f"fig1_{metric}"].figure.axes
            for c in ax.collections
            if isinstance(c, PolyCollection)
        ]
        assert bands  # the 95 % bootstrap intervals are drawn
        ys = np.concatenate([b.get_paths()[0].vertices[:, 1] for b in bands])
        # the bands are the sequence-bootstrap intervals of the streamed curves (float64 drawn
        # as they are; 1e-9 is slack only)
        seq_cv = aggregate_curves(run_aggregates(run_dir, metric))
        assert ys.min() >= seq_cv["ci_low"].min() - 1e-9
        assert ys.max() <= seq_cv["ci_high"].max() + 1e-9
    fig1 = {label for label in _lines(plots["fig1_kl"])}
    assert fig1 == {d for names in FIG1_PANELS.values() for d in names}
    assert {label for label in _lines(plots["fig2_kl"])} == {
        d for names in FIG2_PANELS.values() for d in names
    }


def test_token_bar_and_threshold_figures_equal_the_analysis(
    run_dir: Path, plots: dict[str, Plot]
) -> None:
    rows = summary_rows(run_dir)
    tc = token_curves(rows, 5, 0, "kl")
    lines = _lines(plots["tokens_kl"])
    tokens = [v for k, v in lines.items() if k.startswith("token ")]
    assert sum(len(v) for v in tokens) == tc.groupby(["direction", "seq", "pos"]).ngroups
    for line in lines["token seq=0, pos=0"]:
        color = line.get_color()
        direction = next(d for d, c in DIRECTION_COLORS.items() if c.lower() == color.lower())
        d = tc[(tc.direction == direction) & (tc.seq == 0) & (tc.pos == 0)]
        np.testing.assert_allclose(line.get_ydata(), d["kl"])

    b = bars(rows, "kl", [20, 40, 61])
    assert sorted(b["length"].unique()) == [20.0, 40.0, 61.0]  # 20, 40, 61 of a grid to 91
    heights = [
        (ax.get_title(), r.get_height()) for ax in plots["bars_kl"].figure.axes for r in ax.patches
    ]
    assert len(heights) == len(b)
    for (title, h), (_, row) in zip(
        heights, b.sort_values("length", kind="stable").iterrows(), strict=True
    ):
        assert title == f"α = {row.length:.3g}"
        np.testing.assert_allclose(h, row["mean"])

    tl = threshold_lengths(rows, "kl", threshold=0.1)
    hist = plots["threshold_kl"].data
    counts = hist.groupby("direction", observed=True)["count"].sum()
    crossed = tl.dropna().groupby("direction", observed=True).size()
    assert counts.to_dict() == {str(k): v for k, v in crossed.items()}
    drawn = [r.get_height() for ax in plots["threshold_kl"].figure.axes for r in ax.patches]
    np.testing.assert_allclose(drawn, hist["density"])


def test_palette_is_colour_blind_safe_and_stable() -> None:
    okabe_ito = {"#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#000000"}
    assert {color_for(d) for d in BASELINES} <= okabe_ito
    assert len({color_for(d) for d in BASELINES}) == len(BASELINES)
    assert color_for("my-direction") == color_for("my-direction")
    assert not any("tab:" in c for c in DIRECTION_COLORS.values())


def test_analysis_helpers_against_numpy() -> None:
    rng = np.random.default_rng(3)
    df = pd.DataFrame(
        {
            "target": np.repeat(["real", "synthetic", "random"], 200),
            "step": np.r_[rng.normal(40, 5, 200), rng.normal(42, 5, 200), rng.normal(60, 8, 200)],
        }
    )
    right = histograms(
        df.assign(step=df.step.round()), "step", by=["target"], bins=[0, 40, 90], right=True
    )
    for target, h in right.groupby("target"):
        x = df.loc[df.target == target, "step"].round()
        assert h["count"].tolist() == [((x > 0) & (x <= 40)).sum(), ((x > 40) & (x <= 90)).sum()]
    hist = histograms(df, "step", by=["target"], bins=12)
    for target, h in hist.groupby("target"):
        x = df.loc[df.target == target, "step"]
        edges = np.r_[h.bin_left, h.bin_right.iloc[-1]]
        np.testing.assert_array_equal(h["count"], np.histogram(x, bins=edges)[0])
        widths = h.bin_right - h.bin_left
        np.testing.assert_allclose((h.density * widths).sum(), 1.0)
    ks = ks_distances(df, "step", by="target").set_index(["a", "b"])
    from scipy.stats import ks_2samp

    expect = ks_2samp(df.step[df.target == "real"], df.step[df.target == "random"]).statistic
    np.testing.assert_allclose(ks.loc[("random", "real"), "ks"], expect)
    assert ks.loc[("real", "synthetic"), "ks"] < ks.loc[("random", "real"), "ks"]
    kde = kde_curves(df, "step", by=["target"])
    for _, k in kde.groupby("target"):
        np.testing.assert_allclose(np.trapezoid(k.density, k.x), 1.0, atol=0.02)

    sae = pd.DataFrame(
        {"sae": np.repeat(["local", "e2e"], 50), "size": rng.random(100), "kl": rng.random(100)}
    )
    pts = scatter_points(sae, "size", "kl", by=["sae"]).set_index("sae")
    means = sae.groupby("sae")[["size", "kl"]].mean()
    np.testing.assert_allclose(pts.loc[means.index, "size_mean"], means["size"])
    np.testing.assert_allclose(pts.loc[means.index, "kl_mean"], means["kl"])
    assert (pts.size_ci_low < pts.size_mean).all() and (pts.kl_mean < pts.kl_ci_high).all()


def test_generic_distribution_and_sharpness_figures() -> None:
    rng = np.random.default_rng(0)
    stats = pd.DataFrame(
        {
            "target": np.repeat(["real", "synthetic", "cov-random"], 80),
            "max_slope_step": rng.integers(10, 90, 240).astype(float),
            "model": np.tile(["pythia-70m", "pythia-160m"], 120),
            "sharpness": rng.gamma(2.0, size=240),
        }
    )
    dist = distribution_plot(stats, "max_slope_step", by="target")
    ks = ks_distances(stats, "max_slope_step", by="target")
    pd.testing.assert_frame_equal(dist.data.drop(columns="column"), ks)
    texts = {t.get_text() for t in dist.figure.axes[1].texts}
    assert {f"{v:.2f}" for v in ks.ks} <= texts  # the KS matrix shows the analysis' numbers
    kde = kde_curves(stats, "max_slope_step", by=["target"])
    for line in dist.figure.axes[0].get_lines():
        np.testing.assert_allclose(line.get_ydata(), kde[kde.target == line.get_label()].density)

    sharp = sharpness_plot(stats, by="model")
    expect = stats.groupby("model", sort=True)["sharpness"].median()
    np.testing.assert_allclose(_dots(sharp), expect[sharp.data["model"]].to_numpy())


def sae_suite(folder: Path) -> list[Path]:
    """Two runs of an SAE-substitution suite (``folder/suite.json``, one run per SAE label):
    SAE(x) and epsilon-baselines at length 1, with the reconstruction error in ``size``."""
    dirs = ["SAE(x)", "isotropic", "cov-random-mixture", "real-mixture"]
    cfg = {**small_config(), "metrics": ["kl"]}
    cfg["directions"] = [{"name": "sae-error", "scale": "raw", "label": "SAE(x)"}] + [
        {"name": d, "scale": "sae-error"} for d in dirs[1:]
    ]
    folder.mkdir(parents=True)
    (folder / "suite.json").write_text("{}")
    runs = []
    for i, label in enumerate(["local-L0=30", "e2e-L0=27"]):
        rng = np.random.default_rng(i)
        rows = pd.MultiIndex.from_product(
            [range(4), range(6), dirs, [1.0]], names=["seq", "pos", "direction", "length"]
        ).to_frame(index=False)
        rows["kl"] = rng.exponential(size=len(rows)).astype(np.float32) * (i + 1)
        rows["size"] = rng.random(len(rows)).astype(np.float32) + 3 * (i + 1)
        runs.append(make_run(folder / label, {**cfg, "sae": f"saes/{label}"}, rows=rows))
    return runs


def test_sae_substitution_figures_per_run_and_per_sae(tmp_path: Path) -> None:
    from perturb_lens.plots.report import compare_plots

    runs = sae_suite(tmp_path / "suite")
    got = {p.name: p for p in figures_for(runs[0])}
    assert set(got) == {"substitution_kl", "scatter_size_kl"}
    rows = summary_rows(runs[0])
    means = rows.groupby("direction", observed=True)["kl"].mean()
    heights = sorted(r.get_height() for r in got["substitution_kl"].figure.axes[0].patches)
    # means of <= 24 float32 values: accumulated in float32 in any order they err by <= 24 eps
    # (pandas' float32 mean rounds to float32: measured 6.4e-8)
    mean_rtol = 24 * EPS32
    np.testing.assert_allclose(heights, sorted(means.to_numpy()), rtol=mean_rtol)

    views = [RunReader(r) for r in runs]
    assert run_labels(views) == ["local-L0=30", "e2e-L0=27"]
    for v, label in zip(views, run_labels(views), strict=True):
        v.label = label
    plots = {p.name: p for p in compare_plots(views, "kl")}
    bars_ = plots["compare_kl_bars"].data.set_index(["run", "direction"])["mean"]
    pts = plots["scatter_size_kl"].data.set_index("run")
    for v in views:
        r = summary_rows(v.run_dir)
        expect = r.groupby("direction", observed=True)["kl"].mean()
        np.testing.assert_allclose(bars_.loc[v.label].loc[expect.index], expect, rtol=mean_rtol)
        sae = r[r.direction == "SAE(x)"]
        size_mean = sae["size"].mean()
        np.testing.assert_allclose(pts.loc[v.label, "size_mean"], size_mean, rtol=mean_rtol)
        np.testing.assert_allclose(pts.loc[v.label, "kl_mean"], sae["kl"].mean(), rtol=mean_rtol)


def test_registry_plugs_in_new_experiments(run_dir: Path) -> None:
    assert figure_set("no-such-experiment") is registered()["curves"]

    @register_figures("my-experiment")
    def mine(view: RunReader) -> list[Plot]:
        return []

    try:
        assert figure_set("my-experiment") is mine
    finally:
        from perturb_lens.plots import registry

        registry.FIGURE_SETS.unregister("my-experiment")


def test_report_is_self_contained_with_relative_links(small_run: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copied run"  # a space in the path: links must still work
    shutil.copytree(small_run, copy)
    report = write_report(copy, formats=("svg",))
    assert report == copy / "report.html"
    text = report.read_text()
    assert "http://" not in text.replace("http://www.w3.org", "")
    assert "https://" not in text and "<script src" not in text
    hrefs = re.findall(r'href="([^"#][^"]*)"', text)
    hrefs = [h for h in hrefs if not h.startswith("data:")]
    assert "manifest.json" in hrefs and "shards/s00000.parquet" in hrefs
    for href in hrefs:
        assert not Path(href).is_absolute()
        assert (copy / href).is_file(), href
    names = {p.name for p in figures_for(copy)}
    assert set(re.findall(r'data-figure="([^"]+)"', text)) == names
    ids = re.findall(r' id="([^"]+)"', text)
    assert len(ids) == len(set(ids))  # inline SVGs do not clash
    for name in names:
        csv = pd.read_csv(copy / "figures" / f"{name}.csv")
        assert len(csv)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A run of a test-only experiment whose figure set is one small figure (fast reports)."""
    with tiny_figure_run(tmp_path_factory.mktemp("runs") / "tiny", "test-tiny") as run:
        yield run


def test_report_elsewhere_links_back(tiny_run: Path, tmp_path: Path) -> None:
    report = write_report(tiny_run, tmp_path / "out" / "r.html", formats=("png",), log_y=True)
    text = report.read_text()
    href = re.search(r'href="([^"]*manifest\.json)"', text)[1]
    assert (report.parent / href).resolve() == (tiny_run / "manifest.json").resolve()
    assert (report.parent / "figures" / "tiny_kl.png").read_bytes()[:4] == b"\x89PNG"
    assert 'class="view-log"' in text and 'data-series="isotropic"' in text


def test_inline_svg_prefixes_ids() -> None:
    svg = (
        b'<?xml version="1.0"?>\n<svg width="1pt" height="2pt" viewBox="0 0 1 2"><g id="a" '
        b'clip-path="url(#c)"><use xlink:href="#g"/></g></svg>'
    )
    out = inline_svg(svg, "f1")
    assert out.startswith("<svg") and 'viewBox="0 0 1 2"' in out
    assert 'id="f1-a"' in out and "url(#f1-c)" in out and 'href="#f1-g"' in out


def test_compare_overlays_runs(small_run: Path, tmp_path: Path) -> None:
    other = make_run(tmp_path / "layer2", small_config(), hook="blocks.2.hook_resid_pre")
    views = [RunReader(small_run), RunReader(other)]
    assert run_labels(views) == ["blocks.6.hook_resid_pre", "blocks.2.hook_resid_pre"]
    out = write_comparison([small_run, other], tmp_path / "cmp", metric="kl", formats=("svg",))
    text = out.read_text()
    assert out.name == "compare.html" and "blocks.2.hook_resid_pre" in text
    assert (tmp_path / "cmp" / "figures" / "compare_kl_bars.svg").is_file()
    with pytest.raises(ValueError, match="dce"):
        write_comparison([small_run], tmp_path / "bad", metric="dce")


def test_cli_report_and_compare(tiny_run: Path, tmp_path: Path) -> None:
    from perturb_lens.cli.app import app

    runner = CliRunner()
    res = runner.invoke(
        app, ["report", str(tiny_run), "--out", str(tmp_path / "r"), "--format", "svg"]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "report.html").is_file() and "report.html" in res.output
    res = runner.invoke(
        app,
        [
            "compare",
            str(tiny_run),
            str(tiny_run),
            "--out",
            str(tmp_path / "c"),
            "--metric",
            "kl",
            "--format",
            "png",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c" / "compare.html").is_file()
    res = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert res.exit_code == 1 and "manifest.json" in res.output
    res = runner.invoke(app, ["report", str(tiny_run), "--format", "jpg"])
    assert res.exit_code == 1 and "jpg" in res.output


def interpolation_run(folder: Path, experiment: str, seed: int = 0) -> Path:
    """A last-position interpolation run: sigmoid L2 curves over t in [0, 1], random centres."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, 21)
    dirs = ["real", "synthetic", "cov-random"]
    rows = pd.MultiIndex.from_product(
        [range(30), [9], dirs, t], names=["seq", "pos", "direction", "length"]
    ).to_frame(index=False)
    centre = rng.uniform(0.2, 0.8, len(rows) // len(t)).repeat(len(t))
    centre += np.where(rows["direction"] == "cov-random", 0.15, 0.0)
    rows["l2"] = 1 / (1 + np.exp(-(rows["length"] - centre) * 20))
    cfg = {**small_config(), "experiment": experiment, "scope": "last-position", "metrics": ["l2"]}
    cfg["directions"] = [{"name": d} for d in dirs]
    return make_run(folder, cfg, rows=rows)


@pytest.mark.parametrize("experiment", ["synthetic-activations", "plateaus", "stable-regions"])
def test_interpolation_figure_sets(experiment: str, tmp_path: Path) -> None:
    from perturb_lens.analysis.curve_shape import curve_statistics

    run = interpolation_run(tmp_path / "run", experiment)
    got = {p.name: p for p in figures_for(run)}
    stats = curve_statistics(summary_rows(run), "l2")
    column = {"plateaus": "plateau_length"}.get(experiment, "max_slope_step")
    expect = ks_distances(stats, column, by="direction")
    pd.testing.assert_frame_equal(got[f"dist_{column}"].data.drop(columns="column"), expect)
    assert {"all_l2", "quantiles_l2", "tokens_l2"} <= set(got)
    if experiment == "stable-regions":
        medians = stats.groupby("direction", observed=True)["sharpness"].median()
        np.testing.assert_allclose(sorted(_dots(got["quantiles_sharpness"])), sorted(medians))


def test_compare_stable_regions_shows_sharpness_per_run(tmp_path: Path) -> None:
    from perturb_lens.analysis.curve_shape import curve_statistics
    from perturb_lens.plots.report import compare_plots

    runs = [interpolation_run(tmp_path / f"m{i}", "stable-regions", seed=i) for i in range(2)]
    views = [RunReader(r) for r in runs]
    plots = {p.name: p for p in compare_plots(views, "l2")}
    data = plots["compare_sharpness"].data.set_index("run")
    for view in views:
        sharp = curve_statistics(summary_rows(view.run_dir), "l2")["sharpness"]
        np.testing.assert_allclose(data.loc[view.label, "median"], sharp.median())
