"""Loss recovered (zero and mean ablation) and loss recovered vs L0 (masking frequent latents,
a family of SAEs), against plain transformers forwards with the activation replaced by a hook, on
the tiny random Llama in float64; closed-form SAEs (identity, zeros, the mean); the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import llama_in_float64, logit_bound

from perturb_lens.saes import SAE, SAEConfig, SAEMismatchError

EPS64 = torch.finfo(torch.float64).eps
HOOK = "blocks.1.hook_resid_pre"
KEEP = slice(1, 8)  # the counted positions of 9-token rows: no BOS, no last position


@pytest.fixture(scope="module")
def models(llama_dir: Path):
    """(native lens, transformers' Llama), both computing in float64."""
    from transformers import AutoModelForCausalLM

    from perturb_lens.models.load import load_model

    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float64).eval()
    return load_model(str(llama_dir), dtype="float64"), llama_in_float64(hf)


@pytest.fixture(scope="module")
def tokens(models) -> torch.Tensor:
    lens, _ = models
    tok = torch.randint(3, 1000, (5, 9), generator=torch.Generator().manual_seed(2))
    tok[:, 0] = lens.bos_token_id
    return tok


def make_sae(d: int, d_sae: int, x_scale: float, seed: int = 0) -> SAE:
    """A float64 ReLU SAE whose pre-activations are O(1) on activations of norm ~``x_scale``, with
    a random negative bias: some latents fire often, some rarely, some never."""
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d, d_sae=d_sae, hook=HOOK), dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, d_sae, generator=g, dtype=torch.float64) / x_scale)
        sae.b_enc.copy_(-1.5 * torch.rand(d_sae, generator=g, dtype=torch.float64))
        sae.W_dec.copy_(torch.randn(d_sae, d, generator=g, dtype=torch.float64) * x_scale / 8)
    return sae.requires_grad_(False)


def identity_sae(d: int) -> SAE:
    """``SAE(x) = relu(x) - relu(-x) = x`` exactly: encoder ``[I, -I]``, decoder its inverse."""
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, hook=HOOK, apply_b_dec_to_input=False))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae.double().requires_grad_(False)


def naive_ce(hf, tokens: torch.Tensor, edit) -> float:
    """Mean next-token CE over the counted positions, ``edit(hidden)`` applied in place to the
    input of block 1 at those positions (one plain transformers forward)."""
    from naive import forward_with_edit

    logits, _ = forward_with_edit(hf, tokens, 1, edit, 3)
    logp = logits.log_softmax(-1)[:, KEEP]
    return float(-logp.gather(-1, tokens[:, 2:9, None]).mean())


def x_scale(lens, tokens: torch.Tensor) -> float:
    return float(lens.run_to_hook(tokens, HOOK)[:, KEEP].norm(dim=-1).mean())


def test_loss_recovered_against_naive(models, tokens: torch.Tensor) -> None:
    """ce_clean / ce_sae / ce_zero / ce_mean and both loss recovered against plain forwards."""
    from perturb_lens.saes.quality import sae_stats

    lens, hf = models
    sae = make_sae(64, 96, x_scale(lens, tokens))
    (st,) = sae_stats(sae, lens, tokens, batch_seqs=2, progress=False)
    hidden = {}

    def grab(h: torch.Tensor) -> None:
        hidden["x"] = h.clone()

    ce_clean = naive_ce(hf, tokens, grab)
    mean = hidden["x"][:, KEEP].reshape(-1, 64).mean(0)  # the data's mean at the counted positions

    def put(value):
        def edit(h: torch.Tensor) -> None:
            h[:, KEEP] = value(h[:, KEEP])

        return edit

    ce_sae = naive_ce(hf, tokens, put(sae))
    ce_zero = naive_ce(hf, tokens, put(torch.zeros_like))
    ce_mean = naive_ce(hf, tokens, put(lambda h: mean.expand_as(h)))
    # float64 on both sides: a logit errs by ~sqrt(n d) eps64 max|logit| (n = 4 blocks + the SAE,
    # d <= 160), a CE by 2 such; x 8 for summation order; |logit| <= logit_bound(hf) = 5.2 for any
    # input (the final RMSNorm bounds it): 5.2e-13
    tol = 8 * 2 * (5 * 160) ** 0.5 * EPS64 * logit_bound(hf)
    assert st.n_tokens == 5 * 7 and st.mean_source == "data"
    for got, want in ((st.ce_clean, ce_clean), (st.ce_sae, ce_sae)):
        assert got == pytest.approx(want, rel=0, abs=tol)
    assert st.ce_zero == pytest.approx(ce_zero, rel=0, abs=tol)
    assert st.ce_mean == pytest.approx(ce_mean, rel=0, abs=tol)
    # the ablations change the CE (a random model: in either direction), so the ratios are defined
    assert abs(ce_zero - ce_clean) > 0.01 and abs(ce_mean - ce_clean) > 0.001
    for got, ce_abl in ((st.loss_recovered_zero, ce_zero), (st.loss_recovered_mean, ce_mean)):
        lr = (ce_abl - ce_sae) / (ce_abl - ce_clean)
        # a ratio (a - b) / (a - c) with each CE off by tol: off by (2 + 2 |lr|) tol / |a - c|
        assert got == pytest.approx(lr, rel=0, abs=(2 + 2 * abs(lr)) * tol / abs(ce_abl - ce_clean))


