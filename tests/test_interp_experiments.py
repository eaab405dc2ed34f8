"""Synthetic-activation, plateau and stable-region runs on a random GPT-2 vs plain HF forwards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import EPS32, float32_tol, kl_floor32, logit_bound
from random_sae import random_sae

from perturb_lens import load_model, run_experiment
from perturb_lens.analysis.curve_shape import curve_statistics, ks_vs_reference
from perturb_lens.config.schema import load_config, validate_config
from perturb_lens.engine.shard import shard_directions
from perturb_lens.experiments.plateaus import base_points
from perturb_lens.experiments.stable_regions import sharpness_quantiles
from perturb_lens.results.store import load_results
from perturb_lens.workflows.experiment import prepare
from perturb_lens.workflows.sharpness import stable_region_sharpness

HOOK = "blocks.1.hook_resid_pre"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def model(gpt2_dir: Path):
    return load_model(str(gpt2_dir), frame="raw")


@pytest.fixture(scope="module")
def tokens(model) -> torch.Tensor:
    t = torch.randint(0, 5000, (6, 10), generator=torch.Generator().manual_seed(3))
    t[:, 0] = model.bos_token_id
    return t


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory: pytest.TempPathFactory, model) -> Path:
    return random_sae(model.spec.d_model, 256, bias=-1.0).save(tmp_path_factory.mktemp("sae"))


def hf_last_read(gpt2_dir: Path, tokens: torch.Tensor, x_last: torch.Tensor | None = None):
    """HF GPT-2: the last block's output at the last position, with block 1's input at the last
    position replaced by ``x_last`` [B, d] (None: clean)."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    seen: list[torch.Tensor] = []

    def put(_module, args, kwargs):
        h = args[0].clone()
        h[:, -1] = x_last
        return (h, *args[1:]), kwargs

    def read(_module, _args, output):
        seen.append((output[0] if isinstance(output, tuple) else output)[:, -1])

    hooks = [hf.transformer.h[-1].register_forward_hook(read)]
    if x_last is not None:
        hooks.append(hf.transformer.h[1].register_forward_pre_hook(put, with_kwargs=True))
    with torch.no_grad():
        hf(tokens)
    for h in hooks:
        h.remove()
    return seen[0].double()


def l2_tol(*reads: torch.Tensor) -> float:
    """L2 distance of two float32 reads of this GPT-2 (3 blocks of width 64 after HOOK) against
    the same from HF: each read errs by float32_tol in norm (8 sqrt(3 * 64) eps = 1.3e-5 of the
    largest read norm), the distance by twice that."""
    return 2 * float32_tol(torch.cat([r.norm(dim=-1) for r in reads]), 3, 64)


def assert_floor_at_zero(df: pd.DataFrame, gpt2_dir: Path, *reads: torch.Tensor) -> None:
    """Length 0 is the float32 noise floor: L2 of two float32 computations of one read
    (float32_tol of the read norms, 1.3e-5 |read|), KL 4 eps max|logit| (kl_floor32)."""
    from transformers import GPT2LMHeadModel

    zero = df[df.length == 0]
    max_logit = logit_bound(GPT2LMHeadModel.from_pretrained(gpt2_dir))
    assert zero["l2"].abs().max() <= float32_tol(torch.cat([r.norm(dim=-1) for r in reads]), 3, 64)
    assert zero["kl"].abs().max() <= kl_floor32(max_logit)


def base_config(gpt2_dir: Path, **over) -> dict:
    cfg = {
        "model": str(gpt2_dir),
        "frame": "raw",
        "hook": HOOK,
        "scope": "last-position",
        "lengths": "0:1:0.1",
        "metrics": ["l2", "kl"],
        "data": {"n_seqs": 6, "seq_len": 10},
        "stats": {"pool_size": 54},
        "shard_seqs": 4,
    }
    return {**cfg, **over}


