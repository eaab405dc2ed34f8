"""Same-cosine perturbations: the targets, the rows against transformers' own forward with the
activation replaced through a hook (float64, exact), the SAE points, the presets on a slice."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import kl_floor32, llama_in_float64, logit_bound
from naive import hooked_forward, kl
from random_sae import random_sae
from transformers import AutoModelForCausalLM

from perturb_lens import load_model
from perturb_lens.common.hook_depths import resolve_hook
from perturb_lens.config.lengths import resolve_lengths
from perturb_lens.config.preset import PRESET_DIR
from perturb_lens.config.schema import ConfigError, load_config, validate_config
from perturb_lens.directions.base import DirectionContext, make_directions, same_cosine_target
from perturb_lens.experiments.same_cosine import SAE_LABEL, nearest
from perturb_lens.results import load_results
from perturb_lens.statistics.activations import fit_stats
from perturb_lens.workflows.experiment import run_experiment

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _kind(p: Path) -> str:
    """A file's stem with preset dashes as config underscores (``same-cosine-attn-out`` ->
    ``same_cosine_attn_out``), so that one test reads both spellings."""
    return p.stem.replace("-", "_")


def _branch_output(p: Path) -> bool:
    return "attn_out" in _kind(p) or "mlp_out" in _kind(p)


# The configs/ files (GPT-2's published frame and data; SmolLM2 at layer 15 with its SAE) and the
# packaged presets (any model; the embedded SmolLM2 by default).
NEW_PRESETS = [
    p
    for folder in (CONFIGS, PRESET_DIR)
    for p in sorted(folder.glob("*.yaml"))
    if _kind(p).startswith("same_cosine") or _branch_output(p)
]
T = 7  # tokens per sequence in the runs here


def _tokens(n: int = 3, vocab: int = 1000, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab, (n, T), generator=torch.Generator().manual_seed(seed))


def _hf64(folder: Path):
    """transformers' model computing wholly in float64 (SDPA attention; Llama: RMSNorm uncast)."""
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    hf = hf.to(torch.float64)
    return llama_in_float64(hf) if hf.config.model_type == "llama" else hf


def _config(folder: Path, hook: str, **rest) -> dict:
    cfg = {
        "name": "same-cosine",
        "experiment": "same-cosine",
        "model": str(folder),
        "frame": "raw",
        "hook": hook,
        "metrics": ["kl", "dce", "l2"],
        "stats": {"pool_size": 16},
        "shard_seqs": 2,
    }
    return {**cfg, **rest}


def _rows(cfg: dict, folder: Path, **given) -> pd.DataFrame:
    """Every shard's rows as the shard function returns them (before the store: metrics of a
    float64 model stay float64)."""
    from perturb_lens.engine.shard import shard_ids
    from perturb_lens.experiments.same_cosine import same_cosine_shard
    from perturb_lens.workflows.experiment import prepare

    ctx = prepare(validate_config(cfg), folder, progress=False, **given)
    ids = shard_ids(ctx.tokens.shape[0], ctx.config.shard_seqs)
    return pd.concat([same_cosine_shard(ctx, s) for s in ids], ignore_index=True)


