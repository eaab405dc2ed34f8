"""The sweep against the naive reference (one HF forward per length / copy), and its invariants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import EPS32
from naive import naive_sweep
from transformers import AutoModelForCausalLM, AutoTokenizer

from perturb_lens.config.lengths import PRESETS, resolve_lengths
from perturb_lens.engine.sweep import SweepPlan, clean_pass, sweep
from perturb_lens.models.gpt2 import GPT2Lens

SCOPES = ["all-positions", "single-position", "last-position"]


@pytest.fixture(scope="module")
def gpt2(gpt2_dir: Path):
    hf = AutoModelForCausalLM.from_pretrained(gpt2_dir, attn_implementation="eager").eval()
    return hf, GPT2Lens.from_hf(hf, AutoTokenizer.from_pretrained(gpt2_dir), frame="raw")


@pytest.fixture(scope="module")
def gpt2_64(gpt2_dir: Path):
    """transformers' GPT-2 and the native one, both float64 (GPT-2 has no float32 casts inside)."""
    hf = AutoModelForCausalLM.from_pretrained(gpt2_dir, attn_implementation="eager").eval()
    hf = hf.to(torch.float64)
    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    return hf, GPT2Lens.from_hf(hf, tok, frame="raw", dtype=torch.float64)


def _directions(x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Unit directions in the model's dtype (float32, or float64 for the exactness tests)."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch.promote_types(x.dtype, torch.float32)
    return {
        "random": F.normalize(torch.randn(x.shape, generator=g, dtype=dtype), dim=-1),
        "ablation": F.normalize(-x.to(dtype), dim=-1),
    }


def compare_to_naive(
    hf, model, tokens, layer: int, scope: str, lengths: list[float]
) -> tuple[float, float]:
    """Largest |KL diff|, and largest |L2 diff| relative to the norm of the clean read at that
    position (rounding errors scale with the activations compared, not with their difference),
    between engine rows and the naive loop."""
    spec = SweepPlan(hook=f"blocks.{layer}.hook_resid_pre", lengths=lengths, scope=scope)
    clean = clean_pass(model, tokens, spec)
    dirs = _directions(clean.x)
    df = sweep(model, clean, dirs, spec)
    read_norm = clean.reads[model.default_read].double().norm(dim=-1)
    kl_err = l2_err = 0.0
    read_layer = model.spec.n_layers - 1
    for name, d in dirs.items():
        ref = naive_sweep(hf, tokens, layer, d, lengths, scope, read_layer)
        rows = df[df.direction == name]
        assert len(rows) == len(ref)
        for r in rows.itertuples():
            kl_ref, l2_ref = ref[(r.seq, r.pos, float(r.length))]
            kl_err = max(kl_err, abs(r.kl - kl_ref))
            l2_err = max(l2_err, abs(r.l2 - l2_ref) / float(read_norm[r.seq, r.pos]))
    return kl_err, l2_err


def float32_tolerances(model, tokens, layer: int) -> tuple[float, float]:
    """(KL, L2 / ||read||) tolerances for float32 engine vs naive, from the magnitudes involved.

    Every block after the hook rounds the residual (dot products over d terms: a random walk of
    ~sqrt(d) roundings of relative size eps), so after n blocks the read and the final hidden state
    carry a relative error of ~sqrt(n d) eps each; the L2 of two such reads errs by twice that,
    bounded here by n sqrt(d) eps. A logit errs by ~sqrt(n d) eps max|logit|, and KL moves by at
    most 2 max|d logit| for each of the two distributions: 4 sqrt(n d) eps max|logit|.
    SmolLM2 (n 15, d 576, max|logit| 31): KL 1.4e-3, L2 4.3e-5 (measured 1.4e-5, 7.1e-7).
    """
    n, d = model.spec.n_layers - layer, model.spec.d_model
    max_logit = model.logits(tokens).abs().max().item()
    return 4 * (n * d) ** 0.5 * EPS32 * max_logit, n * d**0.5 * EPS32


@pytest.mark.parametrize("scope", SCOPES)
def test_scopes_match_naive_gpt2(gpt2, scope: str) -> None:
    hf, model = gpt2
    tokens = torch.randint(0, 50257, (2, 10), generator=torch.Generator().manual_seed(1))
    kl_err, l2_err = compare_to_naive(hf, model, tokens, 2, scope, [0.0, 1.0, 4.0, 15.0])
    kl_tol, l2_tol = float32_tolerances(model, tokens, 2)
    assert kl_err <= kl_tol and l2_err <= l2_tol


@pytest.mark.exact
@pytest.mark.parametrize("scope", SCOPES)
def test_scopes_match_naive_gpt2_float64(gpt2_64, scope: str) -> None:
    """Exactness: engine and naive loop both in float64 (transformers' GPT-2 is float64 through
    and through), so they agree to float64 rounding (measured 4e-15), far below 1e-9."""
    hf, model = gpt2_64
    tokens = torch.randint(0, 50257, (2, 10), generator=torch.Generator().manual_seed(1))
    kl_err, l2_err = compare_to_naive(hf, model, tokens, 2, scope, [0.0, 1.0, 4.0, 15.0])
    assert kl_err <= 1e-9 and l2_err <= 1e-9


def alpha_zero_tolerances(model, tokens, layer: int) -> tuple[float, float]:
    """(KL, L2 / ||read||) noise floors at alpha = 0 in float32. The continuation recomputes the
    clean function with other kernels: the final state and the read differ by ~sqrt(n d) eps
    relative (n blocks after the hook, width d; see float32_tolerances). KL cancels that to
    first order (kl_linear takes f_pert - f_clean against u = W^T p), leaving the float32
    rounding of the logits in the two log-sum-exps: 2 eps max|logit|, doubled for slack.
    SmolLM2 at layer 15 (max|logit| 31): KL 1.5e-5, L2 1.1e-5."""
    n, d = model.spec.n_layers - layer, model.spec.d_model
    max_logit = model.logits(tokens).abs().max().item()
    return 4 * EPS32 * max_logit, (n * d) ** 0.5 * EPS32


def _alpha_zero_errors(model, tokens, hook: str, scope: str) -> tuple[float, float, float]:
    """Largest KL, L2 / ||clean read|| and JS over every row at alpha = 0."""
    spec = SweepPlan(hook=hook, lengths=[0.0], scope=scope, metrics=["kl", "l2", "js"])
    clean = clean_pass(model, tokens, spec)
    df = sweep(model, clean, _directions(clean.x), spec)
    norms = clean.reads[model.default_read].double().norm(dim=-1).numpy()
    rel = df.l2.to_numpy() / norms[df.seq.to_numpy(), df.pos.to_numpy()]
    return float(df.kl.abs().max()), float(rel.max()), float(df.js.max())


@pytest.mark.parametrize("scope", SCOPES)
def test_alpha_zero_is_noise_floor(gpt2, scope: str) -> None:
    _, model = gpt2
    tokens = torch.randint(0, 50257, (3, 12), generator=torch.Generator().manual_seed(2))
    kl, l2, js = _alpha_zero_errors(model, tokens, "blocks.1.hook_mlp_out", scope)
    kl_tol, l2_tol = alpha_zero_tolerances(model, tokens, 1)
    # JS distance: the square root of a divergence that is at most the KL noise
    assert kl <= kl_tol and l2 <= l2_tol and js <= kl_tol**0.5


@pytest.mark.exact
@pytest.mark.parametrize("scope", SCOPES)
def test_alpha_zero_is_zero_float64(gpt2_64, scope: str) -> None:
    """In float64 the floor is float64 rounding: far below 1e-9 (JS: its square root)."""
    _, model = gpt2_64
    tokens = torch.randint(0, 50257, (3, 12), generator=torch.Generator().manual_seed(2))
    kl, l2, js = _alpha_zero_errors(model, tokens, "blocks.1.hook_mlp_out", scope)
    assert kl <= 1e-9 and l2 <= 1e-9 and js <= 1e-9**0.5


def test_chunking_does_not_change_rows(gpt2) -> None:
    _, model = gpt2
    tokens = torch.randint(0, 50257, (3, 12), generator=torch.Generator().manual_seed(3))
    for scope in SCOPES:
        big = SweepPlan(hook="blocks.2.hook_resid_pre", lengths=[0.0, 3.0, 9.0], scope=scope)
        small = SweepPlan(**{**big.__dict__, "rows_per_pass": 7, "rows_per_logits": 5})
        clean = clean_pass(model, tokens, big)
        dirs = _directions(clean.x)
        a = sweep(model, clean, dirs, big).sort_values(["direction", "seq", "pos", "length"])
        b = sweep(model, clean, dirs, small).sort_values(["direction", "seq", "pos", "length"])
        assert (
            a[["seq", "pos", "length"]].to_numpy().tolist()
            == b[["seq", "pos", "length"]].to_numpy().tolist()
        )
        kl_tol, _ = float32_tolerances(model, tokens, 2)  # other batching: float32 noise only
        assert np.abs(a.kl.to_numpy() - b.kl.to_numpy()).max() <= kl_tol


def test_all_metrics_and_rows(gpt2) -> None:
    _, model = gpt2
    tokens = torch.randint(0, 50257, (2, 6), generator=torch.Generator().manual_seed(4))
    spec = SweepPlan(
        hook="blocks.0.hook_resid_post",
        lengths=[0.0, 50.0],
        metrics=["kl", "js", "dce", "top1", "l2", "cos"],
        read="blocks.2.hook_resid_post",
    )
    clean = clean_pass(model, tokens, spec)
    df = sweep(model, clean, _directions(clean.x), spec, seq_offset=10)
    assert len(df) == 2 * 2 * 6 * 2
    assert sorted(df.seq.unique()) == [10, 11]
    assert df[df.pos == 5].dce.isna().all() and df[df.pos < 5].dce.notna().all()
    zero = df[df.length == 0]
    # reads equal to ~sqrt(n d) eps = 1.6e-6 relative (alpha_zero_tolerances): 1 - cos is
    # second order in that, so only the cosine's own rounding (~sqrt(64) eps = 1e-6) remains
    assert (zero.cos > 1 - 1e-5).all() and not zero.top1.any()
    big = df[df.length == 50]
    assert (big.kl > 0).all() and (big.js > 0).all() and (big.js <= 1.0).all()


def test_length_grids() -> None:
    assert PRESETS["published"][:11] == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 20]
    assert PRESETS["published"][-6:] == [48, 51, 61, 71, 81, 91]
    assert len(PRESETS["published"]) == 23
    assert resolve_lengths("0:1:0.25", scale=2.0) == [0.0, 0.5, 1.0, 1.5, 2.0]
    with pytest.raises(ValueError, match="empty"):
        resolve_lengths([])
    with pytest.raises(ValueError, match=">= 0"):
        resolve_lengths([1.0, -2.0])
    with pytest.raises(ValueError, match="preset"):
        resolve_lengths("paper")


