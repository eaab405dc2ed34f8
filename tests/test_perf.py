"""Fast paths: blockwise unembedding statistics, reduced-precision block products, batch size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import EPS32
from transformers import AutoModelForCausalLM

from perturb_lens.engine.softmax import lse_linear, softmax_moment
from perturb_lens.engine.sweep import (
    CPU_ROWS_PER_PASS,
    SweepPlan,
    auto_rows_per_pass,
    clean_pass,
    rows_for_memory,
    sweep,
)
from perturb_lens.models.gpt2 import GPT2Lens
from perturb_lens.models.native import resolve_precision


@pytest.fixture(scope="module")
def model(gpt2_dir: Path) -> GPT2Lens:
    hf = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    return GPT2Lens.from_hf(hf, None, frame="raw")


def test_blockwise_softmax_statistics_match_float64() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5000, 32, generator=g)  # not a multiple of the vocabulary block
    b = torch.randn(5000, generator=g)
    f = torch.randn(3, 7, 32, generator=g) * 2
    logits = f.double() @ w.double().T + b.double()
    lse, u = softmax_moment(f, w, b)
    assert lse.shape == (3, 7) and u.shape == (3, 7, 32) and lse.dtype == torch.float64
    # float32 logits (dot products over d = 32) err by ~sqrt(d) eps max|logit| each, and so does
    # their log-sum-exp; u = W^T p moves by that relative change of p times max|w| (factor 4: slack)
    tol = 4 * 32**0.5 * EPS32 * logits.abs().max().item()
    assert (lse - torch.logsumexp(logits, -1)).abs().max() <= tol
    assert (u - torch.softmax(logits, -1) @ w.double()).abs().max() <= tol * w.abs().max()
    assert torch.equal(lse_linear(f, w, b), lse)


def test_downstream_metrics_skip_the_unembedding(model: GPT2Lens, monkeypatch) -> None:
    tokens = torch.randint(0, 50257, (2, 6), generator=torch.Generator().manual_seed(1))
    dirs = F.normalize(torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(2)), dim=-1)

    def fail(*args, **kwargs):
        raise AssertionError("the unembedding ran for an L2-only sweep")

    monkeypatch.setattr(model, "unembed", fail)
    monkeypatch.setattr(model, "linear_unembedding", fail)
    for scope in ("all-positions", "last-position"):
        spec = SweepPlan("blocks.1.hook_resid_pre", [0.0, 2.0], scope=scope, metrics=["l2"])
        df = sweep(model, clean_pass(model, tokens, spec), {"r": dirs}, spec)
        assert list(df.columns[-1:]) == ["l2"] and df.l2.notna().all()


@pytest.mark.parametrize("scope", ["all-positions", "single-position"])
def test_bf16_matmul_agrees_with_float32(model: GPT2Lens, scope: str) -> None:
    """bf16 block products (float32 residual stream, norms, unembedding): KL and L2 within a few
    percent of float32 where they are not tiny (bf16 keeps 8 significant bits)."""
    tokens = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(2))
    spec = SweepPlan(hook="blocks.1.hook_resid_pre", lengths=[0.0, 5.0, 20.0], scope=scope)
    out = {}
    for precision in ("float32", "bf16-matmul"):
        model.precision = precision
        try:
            clean = clean_pass(model, tokens, spec)
            dirs = F.normalize(torch.randn(clean.x.shape, generator=torch.Generator()), dim=-1)
            out[precision] = sweep(model, clean, {"r": dirs}, spec)
        finally:
            model.precision = "float32"
    a, b = out["float32"], out["bf16-matmul"]
    assert (b[b.length == 0].kl.abs().max()) <= 1e-5  # the noise floor stays at zero
    big = (a.length > 0).to_numpy()
    rel_kl = ((a.kl - b.kl).abs() / (a.kl.abs() + 1e-3))[big]
    rel_l2 = ((a.l2 - b.l2).abs() / (a.l2.abs() + 1e-2))[big]
    # bf16 keeps 8 bits (eps 3.9e-3): 0.1 is ~25 bf16 roundings through the 3 blocks, 0.02 ~5
    assert rel_kl.max() <= 0.1 and rel_kl.median() <= 0.02
    assert rel_l2.max() <= 0.05 and rel_l2.median() <= 0.01


def test_precision_names() -> None:
    assert resolve_precision("auto", "cpu") == "float32"
    assert resolve_precision("auto", "cuda") == "tf32"
    assert resolve_precision("bf16-matmul", "cpu") == "bf16-matmul"
    with pytest.raises(ValueError, match="bf16-matmul"):
        resolve_precision("fp8", "cpu")


def test_rows_per_pass_from_free_memory(model: GPT2Lens) -> None:
    assert rows_for_memory(10 * 2**30, 100_000) == 53504  # half of 10 GiB, a multiple of 256
    assert rows_for_memory(80 * 2**30, 1000) == 65536  # capped
    assert rows_for_memory(2**20, 100_000) == 256  # floor
    assert auto_rows_per_pass(model, 128) == CPU_ROWS_PER_PASS  # CPU model: fixed
    small = auto_rows_per_pass(model, 128, free_bytes=2**30)
    large = auto_rows_per_pass(model, 128, free_bytes=16 * 2**30)
    assert 256 <= small < large <= 65536 and small % 256 == 0