# -- targets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("generator", ["isotropic", "cov-random-difference", "real-difference"])
def test_targets_hold_cosine_and_norm_ratio(generator: str) -> None:
    """float32 targets from every kind of random part: cos(y, x) and ||y||/||x|| to 1e-5.

    y is computed in float64 and rounded to float32: each coordinate moves by <= 2^-24 of itself,
    so cos and the ratio move by ~sqrt(d) 2^-24 ~ 5e-7 (d = 64); 1e-5 is 20 x that."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(200, 64, generator=g) * 4 + 1).float()
    stats = fit_stats(
        [x.unsqueeze(0)], hook="blocks.1.hook_resid_pre", frame="raw", jitter=0.01, seed=0
    )
    ctx = DirectionContext(x=x, stats=stats, pool=x.flip(0)[:50].clone(), generator=g)
    noise = make_directions(generator, ctx)
    cos = torch.linspace(-0.9, 1.0, 200)
    ratio = torch.linspace(0.1, 3.0, 200)
    y = same_cosine_target(x, cos, ratio, noise=noise)
    assert y.dtype == torch.float32
    got_cos = torch.nn.functional.cosine_similarity(y.double(), x.double(), dim=-1)
    np.testing.assert_allclose(got_cos.numpy(), cos.double().numpy(), rtol=0, atol=1e-5)
    got_ratio = y.double().norm(dim=-1) / x.double().norm(dim=-1)
    np.testing.assert_allclose(got_ratio.numpy(), ratio.double().numpy(), rtol=1e-5)
    # the random part is the generator's vector made orthogonal to x (closed form)
    xd, nd = x.double(), noise.double()
    perp = nd - (nd * xd).sum(-1, keepdim=True) / xd.norm(dim=-1, keepdim=True) ** 2 * xd
    y_perp = (
        y.double()
        - (y.double() * xd).sum(-1, keepdim=True) / xd.norm(dim=-1, keepdim=True) ** 2 * xd
    )
    sim = torch.nn.functional.cosine_similarity(y_perp[cos < 0.99], perp[cos < 0.99], dim=-1)
    assert sim.min() > 1 - 1e-5


def test_target_from_a_multiple_of_x_is_refused() -> None:
    x = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="parallel to x"):
        same_cosine_target(x, 0.5, 1.0, noise=-2 * x)


# -- rows against transformers ------------------------------------------------------------------


def _replaced_kl(hf, tokens, layer, kind, seq, pos, y) -> tuple[float, float]:
    """KL and delta CE at (seq, pos) with the activation there replaced by ``y`` (HF hook)."""
    _, clean_final, _ = hooked_forward(hf, tokens, layer, kind, None)

    def put(h: torch.Tensor) -> torch.Tensor:
        h[seq, pos] = y.to(h.dtype)
        return h

    _, final, _ = hooked_forward(hf, tokens, layer, kind, put)
    with torch.no_grad():
        lc, lp = hf.lm_head(clean_final[seq, pos]), hf.lm_head(final[seq, pos])
    nxt = int(tokens[seq, pos + 1])
    dce = torch.log_softmax(lc, -1)[nxt] - torch.log_softmax(lp, -1)[nxt]
    return float(kl(lc, lp)), float(dce)


@pytest.mark.exact
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["hook_resid_pre", "hook_attn_out", "hook_mlp_out"])
def test_one_token_equals_transformers_with_the_activation_replaced(
    request: pytest.FixtureRequest, family: str, kind: str, tmp_path: Path
) -> None:
    """Single-position rows (float64): the target y is rebuilt here in closed form from the
    activation transformers computes and a fixed random part v, then put in place of x by a hook in
    one plain HF forward; KL and delta CE at that token agree to 1e-9 (float64 rounding: ~1e-15).
    The SAE point of the token (a float64 SAE): SAE(x) put in place the same way."""
    folder = request.getfixturevalue(f"{family}_dir")
    hf = _hf64(folder)
    model = load_model(str(folder), frame="raw", dtype="float64", device="cpu")
    d = model.spec.d_model
    hook = f"blocks.1.{kind}"
    v = torch.randn(d, generator=torch.Generator().manual_seed(5)).double()  # float32 numbers
    sae = random_sae(d, 4 * d, hook=hook, bias=-0.5).double()
    cosines, ratio = [0.3, 0.8, 1.0], 0.7
    tokens = _tokens(vocab=model.spec.vocab_size)
    cfg = _config(
        folder,
        hook,
        dtype="float64",
        scope="single-position",
        directions=["fixed"],
        same_cosine={"cosines": cosines, "norm_ratio": ratio},
    )
    rows = _rows(cfg, tmp_path, model=model, tokens=tokens, explicit={"fixed": v}, sae=sae)
    assert len(rows) == tokens.numel() * (len(cosines) + 1)
    x_all, _, _ = hooked_forward(hf, tokens, 1, kind, None)
    for seq, pos in ((0, 0), (2, 4)):
        x = x_all[seq, pos]
        n = x / x.norm()
        v32 = (v / v.norm()).float().double()  # directions are float32 unit rows
        u = v32 - (v32 @ n) * n
        u = u / u.norm()
        for c in cosines:
            y = ratio * x.norm() * (c * n + math.sqrt(1 - c * c) * u)
            row = rows[(rows.seq == seq) & (rows.pos == pos) & (rows.direction == "fixed")]
            row = row[row.length == c].iloc[0]
            ref_kl, ref_dce = _replaced_kl(hf, tokens, 1, kind, seq, pos, y)
            assert abs(row.kl - ref_kl) <= 1e-9 and abs(row.dce - ref_dce) <= 1e-9
            assert row.cosine == c and row["size"] == pytest.approx(float((y - x).norm()), 1e-6)
        with torch.no_grad():
            x_sae = sae(x)
        row = rows[(rows.seq == seq) & (rows.pos == pos) & (rows.direction == SAE_LABEL)].iloc[0]
        own = float(x_sae @ x / (x_sae.norm() * x.norm()))
        assert row.cosine == pytest.approx(own, abs=1e-12)
        assert row.length == nearest(cosines, np.array([own]))[0]
        assert row.norm_ratio == pytest.approx(float(x_sae.norm() / x.norm()), rel=1e-6)
        ref_kl, ref_dce = _replaced_kl(hf, tokens, 1, kind, seq, pos, x_sae)
        assert abs(row.kl - ref_kl) <= 1e-9 and abs(row.dce - ref_dce) <= 1e-9


def test_rows_follow_the_grid_and_the_sae_ratio(gpt2_dir: Path, tmp_path: Path) -> None:
    """All positions at once (float64): every row's ||y - x|| is ||x|| sqrt(r^2 - 2 r c + 1) (the
    law of cosines) with x from transformers and r = ||SAE(x)|| / ||x|| (``norm_ratio: sae``)."""
    hf = _hf64(gpt2_dir)
    model = load_model(str(gpt2_dir), frame="raw", dtype="float64", device="cpu")
    sae = random_sae(64, 256, hook="blocks.2.hook_resid_pre", bias=-0.5).double()
    tokens = _tokens(vocab=model.spec.vocab_size)
    cosines = [0.0, 0.5, 0.99]
    cfg = _config(
        gpt2_dir,
        "blocks.2.hook_resid_pre",
        dtype="float64",
        directions=["isotropic", "real-mixture"],
        same_cosine={"cosines": cosines, "norm_ratio": "sae"},
    )
    rows = _rows(cfg, tmp_path, model=model, tokens=tokens, sae=sae)
    assert len(rows) == tokens.numel() * (2 * len(cosines) + 1)
    assert list(rows["direction"].cat.categories) == ["isotropic", "real-mixture", SAE_LABEL]
    x, _, _ = hooked_forward(hf, tokens, 2, "hook_resid_pre", None)
    with torch.no_grad():
        r = (sae(x).norm(dim=-1) / x.norm(dim=-1)).numpy()
    xn = x.norm(dim=-1).numpy()
    grid = rows[rows.direction != SAE_LABEL]
    s, p = grid["seq"].to_numpy(), grid["pos"].to_numpy().astype(int)
    c, rr = grid["length"].to_numpy(), r[s, p]
    expect = xn[s, p] * np.sqrt(rr**2 - 2 * rr * c + 1)
    # size is stored in float32 (2^-24 relative); 1e-6 leaves room for the float64 steps before
    np.testing.assert_allclose(grid["size"], expect, rtol=1e-6)
    np.testing.assert_allclose(grid["norm_ratio"], rr, rtol=1e-6)
    assert (grid["cosine"] == grid["length"]).all()


def test_cosine_one_ratio_one_leaves_the_output(gpt2_dir: Path, tmp_path: Path) -> None:
    """cos 1 and ratio 1 is y = x: KL at every token is 0 up to float32's noise floor (float32
    model, all positions recomputed: the floor of the alpha = 0 sweep, 4 eps max|logit|)."""
    hf = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    cfg = _config(
        gpt2_dir,
        "blocks.1.hook_resid_pre",
        directions=["isotropic", "cov-random-mixture"],
        same_cosine={"cosines": [1.0], "norm_ratio": 1.0},
    )
    tokens = _tokens(vocab=hf.config.vocab_size)
    rows = load_results(run_experiment(cfg, tmp_path / "run", tokens=tokens, progress=False))
    assert len(rows) == 2 * tokens.numel()
    assert rows["kl"].abs().max() <= kl_floor32(logit_bound(hf))
    # ||y - x|| is float64 rounding of x (~1e-16 of ||x||), far below float32's resolution
    assert (rows["size"] <= 1e-12 * rows["size"].abs().max() + 1e-12).all()


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"cosines": [0.5, 1.2]}, "cosines must lie in \\[-1, 1\\]"),
        ({"cosines": []}, "same_cosine.cosines"),
        ({"norm_ratio": -1.0}, "norm_ratio must be a finite number >= 0"),
        ({"norm_ratio": "own"}, "same_cosine.norm_ratio"),
    ],
)
def test_bad_options_name_the_key(section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config({"experiment": "same-cosine", "same_cosine": section})


def test_sae_ratio_without_an_sae_says_so(gpt2_dir: Path, tmp_path: Path) -> None:
    cfg = _config(
        gpt2_dir,
        "blocks.1.hook_resid_pre",
        directions=["isotropic"],
        same_cosine={"norm_ratio": "sae"},
    )
    with pytest.raises(ValueError, match="norm_ratio: sae needs an SAE at the hook"):
        run_experiment(cfg, tmp_path / "run", tokens=_tokens(), progress=False)


# -- presets ------------------------------------------------------------------------------------


def test_new_presets_exist() -> None:
    names = {p.stem for p in NEW_PRESETS}
    for exp in ("sensitive-directions", "same-cosine"):
        for kind in ("attn-out", "mlp-out"):
            assert f"{exp}-{kind}" in names  # any model's (SmolLM2 by default)
            assert f"{exp}_gpt2_{kind}".replace("-", "_") in names  # GPT-2's published setup
    assert {"same-cosine", "same_cosine_smollm2"} <= names


@pytest.fixture(scope="module")
def gpt2_12_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 with GPT-2 small's 12 layers (the presets read blocks.11)."""
    from conftest import make_gpt2_folder

    return make_gpt2_folder(tmp_path_factory.mktemp("gpt2-12"), n_layer=12, n_embd=32)