def test_loss_recovered_interval_resamples_sequences(models) -> None:
    """With 2 sequences the bootstrap's resamples are {1,1}, {1,2}, {2,2} and the expanded tail is
    ~1e-70, so the 95 % interval runs from the lower to the higher of the two sequences' own loss
    recovered (each from plain forwards of that sequence alone, zero ablation); with one sequence
    repeated every resample is that sequence: the interval is the point."""
    from perturb_lens.saes.quality import sae_stats

    lens, hf = models
    tokens = torch.randint(3, 1000, (16, 9), generator=torch.Generator().manual_seed(5))
    tokens[:, 0] = lens.bos_token_id
    sae = make_sae(64, 96, x_scale(lens, tokens))

    def put(value):
        def edit(h: torch.Tensor) -> None:
            h[:, KEEP] = value(h[:, KEEP])

        return edit

    def own_lr(row: torch.Tensor) -> float:
        clean = naive_ce(hf, row, lambda h: None)
        zero, with_sae = naive_ce(hf, row, put(torch.zeros_like)), naive_ce(hf, row, put(sae))
        return (zero - with_sae) / (zero - clean)

    # a pooled ratio lies between the two sequences' own only where their denominators
    # (ce_zero - ce_clean) share a sign; in a random model zero ablation may lower the CE, so
    # take two sequences where it raises it
    raises = [
        i
        for i in range(tokens.shape[0])
        if naive_ce(hf, tokens[i : i + 1], put(torch.zeros_like))
        > naive_ce(hf, tokens[i : i + 1], lambda h: None) + 0.01
    ]
    assert len(raises) >= 2
    pair = tokens[raises[:2]]
    (st,) = sae_stats(sae, lens, pair, batch_seqs=1, progress=False)
    lrs = sorted(own_lr(pair[i : i + 1]) for i in range(2))
    assert st.n_seqs == 2 and lrs[1] - lrs[0] > 1e-3  # two distinguishable sequences
    # float64 CEs off by ~5e-13 (see test_loss_recovered_against_naive), ratios by ~1e-10
    assert st.loss_recovered_zero_low == pytest.approx(lrs[0], abs=1e-9)
    assert st.loss_recovered_zero_high == pytest.approx(lrs[1], abs=1e-9)
    assert st.loss_recovered_zero_low <= st.loss_recovered_zero <= st.loss_recovered_zero_high
    (same,) = sae_stats(sae, lens, pair[:1].repeat(3, 1), progress=False)
    for end in (same.loss_recovered_zero_low, same.loss_recovered_zero_high):
        assert end == pytest.approx(same.loss_recovered_zero, abs=1e-12)


