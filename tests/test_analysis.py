"""Analysis helpers against plain numpy per group and closed-form curves."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from perturb_lens.analysis import (
    curves,
    summary_table,
    threshold_lengths,
    threshold_summary,
    token_curves,
)

LENGTHS = np.float32([0, 1, 3, 5, 10, 20])


def grid_frame(n_seq: int = 6, n_pos: int = 5, seed: int = 0) -> pd.DataFrame:
    """Every (seq, pos, direction, length) with random kl and l2 = length."""
    rng = np.random.default_rng(seed)
    df = pd.MultiIndex.from_product(
        [np.arange(n_seq, dtype=np.int32), np.arange(n_pos, dtype=np.int16), ["a", "b"], LENGTHS],
        names=["seq", "pos", "direction", "length"],
    ).to_frame(index=False)
    df["direction"] = df["direction"].astype("category")
    df["kl"] = rng.exponential(size=len(df)).astype(np.float32) * df["length"]
    df["l2"] = df["length"] * 2
    return df


def test_curves_match_numpy_per_group() -> None:
    df = grid_frame()
    df["layer"] = np.where(df["seq"] % 2 == 0, 2, 6)
    out = curves(df, by=("layer", "direction", "length"), ci=None)
    assert len(out) == 2 * 2 * len(LENGTHS)
    for _, row in out.iterrows():
        sel = (df.layer == row.layer) & (df.direction == row.direction) & (df.length == row.length)
        x = df.loc[sel, "kl"].to_numpy(np.float64)
        assert row.n == len(x)
        # float64 on both sides (curves casts the float32 metric up): a mean of 15 values rounds
        # by <= 15 * 2^-53 = 1.7e-15, a quantile interpolates two order statistics (a few roundings)
        np.testing.assert_allclose(row["mean"], x.mean(), rtol=1e-12)
        np.testing.assert_allclose(row["median"], np.median(x), rtol=1e-12)
        for name, q in [("q05", 0.05), ("q25", 0.25), ("q75", 0.75), ("q95", 0.95)]:
            np.testing.assert_allclose(row[name], np.quantile(x, q), rtol=1e-12)


def test_curves_other_stats_and_nan_rows() -> None:
    df = grid_frame()
    df.loc[::7, "kl"] = np.nan
    out = curves(df, by=("direction",), stat=("std", "min", "max", "q975"), ci=None)
    for _, row in out.iterrows():
        x = df.loc[df.direction == row.direction, "kl"].dropna().to_numpy(np.float64)
        assert row.n == len(x)
        np.testing.assert_allclose(
            [row["std"], row["min"], row["max"], row["q975"]],
            [x.std(ddof=1), x.min(), x.max(), np.quantile(x, 0.975)],
            rtol=1e-12,  # float64 as above: std sums ~150 squares, <= 150 * 2^-53 = 1.7e-14
        )
    with pytest.raises(ValueError, match="unknown statistic"):
        curves(df, stat=("mode",))
    with pytest.raises(KeyError, match="dce"):
        curves(df, metric="dce")


def test_bootstrap_ci_contains_mean_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(1)
    sizes = {"small": 100, "mid": 1000, "large": 10_000}
    df = pd.concat(
        [pd.DataFrame({"direction": k, "kl": rng.exponential(size=n)}) for k, n in sizes.items()]
    )
    out = curves(df, by=("direction",)).set_index("direction")
    assert (out.ci_method == "bootstrap").all()
    assert ((out.ci_low < out["mean"]) & (out["mean"] < out.ci_high)).all()
    width = out.ci_high - out.ci_low
    assert width["small"] > width["mid"] > width["large"]
    # for a mean the percentile bootstrap is close to the normal interval
    g = df.groupby("direction")["kl"]
    normal = 2 * 1.959964 * g.std() / np.sqrt(g.count())
    np.testing.assert_allclose(width, normal[width.index], rtol=0.2)
    # reproducible from the seed
    pd.testing.assert_frame_equal(curves(df, by=("direction",)).set_index("direction"), out)


def test_big_groups_use_the_normal_interval() -> None:
    rng = np.random.default_rng(2)
    df = pd.DataFrame({"direction": np.repeat(["a", "b"], [50, 500]), "kl": rng.random(550)})
    out = curves(df, by=("direction",), ci=0.9, boot_max_n=100).set_index("direction")
    assert out.ci_method.tolist() == ["bootstrap", "normal"]
    x = df.loc[df.direction == "b", "kl"]
    half = 1.644854 * x.std() / np.sqrt(len(x))
    np.testing.assert_allclose(
        [out.ci_low["b"], out.ci_high["b"]], [x.mean() - half, x.mean() + half]
    )


def test_threshold_lengths_closed_form() -> None:
    lengths = np.arange(11, dtype=np.float32)
    scale = np.array([1.0, 0.5, 0.05, 0.01])  # metric = scale * length^2 per token
    df = pd.DataFrame(
        {
            "seq": np.repeat(np.arange(4), len(lengths)),
            "pos": 0,
            "direction": "a",
            "length": np.tile(lengths, 4),
            "kl": np.repeat(scale, len(lengths)) * np.tile(lengths, 4) ** 2,
        }
    )
    out = threshold_lengths(df, threshold=10.0)
    # first integer L with scale * L^2 > 10; NaN when beyond the grid (0.01 * 100 = 1)
    expected = [np.floor(np.sqrt(10 / s)) + 1 for s in scale]
    expected = [e if e <= 10 else np.nan for e in expected]
    np.testing.assert_array_equal(out["threshold_length"], expected)
    assert out["threshold_length"].tolist()[:2] == [4.0, 5.0]  # 15 and 32 are off the grid
    # strictly greater: length 3 gives 9, not > 9
    assert threshold_lengths(df, threshold=9.0)["threshold_length"].iloc[0] == 4.0

    summ = threshold_summary(df, threshold=10.0, stat=("median",))
    assert summ.loc[0, "n"] == 4 and summ.loc[0, "n_crossed"] == 2
    assert summ.loc[0, "frac_never"] == 0.5 and summ.loc[0, "median"] == 4.5


def test_summary_table_picks_nearest_lengths() -> None:
    df = grid_frame()
    out = summary_table(df, metrics=("kl", "l2"), lengths=(2.2, 9, 100, 19))
    assert list(out.columns) == ["kl@3", "kl@10", "kl@20", "l2@3", "l2@10", "l2@20"]
    assert list(out.index) == ["a", "b"]
    for d in ("a", "b"):
        for length in (3, 10, 20):
            sel = (df.direction == d) & (df.length == length)
            x = df.loc[sel, "kl"].to_numpy(np.float64)
            np.testing.assert_allclose(out.loc[d, f"kl@{length}"], x.mean(), rtol=1e-12)
            assert out.loc[d, f"l2@{length}"] == 2 * length
    assert list(summary_table(df, metrics=("l2",)).columns) == ["l2@1", "l2@3", "l2@10", "l2@20"]


def test_token_curves_are_whole_curves_of_n_tokens() -> None:
    df = grid_frame()
    out = token_curves(df, n=3, seed=4)
    assert list(out.columns) == ["direction", "seq", "pos", "length", "kl"]
    per_dir = out.groupby("direction", observed=True)[["seq", "pos"]].apply(
        lambda g: len(g.drop_duplicates())
    )
    assert per_dir.tolist() == [3, 3]
    assert (out.groupby(["direction", "seq", "pos"], observed=True).size() == len(LENGTHS)).all()
    merged = out.merge(df, on=["direction", "seq", "pos", "length"], suffixes=("", "_src"))
    np.testing.assert_array_equal(merged["kl"], merged["kl_src"])
    pd.testing.assert_frame_equal(token_curves(df, n=3, seed=4), out)
    assert len(token_curves(df, n=1000)) == len(df)  # fewer tokens than n: all of them