def _preset_cases() -> list:
    """(preset, layer): layers 0 and 1 of the attn_out/mlp_out presets, the others at their own
    hook (layer None); the SmolLM2 ones (a 135M model on CPU) are slow."""
    cases = []
    for p in NEW_PRESETS:
        marks = [pytest.mark.slow] if load_config(p).model == "smollm2-135m" else []
        for layer in (0, 1) if _branch_output(p) else (None,):
            cases.append(pytest.param(p, layer, marks=marks, id=f"{p.stem}-L{layer}"))
    return cases


@pytest.mark.parametrize(("preset", "layer"), _preset_cases())
def test_new_presets_run_on_a_slice(
    request: pytest.FixtureRequest,
    preset: Path,
    layer: int | None,
    tmp_path: Path,
    webtext_path: Path,
) -> None:
    """Each preset validates and runs on 2 sequences of 8 tokens (attn_out/mlp_out presets: at
    layers 0 and 1). GPT-2 presets: a tiny random 12-layer GPT-2 stands in for the hub's; a preset
    with an SAE: a random SAE at its hook."""
    cfg = load_config(preset)
    assert cfg.name == preset.stem
    kind = cfg.hook.split(".")[-1]
    if cfg.model == "gpt2":
        model, source = None, str(webtext_path)
        overrides = {"model": str(request.getfixturevalue("gpt2_12_dir"))}
    else:
        model, source, overrides = request.getfixturevalue("smollm2"), cfg.data.source, {}
    data = cfg.model_dump(mode="json")
    data.update(overrides, sae=None, shard_seqs=2)
    data["data"] = {**data["data"], "source": source, "seq_len": 8, "n_seqs": 2}
    data["stats"] = {**data["stats"], "n_tokens": 64, "pool_size": 32}
    lens = model or load_model(data["model"], frame=cfg.frame, device="cpu")
    hook = cfg.hook if layer is None else f"blocks.{layer}.{kind}"
    data["hook"] = hook = resolve_hook(hook, lens.spec.n_layers)  # a preset's depth: its layer
    sae = None
    if cfg.sae is not None:
        d = lens.spec.d_model
        sae = random_sae(d, 2 * d, hook=hook, frame=lens.frame, bias=-0.5)
    run = run_experiment(
        validate_config(data), tmp_path / "run", model=lens, sae=sae, progress=False
    )
    rows = load_results(run)
    n_tok = 2 * 8
    if cfg.experiment == "same-cosine":
        expected = n_tok * (len(cfg.directions) * len(cfg.same_cosine.cosines) + (sae is not None))
    else:
        expected = n_tok * len(cfg.directions) * len(resolve_lengths(cfg.lengths))
    assert len(rows) == expected
    assert np.isfinite(rows["kl"].to_numpy()).all() and (rows["kl"] >= 0).all()