def test_closed_form_saes(models, tokens: torch.Tensor) -> None:
    """Identity SAE: loss recovered 1 (both); zeros: 0 against zero ablation; the mean: 0 against
    mean ablation (the same substitution, so exactly 0); a given mean is used as given."""
    from perturb_lens.saes.quality import hook_mean, sae_stats

    lens, hf = models
    mean = hook_mean(lens, tokens, HOOK)
    zeros, at_mean = make_sae(64, 8, 1.0), make_sae(64, 8, 1.0)
    with torch.no_grad():
        zeros.W_dec.zero_()
        at_mean.W_dec.zero_()
        at_mean.b_dec.copy_(mean)
    saes = {"identity": identity_sae(64), "zeros": zeros, "mean": at_mean}
    st = {s.name: s for s in sae_stats(saes, lens, tokens, batch_seqs=2, progress=False)}
    ident = st["identity"]
    # SAE(x) = x bit for bit; resuming from the hook with x itself differs from the clean pass by
    # float64 rounding only: CE by ~2 sqrt(n d) eps64 max|logit| (n = 4, d = 160, |logit| <=
    # logit_bound), x 8 for summation order, relative to |ce_ablated - ce_clean| (> 0.01 here)
    tol = 8 * 2 * (4 * 160) ** 0.5 * EPS64 * logit_bound(hf) / 0.01
    assert min(abs(ident.ce_zero - ident.ce_clean), abs(ident.ce_mean - ident.ce_clean)) > 0.01
    assert ident.l0 == 64 and ident.mse == 0.0
    assert ident.loss_recovered_zero == pytest.approx(1.0, rel=0, abs=tol)
    assert ident.loss_recovered_mean == pytest.approx(1.0, rel=0, abs=tol)
    assert st["zeros"].loss_recovered_zero == 0.0 and st["zeros"].ce_sae == st["zeros"].ce_zero
    assert st["mean"].loss_recovered_mean == 0.0
    shifted = mean + 1.0
    (given,) = sae_stats(at_mean, lens, tokens, means={HOOK: shifted}, progress=False)
    assert given.mean_source == "given" and given.ce_mean != st["mean"].ce_mean
    assert given.ce_sae == st["mean"].ce_sae  # the SAE's own numbers do not depend on the mean


def naive_l0(sae: SAE, lens, tokens: torch.Tensor, keep: torch.Tensor) -> float:
    f = sae.encode(lens.run_to_hook(tokens, HOOK)[:, KEEP]) * keep
    return float((f > 0).sum(-1).double().mean())


def test_l0_sweep_masks_frequent_latents(models, tokens: torch.Tensor) -> None:
    """Steps reach the L0 grid with the fewest masked latents, most frequent first; masking none
    is the unmasked SAE exactly, masking every firing latent gives L0 0; L0 never increases."""
    from perturb_lens.saes.quality import sae_stats
    from perturb_lens.workflows.l0_sweep import l0_sweep

    lens, _ = models
    sae = make_sae(64, 96, x_scale(lens, tokens))
    other = make_sae(64, 48, x_scale(lens, tokens), seed=3)
    grid = [30.0, 12.0, 5.0, 0.0]
    df = l0_sweep(
        sae, lens, tokens, name="a", family={"a": sae, "b": other}, l0_grid=grid,
        batch_seqs=2, progress=False,
    )  # fmt: skip
    masked, fam = df[df["way"] == "masked"], df[df["way"] == "family"]
    assert list(fam["sae"]) == sorted(["a", "b"], key=lambda k: -fam.set_index("sae").l0[k])
    # the frequencies, plainly: share of counted positions where each latent fires
    f = sae.encode(lens.run_to_hook(tokens, HOOK)[:, KEEP])
    freq = (f > 0).double().reshape(-1, 96).mean(0)
    order = sorted(range(96), key=lambda i: (-freq[i].item(), i))
    l0_full = float(freq.sum())
    assert masked["n_masked"].iloc[0] == 0 and masked["l0"].iloc[0] == pytest.approx(l0_full)
    for row in masked.itertuples():
        keep = torch.ones(96, dtype=torch.float64)
        keep[order[: row.n_masked]] = 0
        assert row.l0 == pytest.approx(naive_l0(sae, lens, tokens, keep), rel=1e-12)
        # the fewest: one latent fewer would stay above some target that this step reaches
        if row.n_masked:
            keep[order[row.n_masked - 1]] = 1
            above = naive_l0(sae, lens, tokens, keep)
            assert any(row.l0 <= t < above for t in grid)
    assert set(masked["n_masked"]) == {0} | {
        next(j for j in range(97) if l0_full - freq[order[:j]].sum().item() <= t + 1e-12)
        for t in grid
    }
    assert np.all(np.diff(masked["l0"].to_numpy()) <= 0) and masked["l0"].iloc[-1] == 0.0
    # every firing latent masked and b_dec = 0: SAE(x) = 0 at every counted position, which is
    # the zero ablation itself (the same substitution): loss recovered exactly 0
    assert masked["loss_recovered_zero"].iloc[-1] == 0.0
    # masking none reproduces the unmasked SAE bit for bit (alone and as a family member)
    (plain,) = sae_stats(sae, lens, tokens, batch_seqs=2, progress=False)
    cols = ["l0", "kl", "ce_sae", "ce_increase", "loss_recovered_zero", "loss_recovered_mean"]
    first = masked.iloc[0]
    assert all(first[c] == getattr(plain, c) for c in cols)
    assert all(first[c] == fam.set_index("sae").loc["a", c] for c in cols)
    # masking every latent: L0 0 and SAE(x) = b_dec everywhere
    (all_masked,) = l0_sweep(sae, lens, tokens, l0_grid=[0.0], progress=False).iloc[1:].itertuples()
    assert all_masked.l0 == 0.0 and all_masked.n_masked == int((freq > 0).sum())


