"""The report's shortcuts change no number and no figure: a second format reuses the layout of the
first, forked workers render what this process would, bars come from the cached curves, and the
analysis benchmark writes runs in the engine's layout."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synthetic_runs import REPO, make_run, small_config, tiny_figure_run

from perturb_lens.analysis.tables import curves, curves_of
from perturb_lens.plots import Plot, write_report
from perturb_lens.plots.figures import line_panels
from perturb_lens.plots.registry import RunReader
from perturb_lens.plots.render import render_plots
from perturb_lens.plots.sets import bar_lengths
from perturb_lens.results.sketch import DEFAULT_ALPHA
from perturb_lens.results.summary import summary_rows


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "speed", small_config())


def _plots(run_dir: Path) -> list[Plot]:
    """Three small figures of the run, built afresh (each test renders its own copies)."""
    cv = RunReader(run_dir).curves("kl")
    out = []
    for i, dirs in enumerate((["isotropic"], ["real-mixture"], None)):
        data = cv if dirs is None else cv[cv["direction"].isin(dirs)]
        fig = line_panels({"kl": data, "again": data}, ylabel="mean kl", title=f"plot {i}")
        out.append(Plot(f"p{i}", f"Plot {i}", "caption", fig, data, i != 1, ["isotropic"]))
    return out


def test_second_format_reuses_the_layout(run_dir: Path, monkeypatch) -> None:
    plot, fresh = _plots(run_dir)[0], _plots(run_dir)[0]
    engine = plot.figure.get_layout_engine()
    calls = []
    execute = type(engine).execute

    def spy(self, fig):  # count the layouts, still making them
        calls.append(fig)
        return execute(self, fig)

    monkeypatch.setattr(type(engine), "execute", spy)
    plot.render("svg")
    assert calls, "the first render lays the figure out"
    laid_out = [ax.get_position().bounds for ax in plot.figure.axes]
    n = len(calls)
    png = plot.render("png")
    assert len(calls) == n and png[:4] == b"\x89PNG"  # drawn at the SVG's positions
    assert plot.figure.get_layout_engine() is engine  # and the engine is back
    plot.render("svg", logy=True)
    assert len(calls) > n  # the log view has other tick labels: a layout of its own
    monkeypatch.undo()
    # the layout made for the SVG (72 dpi) is the one a PNG makes for itself (150 dpi) but for
    # text hinting: 3e-4 of the figure here (0.4 px of the 9.2 in = 1380 px wide PNG); 1e-3 of
    # it is 1.4 px
    fresh.render("png")
    own = [ax.get_position().bounds for ax in fresh.figure.axes]
    np.testing.assert_allclose(laid_out, own, atol=1e-3)


def test_forked_workers_render_what_this_process_renders(run_dir: Path) -> None:
    serial, forked = _plots(run_dir), _plots(run_dir)
    render_plots(serial, ["png"], log_y=True, workers=1)
    render_plots(forked, ["png"], log_y=True, workers=2)
    for a, b in zip(serial, forked, strict=True):
        jobs = {("png", False), ("svg", False)} | ({("svg", True)} if a.log_toggle else set())
        assert set(a._rendered) == set(b._rendered) == jobs
        assert a._rendered[("png", False)] == b._rendered[("png", False)]  # PNG is deterministic
        if a.log_toggle:
            assert b._rendered[("svg", True)].lstrip().startswith(b"<?xml")


def test_bars_come_from_the_curves_with_the_same_numbers(run_dir: Path) -> None:
    view = RunReader(run_dir)
    data = view.bars("kl", bar_lengths(view))
    rows = summary_rows(run_dir)
    sub = rows[rows["length"].isin(data.attrs["lengths"])].astype({"kl": np.float64})
    ref = sub.groupby(["direction", "length"], observed=True)["kl"]
    ref = pd.DataFrame({"n": ref.count(), "mean": ref.mean(), "q25": ref.quantile(0.25)})
    got = data.set_index(["direction", "length"])
    assert len(got) == len(ref) == 3 * len(data.attrs["lengths"])
    assert (got["n"] == ref["n"].loc[got.index]).all()
    # both sides sum the same float64 numbers, at most in another order: relative error <= n
    # terms x 2^-53
    rtol = int(got["n"].max()) * 2.0**-53
    np.testing.assert_allclose(got["mean"], ref["mean"].loc[got.index], rtol=rtol)
    # quantiles come from the sketch: within its relative accuracy alpha of the exact ones
    q_ref = ref["q25"].loc[got.index].to_numpy()
    assert (
        np.abs(got["q25"].to_numpy() - q_ref) <= DEFAULT_ALPHA * np.abs(q_ref) * (1 + 1e-12)
    ).all()
    cv = view.curves("kl").set_index(["direction", "length"]).loc[got.index]
    np.testing.assert_array_equal(got[["ci_low", "ci_high"]], cv[["ci_low", "ci_high"]])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with tiny_figure_run(tmp_path_factory.mktemp("runs") / "tiny", "test-speed-tiny") as run:
        yield run


def test_report_writes_svg_by_default_and_png_on_request(tiny_run: Path, tmp_path: Path) -> None:
    page = write_report(tiny_run, tmp_path / "a")
    assert sorted(p.name for p in (page.parent / "figures").iterdir()) == [
        "tiny_kl.csv",
        "tiny_kl.svg",
    ]
    assert 'class="view-log"' not in page.read_text()  # log-y views only on request
    page = write_report(tiny_run, tmp_path / "b", formats=("png", "svg"), log_y=True)
    assert (page.parent / "figures" / "tiny_kl.png").read_bytes()[:4] == b"\x89PNG"
    assert 'class="view-log"' in page.read_text()


def test_bench_analysis_writes_the_engines_layout(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from bench_analysis import write_run
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    n, sizes = write_run(tmp_path / "run", 40_000)
    assert sizes == {}  # a rows run: no sketch compaction
    rows = summary_rows(tmp_path / "run")
    per_seq = 128 * 6 * 24  # positions x directions x lengths of the main preset
    assert n == 3 * per_seq  # whole sequences: the first count >= 40,000
    assert len(rows) == 3 * 127 * 6 * 24  # the last position is not in the summary
    dtypes = {c: str(t) for c, t in rows.dtypes.items()}
    assert dtypes == {
        "seq": "int32",
        "pos": "int16",
        "direction": "category",
        "length": "float32",
        "kl": "float32",
        "l2": "float32",
    }
    assert rows.groupby(["direction", "length"], observed=True).size().eq(3 * 127).all()


def test_curves_of_several_metrics_equal_one_call_each(run_dir: Path) -> None:
    rows = summary_rows(run_dir)
    rows["kl_holes"] = rows["kl"].where(rows["pos"] != 2)  # NaN elsewhere than kl: own draws
    both = curves_of(rows, ["kl", "l2", "kl_holes"])
    assert list(both) == ["kl", "l2", "kl_holes"]
    for metric, frame in both.items():
        alone = curves(rows, metric)
        pd.testing.assert_frame_equal(frame, alone, check_exact=True)
        assert frame.attrs == alone.attrs
    assert (both["kl_holes"]["n"] < both["kl"]["n"]).all()
