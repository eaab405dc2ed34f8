"""Direction scales: raw vectors reach their target at t = 1; registered per-token scales."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import EPS32, float32_tol

from perturb_lens import run_experiment
from perturb_lens.directions.base import (
    DirectionContext,
    check_scale,
    list_scales,
    register_scale,
    scaled_directions,
)
from perturb_lens.results.store import load_results


def _ctx(n: int = 5, d: int = 8) -> DirectionContext:
    g = torch.Generator().manual_seed(0)
    return DirectionContext(torch.randn(n, d, generator=g), None, None, g)


def test_raw_scale_keeps_the_vector_and_unit_normalises() -> None:
    ctx = _ctx()
    ablation = scaled_directions("ablation", ctx, "raw")
    torch.testing.assert_close(ablation, -ctx.x)  # exact: negation does not round
    unit = scaled_directions("ablation", ctx, "unit")
    # float32 normalisation of 8 terms and a float32 norm: 2 (8 / 2 + 4) eps = 1.9e-6 < 1e-5
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(5))


def test_registered_scale_multiplies_unit_rows() -> None:
    @register_scale("test-row-index", description="row index + 1", overwrite=True)
    def _rows(ctx: DirectionContext) -> torch.Tensor:
        return torch.arange(1, ctx.x.shape[0] + 1, dtype=torch.float64)

    out = scaled_directions("isotropic", _ctx(), "test-row-index")
    # float32 unit rows of 8 terms times k, normed in float64: (8 / 2 + 4) eps relative
    # (float64's default 1e-7 would be under a float32 rounding)
    torch.testing.assert_close(
        out.double().norm(dim=-1), torch.arange(1, 6).double(), rtol=8 * EPS32, atol=0
    )
    assert "test-row-index" in list_scales()


def test_unknown_scale_lists_known() -> None:
    try:
        check_scale("bogus")
    except ValueError as err:
        assert "raw" in str(err) and "register_scale" in str(err)
    else:
        raise AssertionError("no error")


@pytest.mark.parametrize(
    "dtype", [torch.float32, pytest.param(torch.float64, marks=pytest.mark.exact)]
)
def test_raw_explicit_target_interpolation_reaches_target(gpt2_dir, tmp_path, dtype) -> None:
    """x + t (y - x) at t = 1 equals running the model on y: size column = t * ||y - x||.
    float64: the engine and transformers' GPT-2 (float64 through and through) agree to float64
    rounding; the results store float32 columns, so to their one rounding, eps32 / 2 relative
    (400 times tighter than the float32 check's noise floor)."""
    from perturb_lens.models.load import load_model

    model = load_model(str(gpt2_dir), frame="raw", dtype=dtype)
    tokens = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = model.bos_token_id
    x = model.run_to_hook(tokens, "blocks.1.hook_resid_pre")
    y = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype) * 3
    cfg = {
        "model": str(gpt2_dir),
        "frame": "raw",
        "hook": "blocks.1.hook_resid_pre",
        "scope": "last-position",
        "lengths": [0.0, 0.5, 1.0],
        "metrics": ["l2"],
        "directions": [{"name": "towards-y", "scale": "raw"}],
        "data": {"n_seqs": 2, "seq_len": 6},
        "stats": {"pool_size": 4},
    }
    out = run_experiment(
        cfg,
        tmp_path / "run",
        model=model,
        tokens=tokens,
        explicit={"towards-y": y - x},
        progress=False,
    )
    df = load_results(out).sort_values(["seq", "length"])
    dist = (y - x)[:, -1].norm(dim=-1).numpy()
    # the same vector's norm twice (another kernel may sum the 64 squares in another order):
    # float32 <= 64 eps = 7.6e-6 relative < 1e-5 (measured 0); float64: the float32 column's
    # rounding (measured 2.6e-8)
    rtol = 1e-5 if dtype == torch.float32 else EPS32
    np.testing.assert_allclose(df["size"].to_numpy(), np.outer(dist, [0, 0.5, 1]).ravel(), rtol)
    # naive: the HF model with y substituted at the last position of block 1's input; the
    # output of the last block (resid_post) read by a forward hook
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(gpt2_dir).to(dtype).eval()
    seen: list[torch.Tensor] = []

    def put_y(_module, args, kwargs):
        h = args[0].clone()
        h[:, -1] = y[:, -1]
        return (h, *args[1:]), kwargs

    def read(_module, _args, output):
        seen.append((output[0] if isinstance(output, tuple) else output)[:, -1])

    h_read = hf.transformer.h[-1].register_forward_hook(read)
    with torch.no_grad():
        hf(tokens)
        h_put = hf.transformer.h[1].register_forward_pre_hook(put_y, with_kwargs=True)
        hf(tokens)
    h_put.remove()
    h_read.remove()
    l2_naive = (seen[1] - seen[0]).norm(dim=-1).numpy()
    # each float32 read (3 blocks of width 64 after the hook) errs by float32_tol in norm, the
    # distance by twice that: 2 * 8 sqrt(192) eps * 23.5 = 6.2e-4 (measured 0 on one CPU)
    atol = 2 * float32_tol(torch.cat([seen[0].norm(dim=-1), seen[1].norm(dim=-1)]), 3, 64)
    if dtype == torch.float64:  # the float32 column's rounding: eps32 / 2 of l2 (~24)
        atol = EPS32 * float(np.abs(l2_naive).max())
    np.testing.assert_allclose(df[df.length == 1.0]["l2"].to_numpy(), l2_naive, rtol=0, atol=atol)


def test_unit_directions_under_last_position_have_no_size_column(gpt2_dir) -> None:
    """Unmeasured positions carry zero directions; they must not make a unit run look scaled."""
    from perturb_lens.engine.sweep import SweepPlan, clean_pass, sweep
    from perturb_lens.models.load import load_model

    model = load_model(str(gpt2_dir), frame="raw")
    tokens = torch.randint(0, 1000, (2, 5), generator=torch.Generator().manual_seed(3))
    spec = SweepPlan(hook="blocks.1.hook_resid_pre", lengths=[0.0, 2.0], scope="last-position")
    clean = clean_pass(model, tokens, spec)
    dirs = torch.zeros_like(clean.x)
    dirs[:, -1, 0] = 1.0
    assert "size" not in sweep(model, clean, {"e0": dirs}, spec).columns
    dirs[:, -1, 0] = 3.0
    # exact: 2 * |3 e0| rounds nowhere
    np.testing.assert_allclose(sweep(model, clean, {"e0": dirs}, spec)["size"], [0, 6] * 2)