def test_figure_shows_the_table(models, tokens: torch.Tensor) -> None:
    """Every drawn line is the table's numbers (loss recovered both ways, KL against L0)."""
    from perturb_lens.plots.sae_l0 import PANELS, loss_recovered_plot, series_name
    from perturb_lens.workflows.l0_sweep import l0_sweep

    lens, _ = models
    sae = make_sae(64, 96, x_scale(lens, tokens))
    fam = {f"s{i}": make_sae(64, 96, x_scale(lens, tokens), seed=i + 5) for i in range(3)}
    df = l0_sweep(sae, lens, tokens, family=fam, n_steps=4, progress=False)
    plot = loss_recovered_plot(df)
    assert len(plot.figure.axes) == len(PANELS)
    for ax, col in zip(plot.figure.axes, PANELS, strict=True):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {series_name("masked", "sae"), series_name("family", "")}
        for way in ("masked", "family"):
            want = df[df["way"] == way].sort_values("l0")
            line = lines[series_name(way, "sae")]
            np.testing.assert_array_equal(line.get_xdata(), want["l0"].to_numpy())
            np.testing.assert_array_equal(line.get_ydata(), want[col].to_numpy())


def test_bad_inputs_are_named(models, tokens: torch.Tensor, tmp_path: Path) -> None:
    from perturb_lens.saes.quality import load_ablation_mean, sae_stats
    from perturb_lens.statistics.activations import fit_stats
    from perturb_lens.workflows.l0_sweep import l0_sweep

    lens, _ = models
    with pytest.raises(SAEMismatchError, match="d_in=32 differs from d_model=64"):
        sae_stats(make_sae(32, 8, 1.0), lens, tokens, progress=False)
    with pytest.raises(ValueError, match="No sequences to evaluate"):
        sae_stats(make_sae(64, 8, 1.0), lens, tokens[:0], progress=False)
    with pytest.raises(ValueError, match="seq_len >= 3"):
        sae_stats(make_sae(64, 8, 1.0), lens, tokens[:, :2], progress=False)
    with pytest.raises(ValueError, match="L0 targets must be >= 0"):
        l0_sweep(make_sae(64, 8, 1.0), lens, tokens, l0_grid=[-1.0], progress=False)
    other = make_sae(64, 8, 1.0)
    other.cfg.hook = "blocks.2.hook_resid_pre"
    with pytest.raises(ValueError, match="same hook"):
        l0_sweep(make_sae(64, 8, 1.0), lens, tokens, family={"o": other}, progress=False)
    st = fit_stats([torch.randn(4, 6, 64)], hook="blocks.2.hook_resid_pre", frame="raw")
    path = st.save(tmp_path / "stats.safetensors")
    with pytest.raises(ValueError, match=r"fitted at hook 'blocks\.2\.hook_resid_pre'"):
        load_ablation_mean(path, HOOK, "raw")
    torch.testing.assert_close(
        load_ablation_mean(path.parent, "blocks.2.hook_resid_pre", "raw"), st.mean
    )