# -- figures ------------------------------------------------------------------------------------


def _synthetic_same_cosine_run(folder: Path) -> Path:
    """A same-cosine run directory with made-up rows: two generators on a cosine grid and SAE
    points at their own cosines (binned to the nearest grid cosine, as the experiment does)."""
    from synthetic_runs import make_run

    grid = [0.5, 0.7, 0.9, 1.0]
    idx = pd.MultiIndex.from_product(
        [range(4), range(6), ["isotropic", "real"], grid],
        names=["seq", "pos", "direction", "length"],
    ).to_frame(index=False)
    rng = np.random.default_rng(1)
    idx["cosine"] = idx["length"]
    sae = pd.MultiIndex.from_product([range(4), range(6)], names=["seq", "pos"]).to_frame(
        index=False
    )
    sae["direction"] = SAE_LABEL
    sae["cosine"] = rng.uniform(0.45, 1.0, len(sae))
    sae["length"] = nearest(grid, sae["cosine"].to_numpy())
    rows = pd.concat([idx, sae], ignore_index=True)
    rows["kl"] = (rng.exponential(size=len(rows)) * (1 - rows["cosine"]) ** 2).astype(np.float32)
    rows["norm_ratio"] = np.float32(0.9)
    cfg = load_config().model_dump(mode="json")
    cfg.update(
        experiment="same-cosine",
        metrics=["kl"],
        directions=[{"name": "isotropic"}, {"name": "real-difference", "label": "real"}],
    )
    return make_run(folder, cfg, rows=rows)