def test_synthetic_activation_targets(tmp_path, gpt2_dir, model, tokens, sae_dir) -> None:
    raw = {"scale": "raw"}
    directions = [
        {"name": "real-difference", "label": "real", **raw},
        {"name": "cov-random-difference", "label": "cov-random", **raw},
        {"name": "synthetic", "label": "bag", "kind": "bag", **raw},
        {"name": "synthetic", "label": "structured", "kind": "structured", "norm": "real", **raw},
        {"name": "sae-reconstruction", **raw},
        {"name": "sae-latent", **raw},
    ]
    cfg = base_config(
        gpt2_dir, experiment="synthetic-activations", sae=str(sae_dir), directions=directions
    )
    df = load_results(run_experiment(cfg, tmp_path / "r", model=model, tokens=tokens))
    assert set(df["pos"]) == {9} and len(df) == 6 * 6 * 11
    # at length 0 every row reads the clean x (measured: L2 1.5e-6 vs 6e-5, KL 3e-8 vs 2.7e-6)
    assert_floor_at_zero(df, gpt2_dir, hf_last_read(gpt2_dir, tokens))
    stats = curve_statistics(df, "l2")
    assert len(stats) == 36 and stats["max_slope_step"].between(1, 10).all()
    table = ks_vs_reference(stats, reference="real")
    assert set(table["direction"]) == {
        d["label"] if "label" in d else d["name"] for d in directions
    }
    # t = 1 lands on the target y (norm: a real activation's); the output there is HF's with y
    ctx = prepare(validate_config(cfg), tmp_path / "r", model=model)
    clean = model.run_clean(tokens[:4], HOOK)
    d = shard_directions(ctx, "s00000", clean.x)["structured"][:, -1].double()
    y = clean.x[:, -1].double() + d
    pool_norms = ctx.pool.double().norm(dim=-1).numpy()
    x_norms = clean.x[:, -1].double().norm(dim=-1).numpy()
    for n, xn in zip(y.norm(dim=-1).numpy(), x_norms, strict=True):
        # the target is rescaled in float64 and rounded to float32 (eps / 2 of |y|), d = y - x
        # rounded once more (eps / 2 of |y| + |x|): ~3 eps relative (measured 1.5e-8)
        assert np.isclose(pool_norms, n, rtol=EPS32 * (2 + xn / n), atol=0).any()
    read_y, read_x = hf_last_read(gpt2_dir, tokens[:4], y), hf_last_read(gpt2_dir, tokens[:4])
    naive = (read_y - read_x).norm(dim=-1)
    got = df[(df.direction == "structured") & (df.length == 1.0) & (df.seq < 4)].sort_values("seq")
    # l2_tol: 1.1e-4 here (measured 4.8e-7)
    np.testing.assert_allclose(got["l2"], naive.numpy(), rtol=0, atol=l2_tol(read_y, read_x))
    # the same float32 vector's norm, in float32 vs float64: <= 64 eps = 7.6e-6 (measured 2.9e-8)
    np.testing.assert_allclose(got["size"], d.norm(dim=-1).numpy(), rtol=64 * EPS32)


