"""Direction generators: unit norm, (no) correlation with -x, distributions, reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import EPS32

from perturb_lens.config.schema import BASELINES
from perturb_lens.directions import base as D
from perturb_lens.directions.base import (
    DirectionContext,
    explicit_directions,
    get_direction,
    list_directions,
    make_directions,
    register_direction,
    same_cosine_target,
)
from perturb_lens.statistics.activations import fit_stats

BUILTINS = [*BASELINES, "ablation"]  # the config's default baselines, and -x
MIXTURES = ["isotropic", "cov-random-mixture", "real-mixture"]
DIFFERENCES = ["isotropic-difference", "cov-random-difference", "real-difference", "ablation"]
Z = 5.5  # z-score bound of statistical checks

N, DIM = 4000, 32


def structured(n: int, gen: torch.Generator) -> torch.Tensor:
    """Activations with a large common mean (norm ~40 vs per-token spread ~7) and low-rank
    structure, like a residual stream."""
    mix = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(123)) / math.sqrt(DIM)
    scales = torch.logspace(0.5, -1, DIM)
    return MU + (torch.randn(n, DIM, generator=gen) * scales) @ mix


MU = 40.0 * torch.nn.functional.normalize(torch.linspace(-1, 2, DIM), dim=0)


@pytest.fixture(scope="module")
def data():
    x = structured(N, torch.Generator().manual_seed(0))
    pool = structured(N, torch.Generator().manual_seed(1))
    stats = fit_stats([pool], hook="blocks.1.hook_resid_pre", frame="raw")
    return x, pool, stats


def ctx_for(data, seed: int = 1000, **options) -> DirectionContext:
    """A context; the default seed differs from the data's (the same stream would correlate)."""
    x, pool, stats = data
    return DirectionContext(x, stats, pool, torch.Generator().manual_seed(seed), dict(options))


def mean_cos_bound(c: torch.Tensor) -> tuple[float, float]:
    """Mean of per-token cosines and Z standard errors of that mean."""
    c = c.double()
    return float(c.mean()), Z * float(c.std()) / math.sqrt(len(c))


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


@pytest.mark.parametrize("name", BUILTINS)
def test_unit_norm_float32(data, name):
    d = make_directions(name, ctx_for(data))
    assert d.shape == (N, DIM) and d.dtype == torch.float32
    # normalised in float32 at worst: a sum of DIM squares errs by <= (DIM + 1) eps, halved by
    # the root, plus root, division and rounding: (DIM / 2 + 4) eps = 2.4e-6 (measured 3.0e-8)
    torch.testing.assert_close(
        d.double().norm(dim=1),
        torch.ones(N, dtype=torch.float64),
        atol=(DIM / 2 + 4) * EPS32,
        rtol=0,
    )


@pytest.mark.parametrize("name", MIXTURES)
def test_mixtures_uncorrelated_with_x(data, name):
    x = data[0]
    d = make_directions(name, ctx_for(data))
    for ref in (-x, -(x - MU)):  # neither -x nor its centered part
        m, bound = mean_cos_bound(cos(d, ref))
        assert abs(m) < bound, (name, m, bound)
    assert next(i for i in list_directions() if i.name == name).contains_minus_x is False


@pytest.mark.parametrize("name", DIFFERENCES)
def test_differences_contain_minus_x(data, name):
    x = data[0]
    d = make_directions(name, ctx_for(data))
    m, bound = mean_cos_bound(cos(d, -x))
    assert m > 0.1 and m > 3 * bound, (name, m, bound)  # bound: 5.5 standard errors
    assert next(i for i in list_directions() if i.name == name).contains_minus_x is True
    if name in ("cov-random-difference", "real-difference"):
        # s - x = (s - mu) - (x - mu) with independent equal-covariance parts: cos ~ 1/sqrt(2)
        m_c, _ = mean_cos_bound(cos(d, -(x - MU)))
        assert 0.6 < m_c < 0.8


def test_ablation_is_minus_x(data):
    x = data[0]
    d = make_directions("ablation", ctx_for(data))
    # d is -x / |x| rounded per coordinate (relative eps): its cosine with -x moves by <= eps^2
    # (measured 7.8e-16)
    torch.testing.assert_close(cos(d, -x), torch.ones(N, dtype=torch.float64), atol=EPS32, rtol=0)
    x0 = x[:5].clone()
    x0[2] = 0
    d0 = make_directions("ablation", DirectionContext(x0, None, None, torch.Generator()))
    assert torch.equal(d0[2], torch.zeros(DIM))  # nothing to ablate: no perturbation
    # float32 normalisation, then a float32 norm: 2 (DIM / 2 + 4) eps = 4.8e-6 < allclose's 1e-5
    assert torch.allclose(d0[[0, 1, 3, 4]].norm(dim=1), torch.ones(4))