def test_figures_show_the_analysis_numbers(tmp_path: Path) -> None:
    """Each generator's drawn mean is ``curves`` of its rows; the dots are the SAE rows (own
    cosine, KL); the diamonds are the SAE rows' mean KL per grid bin, at the bin's mean cosine
    (aggregated here with plain pandas)."""
    from matplotlib.collections import PathCollection

    from perturb_lens.analysis.tables import curves
    from perturb_lens.plots import figures_for
    from perturb_lens.results.summary import summary_rows

    run = _synthetic_same_cosine_run(tmp_path / "run")
    (plot,) = figures_for(run)
    assert plot.name == "same_cosine_kl"
    rows = summary_rows(run)
    sae = rows[rows["direction"] == SAE_LABEL]
    grid = rows[rows["direction"] != SAE_LABEL]
    cv = curves(grid, "kl").set_index(["direction", "length"])
    bins = sae.groupby("length").agg(kl=("kl", "mean"), cosine=("cosine", "mean"))
    axes = plot.figure.axes
    assert [ax.get_title() for ax in axes] == ["isotropic", "real"]
    for ax in axes:
        lines = {line.get_label(): line for line in ax.get_lines()}
        mean = lines[ax.get_title()]
        expect = cv.loc[ax.get_title()]
        # the drawn numbers are these float64 numbers: exact
        np.testing.assert_array_equal(mean.get_xdata(), expect.index.to_numpy())
        np.testing.assert_allclose(mean.get_ydata(), expect["mean"].to_numpy(), rtol=1e-12)
        binned = lines[f"{SAE_LABEL} (binned mean)"]
        np.testing.assert_allclose(binned.get_xdata(), bins["cosine"].to_numpy(), rtol=1e-12)
        np.testing.assert_allclose(binned.get_ydata(), bins["kl"].to_numpy(), rtol=1e-6)
        (dots,) = [c for c in ax.collections if isinstance(c, PathCollection)]
        got = pd.DataFrame(dots.get_offsets(), columns=["cosine", "kl"]).sort_values("cosine")
        want = sae[["cosine", "kl"]].astype(float).sort_values("cosine")
        np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-6)
        bands = [c for c in ax.collections if not isinstance(c, PathCollection)]
        ys = np.concatenate([b.get_paths()[0].vertices[:, 1] for b in bands])
        assert ys.min() >= expect["q05"].min() - 1e-12 and ys.max() <= expect["q95"].max() + 1e-12
    assert set(plot.data["kind"]) == {"curve", "sae-bin", "sae-point"}


