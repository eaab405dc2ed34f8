"""The layer atlas: its layer list, its CSV against a pandas computation on the runs' rows, and
its figure from the atlases of two random tiny models of different d_model and depth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_gpt2_folder
from synthetic_runs import PRESETS, make_run, synthetic_rows
from typer.testing import CliRunner

from perturb_lens.analysis.atlas import atlas_layers, atlas_table, write_atlas_index
from perturb_lens.cli.app import app
from perturb_lens.config.schema import BASELINES, load_config
from perturb_lens.statistics.bootstrap import ratio_intervals

NORM = 100.0  # make_run's median norm
SEQ_LEN = 6  # synthetic_rows' tokens per sequence


@pytest.mark.parametrize(
    ("n_layers", "layers"),
    [
        (18, [0, 3, 6, 9, 12, 15, 17]),  # gemma3-270m
        (24, [0, 3, 6, 9, 12, 15, 18, 21, 23]),  # qwen2.5-0.5b
        (30, [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]),  # smollm2-135m
        (7, [0, 3, 6]),  # the last layer is a third one already
        (1, [0]),
    ],
)
def test_every_third_layer_first_and_last(n_layers: int, layers: list[int]) -> None:
    assert atlas_layers(n_layers) == layers


def test_layers_need_a_model() -> None:
    with pytest.raises(ValueError, match="n_layers >= 1"):
        atlas_layers(0)


def _layer_rows(seed: int) -> pd.DataFrame:
    """12 sequences of synthetic KL at 0.2 and 0.4 of the median norm; the directions differ
    (each baseline 0.5 more sensitive than the one before it)."""
    rows = synthetic_rows(list(BASELINES), lengths=[0.2 * NORM, 0.4 * NORM], n_seq=12,
                          seq_len=SEQ_LEN, seed=seed)  # fmt: skip
    factor = {d: 1.0 + i / 2 for i, d in enumerate(BASELINES)}
    rows["kl"] = (rows["kl"] * rows["direction"].map(factor)).astype(np.float32)
    return rows


def _synthetic_atlas(folder: Path, layers: dict[int, int], n_layers: int, d_model: int) -> Path:
    """An atlas folder of synthetic runs (layer -> seed), written by the store, with lengths 0.2
    and 0.4 of the median norm."""
    cfg_lengths = [0.2, 0.4]
    for layer, seed in layers.items():
        rows = _layer_rows(seed)
        cfg = {
            "model": "tiny",
            "lengths": cfg_lengths,
            "relative_lengths": True,
            "metrics": ["kl"],
            "directions": [{"name": d} for d in BASELINES],
            "scope": "all-positions",
            "include_bos": True,
            "drop_last_position": True,
        }
        base = load_config(PRESETS[0]).model_dump(mode="json")
        make_run(folder / f"L{layer:02d}", {**base, **cfg}, rows=rows,
                 hook=f"blocks.{layer}.hook_resid_pre")  # fmt: skip
    write_atlas_index(folder, "tiny", n_layers, d_model, list(layers))
    return folder


def _pandas_ratios(rows: pd.DataFrame) -> pd.DataFrame:
    """Ratio of the published means over isotropic's with its CI over sequences: the published
    rows (last position dropped), per-sequence sums and counts in float64, the package's
    paired bootstrap."""
    rows = rows[rows["pos"] < SEQ_LEN - 1].astype({"kl": np.float64})
    sums = rows.groupby(["direction", "seq", "length"])["kl"].agg(["sum", "count"])

    def side(d: str) -> tuple[np.ndarray, np.ndarray]:
        part = sums.loc[d]
        return (part["sum"].unstack("length").to_numpy(), part["count"].unstack("length")
                .to_numpy(np.float64))  # fmt: skip

    lengths = np.sort(rows["length"].unique())
    out = []
    for d in BASELINES[1:]:
        r = ratio_intervals(side(d), side("isotropic"))
        out.append(r.assign(direction=d, length=lengths))
    return pd.concat(out, ignore_index=True)


def test_csv_is_the_runs_rows(tmp_path: Path) -> None:
    """``compare --atlas`` on a synthetic atlas: every CSV number is the ratio of the runs'
    published means, its bootstrap interval and its pair count, computed here from the rows."""
    atlas = _synthetic_atlas(tmp_path / "atlas", {0: 1, 3: 2, 4: 3}, n_layers=5, d_model=16)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compare", "--atlas", str(atlas), "--out", str(out)])
    assert result.exit_code == 0, result.output
    csv = pd.read_csv(out / "atlas.csv")
    assert (out / "atlas.svg").is_file()
    assert sorted(csv["layer"].unique()) == [0, 3, 4]
    assert sorted(csv["relative_length"].unique()) == [0.2, 0.4]
    assert set(csv["direction"]) == set(BASELINES[1:])  # isotropic is the denominator
    for layer, seed in {0: 1, 3: 2, 4: 3}.items():
        want = _pandas_ratios(_layer_rows(seed)).sort_values(
            ["direction", "length"], ignore_index=True
        )
        got = csv[csv["layer"] == layer].sort_values(["direction", "length"], ignore_index=True)
        assert list(got["direction"]) == list(want["direction"])
        for col, ref in [("ratio", "ratio"), ("ci_low", "ci_low"), ("ci_high", "ci_high"),
                         ("mean", "mean_a"), ("mean_isotropic", "mean_b")]:  # fmt: skip
            # float64 sums of the same float32 values in another order: a few ulps apart
            np.testing.assert_allclose(got[col], want[ref], rtol=1e-12)
        assert (got["n_seqs"] == want["n_seqs"]).all() and (got["n_seqs"] == 12).all()
        np.testing.assert_allclose(got["relative_length"] * NORM, got["length"])
        assert (got["depth"] == layer / 5).all() and (
            got["hook"] == f"blocks.{layer}.hook_resid_pre"
        ).all()


def test_not_an_atlas_is_said(tmp_path: Path) -> None:
    make_run(tmp_path / "run")
    result = CliRunner().invoke(
        app, ["compare", "--atlas", str(tmp_path / "run"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "not an atlas folder" in result.output and "perturb-lens atlas" in result.output


@pytest.mark.slow
def test_figure_of_two_tiny_models(tmp_path: Path, llama_dir: Path, text_file: Path) -> None:
    """Atlases of a random GPT-2 (5 layers, d_model 32; by the command) and a random Llama (4
    layers, d_model 64; by the API) side by side: one panel per model and length, x the relative
    depth, each layer's statistics fitted on at least 20 x d_model samples."""
    from perturb_lens.plots.atlas import atlas_plot
    from perturb_lens.workflows.atlas import run_atlas

    gpt2 = make_gpt2_folder(tmp_path / "gpt2", n_layer=5, n_embd=32, n_head=4)
    common = ["--data", str(text_file), "--n-seqs", "4", "--seq-len", "8", "-q"]
    a = tmp_path / "atlas-gpt2"
    result = CliRunner().invoke(app, ["atlas", str(gpt2), "--out", str(a), *common])
    assert result.exit_code == 0, result.output
    assert "mean KL / mean KL of isotropic at 0.2 x median norm" in result.output
    b = run_atlas(str(llama_dir), tmp_path / "atlas-llama", source=str(text_file), n_seqs=4,
                  seq_len=8, progress=False)  # fmt: skip
    table = atlas_table([a, b])
    assert list(dict.fromkeys(table["model"])) == ["gpt2", llama_dir.name]
    per = table.groupby("model", sort=False)
    assert per["d_model"].first().tolist() == [32, 64]
    assert [sorted(g["layer"].unique()) for _, g in per] == [[0, 3, 4], [0, 3]]
    assert (table["stats_samples"] >= 20 * table["d_model"]).all()
    assert (table["n_seqs"] == 4).all() and np.isfinite(table["ratio"]).all()
    assert pd.read_csv(a / "atlas.csv").shape[0] == (table["model"] == "gpt2").sum()
    plot = atlas_plot(table)
    assert len(plot.figure.axes) == 4  # 2 lengths x 2 models
    titles = [ax.get_title() for ax in plot.figure.axes]
    assert titles[0].startswith("gpt2 (d 32, 5 layers): 0.2") and "d 64" in titles[1]
    # the figure's lines are the table's ratios against depth
    line = next(ln for ln in plot.figure.axes[1].lines if ln.get_label() == "real-difference")
    want = table[(table["model"] == llama_dir.name) & (table["relative_length"] == 0.2)
                 & (table["direction"] == "real-difference")]  # fmt: skip
    np.testing.assert_array_equal(line.get_xdata(), want["depth"])
    np.testing.assert_array_equal(line.get_ydata(), want["ratio"])
    out = tmp_path / "fig"
    result = CliRunner().invoke(
        app, ["compare", "--atlas", str(a), str(b), "--out", str(out), "--format", "png,svg"]
    )
    assert result.exit_code == 0, result.output
    assert all((out / f"atlas.{x}").is_file() for x in ("png", "svg", "csv"))
    again = CliRunner().invoke(app, ["atlas", str(gpt2), "--out", str(a), *common])
    assert again.exit_code == 1 and "--resume" in again.output


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_pass_statistics_equal_each_hooks_fit(
    family: str, gpt2_dir: Path, llama_dir: Path, text_file: Path, tmp_path: Path, monkeypatch
) -> None:
    """The atlas fits every layer's statistics in one pass over the model: the same activations,
    batches, seeds and pool draws as fitting each hook alone, so the same numbers bit for bit
    (float32 activations, float64 moments)."""
    from perturb_lens.config.schema import validate_config
    from perturb_lens.data.text import dataset_tokens
    from perturb_lens.models.load import load_model
    from perturb_lens.statistics.cache import fit_run_stats, load_stats, prefill_stats
    from perturb_lens.workflows.atlas import atlas_config

    monkeypatch.setenv("PERTURB_LENS_CACHE", str(tmp_path / "cache"))
    folder = {"gpt2": gpt2_dir, "llama": llama_dir}[family]
    lens = load_model(str(folder))
    cfgs = [
        validate_config(atlas_config(str(folder), layer, source=str(text_file), n_seqs=20,
                                     seq_len=8) | {"stats": {"pool_size": 50, "batch_seqs": 7}})
        for layer in (0, 2, 3)
    ]  # fmt: skip
    tokens = dataset_tokens(cfgs[0].data, lens, progress=False)
    folders = prefill_stats(cfgs, lens, tokens, progress=False)
    for cfg, cached in zip(cfgs, folders, strict=True):
        got, pool = load_stats(cached)
        want, want_pool = fit_run_stats(cfg, lens, tokens, progress=False)
        for name in ("mean", "cov", "chol"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert got.norm_quantiles == want.norm_quantiles and got.mean_norm == want.mean_norm
        assert got.n_tokens == want.n_tokens == 20 * 7 and got.hook == cfg.hook
        assert torch.equal(pool, want_pool) and pool.shape == (50, lens.spec.d_model)
    mtimes = [(f / "stats.safetensors").stat().st_mtime_ns for f in folders]
    prefill_stats(cfgs, lens, tokens, progress=False)  # cached: nothing refitted
    assert [(f / "stats.safetensors").stat().st_mtime_ns for f in folders] == mtimes