@pytest.mark.parametrize("scope", SCOPES)
def test_scopes_match_naive_smollm2(smollm2, smollm2_hf, scope: str) -> None:
    """The real embedded model: every scope against one HF forward per length / copy."""
    tokens = smollm2.to_tokens(["The quick brown fox jumps over the lazy dog and"])
    # lengths relative to the activation norm at layer 15 (~170): small, medium, large
    kl_err, l2_err = compare_to_naive(smollm2_hf, smollm2, tokens, 15, scope, [10.0, 60.0])
    kl_tol, l2_tol = float32_tolerances(smollm2, tokens, 15)  # 1.4e-3, 4.3e-5: see there
    assert kl_err <= kl_tol and l2_err <= l2_tol


@pytest.mark.slow
@pytest.mark.exact
@pytest.mark.parametrize("scope", SCOPES)
def test_scopes_match_naive_smollm2_float64(smollm2_float64, scope: str) -> None:
    """Exactness on the real model: engine and naive loop both float64 agree to float64 rounding
    (measured: KL 2e-14, L2 / ||read|| 1.4e-15), far below 1e-9."""
    hf, model = smollm2_float64
    tokens = model.to_tokens(["The quick brown fox jumps over the lazy dog and"])
    kl_err, l2_err = compare_to_naive(hf, model, tokens, 15, scope, [10.0, 60.0])
    assert kl_err <= 1e-9 and l2_err <= 1e-9


@pytest.mark.parametrize("scope", SCOPES)
def test_alpha_zero_floor_smollm2(smollm2, scope: str) -> None:
    """float32 noise at alpha = 0, relative to the size of what is compared (BOS norm ~25,000)."""
    tokens = smollm2.to_tokens(["The quick brown fox jumps over the lazy dog and"])
    kl, l2, js = _alpha_zero_errors(smollm2, tokens, "blocks.15.hook_resid_pre", scope)
    kl_tol, l2_tol = alpha_zero_tolerances(smollm2, tokens, 15)  # 1.5e-5, 1.1e-5: see there
    assert kl <= kl_tol and l2 <= l2_tol and js <= kl_tol**0.5