def test_plateaus_real_base_is_the_plain_sweep(tmp_path, gpt2_dir, model, tokens, sae_dir):
    over = {"sae": str(sae_dir), "directions": ["isotropic"], "lengths": [0, 1, 2, 4, 8]}
    plain = load_results(
        run_experiment(base_config(gpt2_dir, **over), tmp_path / "p", model=model, tokens=tokens)
    )
    cfg = base_config(gpt2_dir, experiment="plateaus", **over)
    out = run_experiment(cfg, tmp_path / "q", model=model, tokens=tokens)
    df = load_results(out)
    assert set(df["base"]) == {"real", "synthetic", "cov-random"}
    real = df[df.base == "real"].drop(columns="base").reset_index(drop=True)
    cols = ["seq", "pos", "length"]
    pd.testing.assert_frame_equal(real[cols], plain[cols], check_dtype=False)
    # two runs computing the same rows in other batches (kernels may sum in another order). L2:
    # l2_tol with |perturbed read| <= |clean read| + l2 (triangle inequality). KL: a logit errs
    # by sqrt(3 * 64) eps max|logit|, KL by 2 such per distribution (test_engine's
    # float32_tolerances): 4 sqrt(192) eps 5.7 = 3.8e-5 (measured L2 9.5e-7, KL 7.5e-8)
    from transformers import GPT2LMHeadModel

    largest = hf_last_read(gpt2_dir, tokens).norm(dim=-1).max() + plain["l2"].max()
    l2_atol = 2 * float32_tol(largest, 3, 64)
    max_logit = logit_bound(GPT2LMHeadModel.from_pretrained(gpt2_dir))
    np.testing.assert_allclose(real["l2"], plain["l2"], rtol=0, atol=l2_atol)
    np.testing.assert_allclose(
        real["kl"], plain["kl"], rtol=0, atol=4 * 192**0.5 * EPS32 * max_logit
    )
    ctx = prepare(validate_config(cfg), out, model=model)
    clean = model.run_clean(tokens[:4], HOOK)
    bases = [  # every base of both shards (4 + 2 sequences), for the norms of their reads
        hf_last_read(gpt2_dir, tokens[s], b)
        for sid, s in (("s00000", slice(0, 4)), ("s00001", slice(4, 6)))
        for b in base_points(ctx, sid, model.run_clean(tokens[s], HOOK).x).values()
    ]
    # measured: L2 1.5e-6 vs 1.2e-4, KL 3.2e-8 vs 2.7e-6
    assert_floor_at_zero(df, gpt2_dir, *bases)
    # around the synthetic base: the distance between HF outputs at base + 8 u and at the base
    base = base_points(ctx, "s00000", clean.x)["synthetic"].double()
    u = shard_directions(ctx, "s00000", clean.x)["isotropic"][:, -1].double()
    read_u = hf_last_read(gpt2_dir, tokens[:4], base + 8 * u)
    read_b = hf_last_read(gpt2_dir, tokens[:4], base)
    got = df[(df.base == "synthetic") & (df.length == 8) & (df.seq < 4)].sort_values("seq")
    # l2_tol: 2.4e-4 here (measured 5.5e-7)
    atol = l2_tol(read_u, read_b)
    np.testing.assert_allclose(got["l2"], (read_u - read_b).norm(dim=-1).numpy(), rtol=0, atol=atol)
    stats = curve_statistics(df)
    assert len(stats) == 6 * 3 and {"plateau_length", "base"} <= set(stats.columns)


def test_stable_regions_end_point_is_prompt_b(tmp_path, gpt2_dir, llama_dir, model, tokens):
    cfg = base_config(gpt2_dir, experiment="stable-regions", metrics=["l2"], frame=None)
    models = [model, str(llama_dir)]  # a loaded model and a path (same tokenizer: shared tokens)
    stats = stable_region_sharpness(models, cfg, tmp_path / "s", tokens=tokens, progress=False)
    df = load_results(sorted((tmp_path / "s").iterdir())[0])
    end = df[df.length == 1.0].sort_values("seq")
    # next-prompt replacement: prompt B = prompt A with the next prompt's last token
    np.testing.assert_array_equal(end["token_b"], np.roll(tokens[:, -1].numpy(), -1))
    tokens_b = tokens.clone()
    tokens_b[:, -1] = torch.as_tensor(end["token_b"].to_numpy().copy())
    read_b, read_a = hf_last_read(gpt2_dir, tokens_b), hf_last_read(gpt2_dir, tokens)
    naive = (read_b - read_a).norm(dim=-1)
    # l2_tol: 1.2e-4 here (measured 5.6e-7)
    np.testing.assert_allclose(end["l2"], naive.numpy(), rtol=0, atol=l2_tol(read_b, read_a))
    assert len(stats) == 12 and stats["sharpness"].between(0, 1).all()
    q = sharpness_quantiles(stats)
    assert list(q.columns) == ["model", "n", "q25", "median", "q75", "mean"]
    assert list(q["model"]) == sorted([model.source, str(llama_dir)])


@pytest.mark.parametrize(
    "name",
    [
        "synthetic_activations_gpt2.yaml",
        "synthetic_activations_smollm2.yaml",
        "plateaus_gpt2.yaml",
        "plateaus_smollm2.yaml",
        "stable_regions_gpt2.yaml",
        "stable_regions_smollm2.yaml",
    ],
)
def test_presets_parse(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    assert cfg.scope == "last-position" and cfg.data.seq_len == 10


def test_cli_prints_curve_tables(tmp_path, gpt2_dir, webtext_path) -> None:
    import yaml
    from typer.testing import CliRunner

    from perturb_lens.cli.app import app

    cfg = base_config(gpt2_dir, experiment="stable-regions", lengths="0:1:0.25", metrics=["l2"])
    cfg["data"] = {"source": str(webtext_path), "seq_len": 10, "n_seqs": 4}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 0, result.output
    assert "sharpness (l2)" in result.output and "prompt-pair" in result.output
