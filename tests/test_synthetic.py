"""Synthetic activations honour their controls: L0, latent cosine bounds, norms, magnitudes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import EPS32, float32_tol
from random_sae import random_sae
from scipy.stats import ks_2samp

from perturb_lens.directions.base import DirectionContext, scaled_directions
from perturb_lens.directions.synthetic import LatentStats, synthesize
from perturb_lens.saes.sae import SAE

D_IN, D_SAE = 32, 128
# A float32 vector rescaled to a norm, that norm taken in float64: the float32 sum of D_IN squares
# errs by <= (D_IN + 1) eps (any summation order), halved by the square root, plus the root, the
# division and the product: (D_IN / 2 + 4) eps = 20 eps = 2.4e-6 relative.
NORM_RTOL = (D_IN / 2 + 4) * EPS32


@pytest.fixture(scope="module")
def sae() -> SAE:
    return random_sae(D_IN, D_SAE)


@pytest.fixture(scope="module")
def pool() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return 2.0 * torch.randn(3000, D_IN, generator=g)


@pytest.fixture(scope="module")
def lstats(sae: SAE, pool: torch.Tensor) -> LatentStats:
    return LatentStats.fit(sae, pool, batch=700)


def pairwise_cos(sae: SAE, idx: np.ndarray) -> np.ndarray:
    d = sae.decoder_directions().double().numpy()[idx]
    return (d @ d.T)[np.triu_indices(len(idx), 1)]


def test_latent_stats_match_a_dense_encode(sae: SAE, pool: torch.Tensor, lstats: LatentStats):
    f = sae.encode(pool).detach().numpy()
    np.testing.assert_array_equal(lstats.l0, (f > 0).sum(1))
    np.testing.assert_allclose(lstats.frequency, (f > 0).mean(0))
    j = int(np.argmax(lstats.frequency))
    both = ((f > 0) & (f[:, [j]] > 0)).sum(0)
    np.testing.assert_array_equal(lstats.cooccurrence(j), both)
    assert 1 < lstats.l0.mean() < 20  # sparse, but not empty


@pytest.mark.parametrize("kind", ["bag", "structured"])
def test_fixed_l0_distinct_latents_and_real_magnitudes(sae, lstats, kind) -> None:
    rng = np.random.default_rng(0)
    syn = synthesize(sae, lstats, 50, kind=kind, l0=6, rng=rng)
    acts = lstats.acts.tocsc()
    for y, idx, m in zip(syn.y, syn.latents, syn.magnitudes, strict=True):
        assert len(idx) == 6 and len(set(idx.tolist())) == 6
        for j, mj in zip(idx, m, strict=True):
            assert mj in acts[:, j].data  # drawn from the latent's own real activations
        expected = sae.b_dec.double() + torch.from_numpy(m) @ sae.W_dec.double()[idx]
        # float32 sum of b_dec and 6 rounded products: <= 8 eps of the sum of their magnitudes
        # (measured 4.6e-7, bound ~1e-5)
        mags = (
            sae.b_dec.double().abs() + torch.from_numpy(np.abs(m)) @ sae.W_dec.double()[idx].abs()
        )
        assert ((y.double() - expected).abs() <= 8 * EPS32 * mags).all()


def test_real_l0_distribution(sae, lstats) -> None:
    syn = synthesize(sae, lstats, 2000, kind="bag", rng=np.random.default_rng(1))
    measured = np.array([len(i) for i in syn.latents])
    assert ks_2samp(measured, lstats.l0).statistic < 0.05
    assert abs(measured.mean() - lstats.l0.mean()) < 0.2


def test_cosine_bounds(sae, lstats) -> None:
    for kind in ("bag", "structured"):
        syn = synthesize(
            sae, lstats, 40, kind=kind, l0=5, cosine=[-0.25, 0.3], rng=np.random.default_rng(2)
        )
        for idx in syn.latents:
            assert len(idx) == 5
            c = pairwise_cos(sae, idx)
            assert c.min() >= -0.25 and c.max() <= 0.3
    lo, hi = lstats.cosine_range
    assert -1 <= lo < hi <= 1
    syn = synthesize(sae, lstats, 30, l0=4, cosine="real", rng=np.random.default_rng(3))
    for idx in syn.latents:
        c = pairwise_cos(sae, idx)
        assert c.min() >= lo and c.max() <= hi


def test_norm_controls(sae, lstats) -> None:
    syn = synthesize(sae, lstats, 60, norm="real", rng=np.random.default_rng(4))
    # measured 2.7e-8
    np.testing.assert_allclose(
        syn.y.double().norm(dim=-1).numpy(), syn.target_norms, rtol=NORM_RTOL
    )
    assert np.isin(syn.target_norms, lstats.norms).all()
    syn = synthesize(sae, lstats, 20, kind="structured", norm=7.5, rng=np.random.default_rng(5))
    np.testing.assert_allclose(syn.y.double().norm(dim=-1).numpy(), 7.5, rtol=NORM_RTOL)


def test_structured_latents_co_occur(sae, lstats) -> None:
    syn = synthesize(sae, lstats, 50, kind="structured", l0=2, rng=np.random.default_rng(6))
    for a, b in syn.latents:
        assert lstats.cooccurrence(int(a))[b] > 0


def test_direction_generators(sae, pool) -> None:
    x = pool[:16] + 0.5
    gen = torch.Generator().manual_seed(0)

    def ctx(**options) -> DirectionContext:
        return DirectionContext(x=x, stats=None, pool=pool, generator=gen, options=options, sae=sae)

    d = scaled_directions("synthetic", ctx(kind="structured", norm=5.0), "raw")
    # y rescaled to 5 (NORM_RTOL), d = y - x and x + d rounded in float32: 2 eps (|x| + |y|) more
    # (measured 0)
    rtol = NORM_RTOL + 2 * EPS32 * (x.norm(dim=-1).max().item() + 5.0) / 5.0
    np.testing.assert_allclose((x.double() + d.double()).norm(dim=-1).numpy(), 5.0, rtol=rtol)
    unit = scaled_directions("synthetic", ctx(kind="bag"), "unit")
    np.testing.assert_allclose(unit.double().norm(dim=-1).numpy(), 1.0, rtol=NORM_RTOL)
    y = x + scaled_directions("sae-latent", ctx(norm=3.0), "raw")  # b_dec + m W_dec[j]
    rel = (y.double() - sae.b_dec.double()) @ sae.decoder_directions().double().T
    rel = rel / (y.double() - sae.b_dec.double()).norm(dim=-1, keepdim=True)
    # cosine with the latent's decoder row: d = y - x and x + d rounded in float32 move y - b_dec
    # by <= 2 eps (|x| + |y|) in norm, a cosine by <= 2 |shift| / |y - b_dec| (measured 1.1e-8)
    off = 2 * EPS32 * (x.norm(dim=-1) + y.norm(dim=-1)).double()
    off = off / (y.double() - sae.b_dec.double()).norm(dim=-1)
    assert ((rel.abs().max(-1).values - 1).abs() <= 2 * off).all()
    y = x + scaled_directions("sae-reconstruction", ctx(), "raw")
    recon = sae(pool)
    dist = torch.cdist(y, recon, compute_mode="donot_use_mm_for_euclid_dist").min(-1).values
    # y = x + (SAE(p) - x) rounded in float32: 2 eps (|x| + |SAE(p)|) in norm, plus SAE(p)
    # computed in another batch (float32_tol: encoder and decoder over D_SAE terms); 1.5e-4 here
    # (measured 1.5e-6)
    round_off = 2 * EPS32 * (x.norm(dim=-1).max() + recon.norm(dim=-1).max()).item()
    assert dist.max() <= round_off + float32_tol(recon.detach().norm(dim=-1), 2, D_SAE)
    with pytest.raises(ValueError, match="needs an SAE"):
        scaled_directions(
            "synthetic", DirectionContext(x=x, stats=None, pool=pool, generator=gen), "raw"
        )
