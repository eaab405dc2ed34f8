"""ActivationStats / StatsAccumulator against numpy references and closed-form Gaussians."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perturb_lens.statistics.activations import (
    NORM_QUANTILES,
    ActivationStats,
    StatsAccumulator,
    fit_stats,
    sample_gaussian,
)

Z = 5.5  # z-score bound for statistical checks: with ~1,000 entries checked, P(false fail) < 1e-4


def ar1_cov(d: int, rho: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """A closed-form covariance: scales s_i and correlation rho^|i-j|; and a mean far from 0."""
    s = np.linspace(0.5, 2.0, d)
    idx = np.arange(d)
    cov = np.outer(s, s) * rho ** np.abs(idx[:, None] - idx[None, :])
    mean = 50.0 + 10.0 * np.sin(idx)
    return mean, cov


def assert_moments_close(mean_hat, cov_hat, mean, cov, n: int) -> None:
    """Sample mean/cov of n Gaussian draws vs the truth: sd(mean_i) = sqrt(S_ii / n) and
    sd(S_ij) = sqrt((S_ij^2 + S_ii S_jj) / n) (Wishart)."""
    var = np.diag(cov)
    assert np.all(np.abs(mean_hat - mean) < Z * np.sqrt(var / n))
    sd_cov = np.sqrt((cov**2 + np.outer(var, var)) / n)
    assert np.all(np.abs(cov_hat - cov) < Z * sd_cov)


def test_chan_merge_equals_one_shot_float64_with_large_mean():
    rng = np.random.default_rng(0)
    d = 24
    data = (1000.0 + rng.standard_normal((5000, d)) @ rng.standard_normal((d, d)) * 0.3).astype(
        np.float32
    )
    acc = StatsAccumulator(d, chunk_rows=700)  # chunks inside batches merge too
    for lo, hi in [(0, 1), (1, 2), (2, 1500), (1500, 1501), (1501, 5000)]:  # incl. 1-row batches
        acc.update(torch.from_numpy(data[lo:hi]))
    stats = acc.finalize(hook="h", frame="raw")
    ref = data.astype(np.float64)
    ref_mean, ref_cov = ref.mean(0), np.cov(ref, rowvar=False)  # ddof=1, like torch.cov
    assert stats.n_tokens == 5000
    # float64 throughout: 5,000 values near 1000 sum to <= 5000 * 2^-53 = 5.6e-13 relative
    np.testing.assert_allclose(stats.mean.numpy(), ref_mean, rtol=1e-12)
    # the covariance cancels the mean: rounding ~ 2^-53 mean^2 = 1.1e-10 per product, against a
    # covariance scale ~2; 1e-9 of it leaves a factor ~20
    scale = np.abs(ref_cov).max()
    assert np.abs(stats.cov.numpy() - ref_cov).max() < 1e-9 * scale
    torch.testing.assert_close(stats.cov, torch.cov(torch.from_numpy(ref).T), rtol=1e-9, atol=0)
    norms = np.linalg.norm(ref, axis=1)
    assert stats.mean_norm == pytest.approx(norms.mean(), rel=1e-12)
    for q in NORM_QUANTILES:
        assert stats.norm_quantiles[q] == pytest.approx(np.quantile(norms, q), rel=1e-12)
    assert stats.median_norm == stats.norm_quantiles[0.5]


def test_fit_reproduces_closed_form_gaussian_and_samples_match():
    rng = np.random.default_rng(1)
    d, n_seq, t = 8, 2500, 9
    mean, cov = ar1_cov(d)
    draws = rng.multivariate_normal(mean, cov, size=(n_seq, t))
    draws[:, 0] = 1e4  # BOS-like outliers at position 0: excluded by default
    batches = [torch.from_numpy(draws[i : i + 300]).float() for i in range(0, n_seq, 300)]
    stats = fit_stats(batches, hook="blocks.0.hook_resid_pre", frame="centered")
    n = n_seq * (t - 1)
    assert stats.n_tokens == n and stats.d_model == d
    assert stats.hook == "blocks.0.hook_resid_pre" and stats.frame == "centered"
    assert_moments_close(stats.mean.numpy(), stats.cov.numpy(), mean, cov, n)
    # chol is the factor of cov + jitter * I (the published 0.01)
    assert stats.jitter == 0.01
    target = stats.cov + 0.01 * torch.eye(d, dtype=torch.float64)
    # float64 Cholesky of an 8 x 8 matrix of order 1: backward error ~ 8 * 2^-53 = 9e-16
    torch.testing.assert_close(stats.chol @ stats.chol.T, target, rtol=1e-12, atol=1e-12)
    assert torch.equal(stats.chol, torch.tril(stats.chol))

    m = 30_000
    s = sample_gaussian(stats, m, torch.Generator().manual_seed(0))
    assert s.shape == (m, d) and s.dtype == torch.float32
    s64 = s.double().numpy()
    assert_moments_close(
        s64.mean(0), np.cov(s64, rowvar=False), stats.mean.numpy(), target.numpy(), m
    )


def test_exclude_first_position():
    rng = np.random.default_rng(2)
    acts = rng.standard_normal((6, 5, 4))
    acts[:, 0] += 100.0
    t = torch.from_numpy(acts)
    kept = fit_stats([t], exclude_first_position=True)
    everything = fit_stats([t], exclude_first_position=False)
    assert kept.n_tokens == 24 and everything.n_tokens == 30
    # float64 (as test_chan_merge_equals_one_shot_float64_with_large_mean; mean 100: cov to 1e-10)
    np.testing.assert_allclose(kept.mean.numpy(), acts[:, 1:].reshape(-1, 4).mean(0), rtol=1e-12)
    np.testing.assert_allclose(everything.mean.numpy(), acts.reshape(-1, 4).mean(0), rtol=1e-12)
    np.testing.assert_allclose(
        kept.cov.numpy(), np.cov(acts[:, 1:].reshape(-1, 4), rowvar=False), rtol=1e-10
    )
    # [N, d] input is taken as tokens: nothing is dropped
    assert fit_stats([t.reshape(-1, 4)]).n_tokens == 30


def test_nonfinite_reports_sequence_and_position():
    acc = StatsAccumulator(4)
    acc.update(torch.zeros(4, 6, 4).normal_())
    bad = torch.zeros(3, 6, 4).normal_()
    bad[2, 5, 3] = float("nan")
    bad[2, 5, 1] = float("inf")  # first in memory order: reported first
    with pytest.raises(ValueError, match=r"inf\) at sequence 2 \(sequence 6 overall\), position 5"):
        acc.update(bad)
    rows = torch.zeros(10, 4)
    rows[7, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN\) at row 7"):
        StatsAccumulator(4).update(rows)
    bos_nan = torch.zeros(2, 3, 4)
    bos_nan[1, 0, 0] = float("nan")  # NaN at an excluded position still points at a broken model
    with pytest.raises(ValueError, match="position 0"):
        StatsAccumulator(4).update(bos_nan)


def test_empty_and_bad_input_errors():
    with pytest.raises(ValueError, match="No activations"):
        StatsAccumulator(4).finalize()
    acc = StatsAccumulator(4)
    acc.update(torch.zeros(3, 1, 4).normal_())  # only BOS positions
    with pytest.raises(ValueError, match="No activations"):
        acc.finalize()
    with pytest.raises(ValueError, match="no batches"):
        fit_stats([])
    with pytest.raises(ValueError, match=r"\[B, T, 4\]"):
        StatsAccumulator(4).update(torch.zeros(2, 3, 5))
    one = StatsAccumulator(4)
    one.update(torch.ones(1, 4))
    with pytest.raises(ValueError, match="at least 2"):
        one.finalize()


def test_singular_cov_needs_jitter():
    x = torch.zeros(200, 6, dtype=torch.float64).normal_()
    x[:, 2] = 0.5  # a coordinate with zero variance: cov is exactly singular
    with pytest.raises(ValueError, match="jitter"):
        fit_stats([x], jitter=0.0)
    assert fit_stats([x]).chol.isfinite().all()


def test_save_load_roundtrip_exact(tmp_path):
    rng = np.random.default_rng(3)
    stats = fit_stats([torch.from_numpy(rng.standard_normal((7, 11, 5)))], hook="h.x", frame="raw")
    path = stats.save(tmp_path / "sub" / "stats.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["stats.safetensors"]  # no temp left
    back = ActivationStats.load(path)
    for name in ("mean", "cov", "chol"):
        assert torch.equal(getattr(back, name), getattr(stats, name))
        assert getattr(back, name).dtype == torch.float64
    for name in ("norm_quantiles", "mean_norm", "n_tokens", "hook", "frame", "jitter"):
        assert getattr(back, name) == getattr(stats, name)

    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an activation-stats file"):
        ActivationStats.load(tmp_path / "other.safetensors")


def test_norm_sample_beyond_max_norms():
    """Past max_norms the quantiles come from a uniform sample: each lies at its rank in the full
    data within the binomial bound of the sample size; the mean norm stays exact."""
    gen = torch.Generator().manual_seed(4)
    acc = StatsAccumulator(3, max_norms=2000)
    chunks = [torch.randn(n, 3, generator=gen, dtype=torch.float64) * 5 for n in (1500, 900, 6000)]
    for c in chunks:
        acc.update(c)
    stats = acc.finalize()
    norms = torch.cat(chunks).norm(dim=1).numpy()
    assert stats.mean_norm == pytest.approx(norms.mean(), rel=1e-12)
    for q, v in stats.norm_quantiles.items():
        rank = (norms <= v).mean()
        assert abs(rank - q) < Z * np.sqrt(q * (1 - q) / 2000)