def test_suite_figures_5_6_show_each_sae_by_type_and_l0(tmp_path: Path) -> None:
    """One panel per SAE type; in it each SAE's sae-error mean (``curves`` of its run) coloured
    by its L0 on a log scale, and the baselines of the panel's first run, dashed."""
    import json

    from matplotlib import colormaps
    from matplotlib.colors import LogNorm, to_rgba
    from synthetic_runs import make_run, synthetic_rows

    from perturb_lens.analysis.tables import curves
    from perturb_lens.plots.suite import suite_figures
    from perturb_lens.results.summary import summary_rows

    saes = {"local-l1-2": ("local", 40.0), "local-l1-5": ("local", 12.0), "e2e-l1-2": ("e2e", 25.0)}
    names = ["sae-error", "cov-random-mixture", "isotropic"]
    cfg = load_config().model_dump(mode="json")
    cfg["directions"] = [{"name": n} for n in names]
    for i, label in enumerate(saes):
        make_run(tmp_path / label, cfg, rows=synthetic_rows(names, seed=i))
    records = [{"label": k, "type": t, "l0": l0} for k, (t, l0) in saes.items()]
    (tmp_path / "saes.json").write_text(json.dumps(records))
    (plot,) = suite_figures(tmp_path, metrics=("kl",))
    panels = [ax for ax in plot.figure.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title() for ax in panels] == ["local", "e2e"]
    norm = LogNorm(12.0, 40.0)
    for ax in panels:
        lines = {line.get_label(): line for line in ax.get_lines()}
        for label, (kind, l0) in saes.items():
            if kind != ax.get_title():
                continue
            cv = curves(summary_rows(tmp_path / label), "kl").set_index(["direction", "length"])
            line = lines[f"{label} (L0 {l0:.3g})"]
            np.testing.assert_array_equal(line.get_xdata(), cv.loc["sae-error"].index.to_numpy())
            np.testing.assert_allclose(line.get_ydata(), cv.loc["sae-error", "mean"], rtol=1e-12)
            assert to_rgba(line.get_color()) == to_rgba(colormaps["viridis"](norm(l0)))
        first = next(k for k, (t, _) in saes.items() if t == ax.get_title())
        cv = curves(summary_rows(tmp_path / first), "kl").set_index(["direction", "length"])
        for baseline in ("cov-random-mixture", "isotropic"):
            np.testing.assert_allclose(
                lines[baseline].get_ydata(), cv.loc[baseline, "mean"], rtol=1e-12
            )
            assert lines[baseline].get_linestyle() == "--"
    assert set(plot.data["sae"]) == set(saes)