def test_cov_random_raw_distributions(data):
    """Raw cov-random draws: s - x + x ~ N(mu, Sigma + jI) and s1 - s2 ~ N(0, 2 (Sigma + jI))."""
    x, _, stats = data
    target = (stats.cov + stats.jitter * torch.eye(DIM, dtype=torch.float64)).numpy()
    s = (get_direction("cov-random-difference")(ctx_for(data)) + x).double().numpy()
    mix = get_direction("cov-random-mixture")(ctx_for(data)).double().numpy()
    for sample, mean, cov in ((s, stats.mean.numpy(), target), (mix, np.zeros(DIM), 2 * target)):
        v = np.diag(cov)
        assert np.all(np.abs(sample.mean(0) - mean) < Z * np.sqrt(v / N))
        sd = np.sqrt((cov**2 + np.outer(v, v)) / N)
        assert np.all(np.abs(np.cov(sample, rowvar=False) - cov) < Z * sd)


@pytest.mark.parametrize("name", BUILTINS)
def test_reproducible(data, name):
    a = make_directions(name, ctx_for(data, seed=7))
    b = make_directions(name, ctx_for(data, seed=7))
    assert torch.equal(a, b)
    if name != "ablation":
        assert not torch.equal(a, make_directions(name, ctx_for(data, seed=8)))


def test_isotropic_difference_sigma(data):
    x, _, stats = data
    fn = get_direction("isotropic-difference")
    sigma = stats.median_norm
    for options, want in (
        ({}, sigma),
        ({"sigma": 3.0}, 3.0),
        ({"sigma": "norm-matched"}, sigma / math.sqrt(DIM)),
    ):
        r = (fn(ctx_for(data, **options)) + x).double()
        # per coordinate N(0, want^2): sd of the sample sd ~ want / sqrt(2 N d)
        assert abs(float(r.std()) / want - 1) < Z / math.sqrt(2 * N * DIM)
        # ||r|| ~ want * chi_d: mean want * sqrt(d) * (1 - 1/(4d)), sd ~ want / sqrt(2) per token
        norms = r.norm(dim=1) / (want * math.sqrt(DIM))
        assert abs(float(norms.mean()) - (1 - 1 / (4 * DIM))) < Z / math.sqrt(2 * DIM * N) + 1e-3
    with pytest.raises(ValueError, match="median-norm"):
        make_directions("isotropic-difference", ctx_for(data, sigma="median"))
    with pytest.raises(ValueError, match="Unknown option"):
        make_directions("isotropic-difference", ctx_for(data, sigmaa=1.0))


def test_isotropic_difference_gpt2_scale_is_nearly_isotropic():
    """Published numbers: sigma 121, d 768, ||x|| ~ 100.

    cos(d, -x) ~ ||x|| / sqrt(121^2 d + ||x||^2) = 0.03: nearly isotropic."""
    gen = torch.Generator().manual_seed(5)
    x = torch.nn.functional.normalize(torch.randn(500, 768, generator=gen), dim=1) * 100
    ctx = DirectionContext(x, None, None, gen, {"sigma": 121.0})
    c = cos(make_directions("isotropic-difference", ctx), -x)
    expected = 100 / math.sqrt(121**2 * 768 + 100**2)  # 0.0298
    m, bound = mean_cos_bound(c)
    assert abs(m - expected) < bound