def test_cli_stats_and_l0_sweep(llama_dir: Path, webtext_path: Path, tmp_path: Path) -> None:
    """`sae stats` prints loss recovered; `sae l0-sweep` prints the table and writes the table
    (CSV, Parquet) and the figure (PNG, SVG); an SAE of the wrong width is one clear line."""
    from typer.testing import CliRunner

    from perturb_lens.cli.app import app
    from perturb_lens.statistics.activations import fit_stats

    for name, seed in (("a", 0), ("b", 1)):
        make_sae(64, 48, 0.5, seed=seed).float().save(tmp_path / "fam" / name)
    make_sae(32, 8, 1.0).float().save(tmp_path / "narrow")
    data = ["--model", str(llama_dir), "--data", str(webtext_path), "--n-seqs", "3"]
    data += ["--seq-len", "8", "-q"]
    run = CliRunner().invoke
    res = run(app, ["sae", "stats", str(tmp_path / "fam" / "a"), *data])
    assert res.exit_code == 0, res.output
    words = " ".join(res.output.split())  # the title wraps at the terminal's width
    assert "SAE statistics" in words and "loss recovered" in words and "95 % CI" in words
    assert re.search(r"\d \[-?[\d.e+-]+, -?[\d.e+-]+\]", res.output)  # LR [low, high] cells
    res = run(app, ["sae", "stats", str(tmp_path / "fam" / "a"), "--json", *data])
    (row,) = json.loads(res.stdout)
    assert {"loss_recovered_zero", "loss_recovered_mean", "ce_zero", "ce_mean"} <= set(row)
    assert row["mean_source"] == "data"
    fitted = fit_stats([torch.randn(2, 5, 64)], hook=HOOK, frame="raw")  # a run's stats file
    mean_arg = ["--mean-from", str(fitted.save(tmp_path / "stats.safetensors"))]
    res = run(app, ["sae", "stats", str(tmp_path / "fam" / "a"), "--json", *mean_arg, *data])
    (given,) = json.loads(res.stdout)
    assert given["mean_source"] == "given" and given["ce_mean"] != row["ce_mean"]
    assert given["ce_sae"] == row["ce_sae"] and given["ce_zero"] == row["ce_zero"]
    out = tmp_path / "sweep"
    args = ["sae", "l0-sweep", str(tmp_path / "fam" / "a"), "--family", str(tmp_path / "fam")]
    res = run(app, [*args, "--steps", "3", "--out", str(out), *data])
    assert res.exit_code == 0, res.output
    assert "Loss recovered vs L0" in res.output and "family" in res.output
    table = pd.read_csv(out / "l0_sweep.csv", keep_default_na=False)
    pd.testing.assert_frame_equal(table, pd.read_parquet(out / "l0_sweep.parquet"))
    assert set(table["way"]) == {"masked", "family"} and set(table["sae"]) == {"a", "b"}
    assert table.loc[table["way"] == "masked", "l0"].iloc[-1] == 0.0
    for ext in ("png", "svg", "csv"):
        assert (out / f"loss_recovered_vs_l0.{ext}").stat().st_size > 0
    res = run(app, ["sae", "l0-sweep", str(tmp_path / "narrow"), *data])
    assert res.exit_code == 1 and "Error:" in res.output and "d_in=32" in res.output
    assert "Traceback" not in res.output
    (tmp_path / "empty.jsonl").write_text("")
    empty = [*data[:3], str(tmp_path / "empty.jsonl"), *data[4:]]
    res = run(app, ["sae", "l0-sweep", str(tmp_path / "fam" / "a"), *empty])
    assert res.exit_code == 1 and "Error: Found 0 tokens" in res.output