def test_run_suite_records_l0_and_writes_figures_5_6(llama_dir: Path, tmp_path: Path) -> None:
    """``run_suite`` on two random SAEs: ``saes.json`` holds each one's L0, here recomputed from
    transformers' activations (latents > 0, positions 1 .. T-2: no BOS, no last position), and
    figures 5-6 are written."""
    import json

    from perturb_lens.workflows.sae_suite import SAESuiteConfig, run_suite

    hf = AutoModelForCausalLM.from_pretrained(llama_dir)
    d = hf.config.hidden_size
    hook = "blocks.1.hook_resid_pre"
    saes = {
        "local-l1-1": random_sae(d, 96, hook=hook, bias=-0.2),
        "e2e-l1-1": random_sae(d, 96, hook=hook, bias=-1.0, seed=1),
    }
    for label, sae in saes.items():
        sae.save(tmp_path / "saes" / label)
    src = tmp_path / "text.txt"
    src.write_text("The cat sat on the mat and looked at the dog for a while.\n" * 20)
    cfg = SAESuiteConfig(
        name="s",
        base={
            "model": str(llama_dir),
            "frame": "raw",
            "lengths": [0.0, 2.0],
            "metrics": ["kl"],
            "data": {"source": str(src), "seq_len": T, "n_seqs": 2},
            "stats": {"pool_size": 8},
            "include_bos": False,
            "directions": ["sae-error", "isotropic"],
        },
        saes=[{"label": k, "sae": str(tmp_path / "saes" / k)} for k in saes],
    )
    out = run_suite(cfg, tmp_path / "suite", progress=False)
    records = {r["label"]: r for r in json.loads((out / "saes.json").read_text())}
    assert {k: r["type"] for k, r in records.items()} == {"local-l1-1": "local", "e2e-l1-1": "e2e"}
    from perturb_lens import load_model
    from perturb_lens.data.text import dataset_tokens

    tokens = dataset_tokens(
        validate_config(cfg.run_config(cfg.saes[0], hook)).data, load_model(str(llama_dir))
    )
    x, _, _ = hooked_forward(hf, tokens, 1, "hook_resid_pre", None)
    for label, sae in saes.items():
        with torch.no_grad():
            f = sae.encode(x[:, 1:-1].float())
        # one latent within float32 rounding of 0 may flip between the two float32 forwards
        ref = float((f > 0).sum(-1).double().mean())
        assert abs(records[label]["l0"] - ref) <= 1.0 / f.shape[0] / f.shape[1] + 1e-9
    assert (out / "figures" / "fig5_6_kl.png").is_file()