def test_same_cosine_target():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(64, 16, generator=gen, dtype=torch.float64) * 10 + 3
    targets = torch.tensor([-1.0, -0.5, 0.0, 0.3, 0.99, 1.0]).repeat(11)[:64]
    for c, ratio in ((0.3, 1.0), (targets, 0.5), (-0.7, torch.linspace(0.1, 3, 64))):
        y = same_cosine_target(x, c, ratio, gen).numpy()
        xn = x.numpy()
        got_cos = (xn * y).sum(1) / np.linalg.norm(xn, axis=1) / np.linalg.norm(y, axis=1)
        # float64 throughout: 16-term sums round by ~16 * 2^-53 = 2e-15 (measured 2.2e-16)
        np.testing.assert_allclose(got_cos, np.broadcast_to(np.asarray(c), (64,)), atol=1e-12)
        got_ratio = np.linalg.norm(y, axis=1) / np.linalg.norm(xn, axis=1)
        np.testing.assert_allclose(
            got_ratio, np.broadcast_to(np.asarray(ratio), (64,)), rtol=1e-12, atol=0
        )
    y1 = same_cosine_target(x[0].float(), 0.5, 2.0, gen)  # a single [d] vector, float32 kept
    assert y1.shape == (16,) and y1.dtype == torch.float32
    a = same_cosine_target(x, 0.2, 1.0, torch.Generator().manual_seed(1))
    assert not torch.equal(a, same_cosine_target(x, 0.2, 1.0, torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="cos"):
        same_cosine_target(x, 1.5, 1.0, gen)


def test_unknown_name_lists_registered():
    with pytest.raises(KeyError) as err:
        get_direction("isotropc")
    msg = str(err.value)
    assert msg.startswith("Unknown direction 'isotropc'")
    for name in BUILTINS:
        assert name in msg
    with pytest.raises(KeyError, match="real-mixture"):
        make_directions("nope", DirectionContext(torch.zeros(2, 3), None, None, torch.Generator()))


def test_register_custom_direction(data, monkeypatch):
    saved = D.DIRECTIONS.snapshot()
    monkeypatch.setattr(D.DIRECTIONS, "_entries", dict(saved))

    @register_direction("mean-ablation", contains_minus_x=True, description="mu - x")
    def mean_ablation(ctx):
        return ctx.stats.mean.to(ctx.x.device) - ctx.x.double()

    x, _, stats = data
    d = make_directions("mean-ablation", ctx_for(data))
    # d: mu - x normalised and rounded to float32 per coordinate: cosine 1 - O(eps^2)
    torch.testing.assert_close(cos(d, stats.mean - x.double()), torch.ones(N, dtype=torch.float64))
    assert "mean-ablation" in [i.name for i in list_directions()]
    with pytest.raises(ValueError, match="overwrite=True"):
        register_direction("isotropic", contains_minus_x=False, description="")(mean_ablation)
    register_direction("isotropic", contains_minus_x=False, description="", overwrite=True)(
        mean_ablation
    )
    assert get_direction("isotropic") is mean_ablation


def test_explicit_directions(data):
    v = torch.arange(DIM, dtype=torch.float32) + 1
    d = make_directions(explicit_directions(v), ctx_for(data))
    # the same float32 formula; another summation order moves it by <= (DIM / 2 + 2) eps = 2e-6,
    # inside torch's float32 defaults (atol 1e-5) for entries <= 1
    torch.testing.assert_close(d, (v / v.norm()).expand(N, DIM))
    per_token = torch.randn(N, DIM) * 7
    d = make_directions(explicit_directions(per_token), ctx_for(data))
    torch.testing.assert_close(d, per_token / per_token.norm(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="do not fit"):
        make_directions(explicit_directions(torch.ones(3, DIM)), ctx_for(data))
    with pytest.raises(ValueError, match="zero norm"):  # at unit scale; raw keeps zero rows
        make_directions(explicit_directions(torch.zeros(N, DIM)), ctx_for(data))
    with pytest.raises(ValueError, match="non-finite"):
        explicit_directions(torch.full((2, DIM), float("inf")))
    with pytest.raises(ValueError, match="returned shape"):
        make_directions(lambda ctx: ctx.x[:3], ctx_for(data))
    with pytest.raises(ValueError, match="non-finite"):
        make_directions(lambda ctx: ctx.x * float("nan"), ctx_for(data))


def test_identical_real_activations_are_redrawn():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, 6, generator=gen)
    ctx = DirectionContext(x, None, x.clone(), gen)  # x_other == x with probability 1/4 per draw
    for name in ("real-difference", "real-mixture"):
        d = make_directions(name, ctx)
        assert torch.allclose(d.norm(dim=1), torch.ones(4))
    same = DirectionContext(x[:1].expand(4, 6), None, x[:1].expand(3, 6), gen)
    for name in ("real-difference", "real-mixture"):
        with pytest.raises(ValueError, match="too few distinct"):
            make_directions(name, same)


def test_missing_inputs_are_explained():
    ctx = DirectionContext(torch.zeros(3, 4), None, None, torch.Generator())
    with pytest.raises(ValueError, match="fit_stats"):
        make_directions("cov-random-mixture", ctx)
    with pytest.raises(ValueError, match="fit_stats"):
        make_directions("isotropic-difference", ctx)  # default sigma needs the median norm
    with pytest.raises(ValueError, match="pool"):
        make_directions("real-mixture", ctx)