def test_cli_prints_the_cosine_tables(gpt2_dir: Path, webtext_path: Path, tmp_path: Path) -> None:
    """``perturb-lens run`` of a same-cosine config with an SAE folder: the means by cosine and
    the SAE bins are printed; no verdicts (directions are not swept by length here)."""
    import yaml
    from typer.testing import CliRunner

    from perturb_lens.cli.app import app

    random_sae(64, 128, hook="blocks.1.hook_resid_pre", bias=-0.5).save(tmp_path / "sae")
    cfg = _config(
        gpt2_dir,
        "blocks.1.hook_resid_pre",
        sae=str(tmp_path / "sae"),
        metrics=["kl"],
        directions=["isotropic"],
        data={"source": str(webtext_path), "seq_len": 8, "n_seqs": 2},
        same_cosine={"cosines": [0.5, 1.0], "norm_ratio": "sae"},
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 0, result.output
    assert (
        "mean kl by cosine to x" in result.output
        and "SAE(x) points per cosine bin" in result.output
    )
    words = " ".join(result.output.split())
    assert "SAE(x) against random targets at its own cosine (kl)" in words
    assert "verdict" not in result.output.lower()


def test_sae_vs_random_at_its_own_cosine_closed_form() -> None:
    """Random curves KL = s (1 - cos) (linear, so the interpolation is exact) and SAE(x) KL =
    2 s (1 - cos_sae) per token: the ratio is exactly 2 and, every resample giving 2, so is its
    interval; a token whose SAE cosine lies below the grid is left out; a second generator with
    curves 4 s (1 - cos) gives 0.5."""
    from perturb_lens.experiments.same_cosine import sae_vs_random

    rng = np.random.default_rng(0)
    grid = [0.5, 0.7, 0.9, 1.0]
    rows = []
    for seq in range(6):
        for pos in range(5):
            s, cos_sae = rng.uniform(0.5, 2.0), rng.uniform(0.6, 0.99)
            if (seq, pos) == (0, 0):
                cos_sae = 0.3  # outside the grid: not used
            for label, slope in (("isotropic", 1.0), ("real", 4.0)):
                for c in grid:
                    rows.append((seq, pos, label, c, c, slope * s * (1 - c)))
            near = float(nearest(grid, np.array([cos_sae]))[0])
            rows.append((seq, pos, SAE_LABEL, near, cos_sae, 2 * s * (1 - cos_sae)))
    df = pd.DataFrame(rows, columns=["seq", "pos", "direction", "length", "cosine", "kl"])
    df["direction"] = pd.Categorical(df["direction"], ["isotropic", "real", SAE_LABEL])
    out = sae_vs_random(df).set_index("direction")
    for label, want in (("isotropic", 2.0), ("real", 0.5)):
        r = out.loc[label]
        assert r["ratio"] == pytest.approx(want, rel=1e-12)
        assert r["ci_low"] == pytest.approx(want, rel=1e-12)
        assert r["ci_high"] == pytest.approx(want, rel=1e-12)
        assert r["n_tokens"] == 6 * 5 - 1 and r["n_seqs"] == 6


def test_all_positions_sae_point_is_sae_substitution_and_bos_stays(
    llama_dir: Path, tmp_path: Path
) -> None:
    """Under the all-positions scope with ``include_bos: false``, the SAE(x) rows are SAE(x)
    substituted at every position but BOS: their mean KL over the counted positions equals
    ``sae_stats``' KL (itself pinned to plain transformers forwards in test_loss_recovered), in
    float64 to 1e-9; BOS is never replaced (zero step, zero KL), for the random targets too."""
    from perturb_lens.saes.quality import sae_stats

    model = load_model(str(llama_dir), frame="raw", dtype="float64", device="cpu")
    tokens = _tokens(vocab=model.spec.vocab_size)
    tokens[:, 0] = model.bos_token_id
    hook = "blocks.1.hook_resid_pre"
    sae = random_sae(model.spec.d_model, 128, hook=hook, bias=-0.5).double()
    sae.cfg.skip_bos = True
    cfg = _config(
        llama_dir,
        hook,
        dtype="float64",
        include_bos=False,
        directions=["isotropic"],
        same_cosine={"cosines": [0.5, 1.0], "norm_ratio": 0.9},
    )
    rows = _rows(cfg, tmp_path, model=model, tokens=tokens, sae=sae)
    bos = rows[rows["pos"] == 0]
    assert (bos["size"] == 0).all() and (bos["kl"].abs() <= 1e-12).all()
    counted = rows[(rows["pos"] >= 1) & (rows["pos"] <= T - 2)]
    got = counted.loc[counted["direction"] == SAE_LABEL, "kl"].mean()
    (want,) = sae_stats(sae, model, tokens, progress=False)
    assert abs(got - want.kl) <= 1e-9 * max(1.0, want.kl)
