"""Curve statistics against closed-form answers on constructed curves."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from perturb_lens.analysis.curve_shape import (
    curve_statistics,
    ks_vs_reference,
    max_slope_step,
    plateau_length,
    sharpness,
    statistic_summary,
)

STEPS = np.arange(101, dtype=np.float64)  # t = 0, 0.01, ..., 1 as step indices


def sigmoid(centre: float, width: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(STEPS - centre) / width))


@pytest.mark.parametrize(("centre", "width"), [(40.5, 3.0), (62.5, 0.7), (10.5, 4.0)])
def test_sigmoid_max_slope_and_plateau(centre: float, width: float) -> None:
    y = 5.0 * sigmoid(centre, width)
    # the steepest increment straddles the centre: from step centre - 0.5 to centre + 0.5
    assert max_slope_step(y) == int(centre + 0.5)
    for thr in (0.1, 0.3, 0.5):
        # y_i > 5 thr  <=>  i > centre + width * logit(thr)
        expected = math.floor(centre + width * math.log(thr / (1 - thr))) + 1
        assert plateau_length(y, 5.0 * thr) == expected
        # relative to the end point y_100 (= 5 up to e^-(100-c)/w)
        assert plateau_length(y, thr * 5.0 / y[-1], relative=True) == expected


def test_step_function() -> None:
    y = np.where(STEPS >= 37, 2.5, 0.0)
    assert max_slope_step(y) == 37
    assert plateau_length(y, 1.0) == 37
    assert sharpness(y) == pytest.approx(1.0)
    assert np.isnan(plateau_length(y, 3.0))  # never exceeds


def test_linear_and_degenerate_curves() -> None:
    y = 0.3 * STEPS
    assert sharpness(y) == pytest.approx(1 / 100)
    assert plateau_length(y, 0.25, relative=True) == 26  # 0.3 i > 7.5
    assert max_slope_step(np.zeros(5)) == 1  # no increase anywhere: the first step
    assert np.isnan(sharpness(np.zeros(5)))
    # two steps of equal height: the first wins; a half-height step: sharpness 1/2
    two = np.where(STEPS >= 20, 1.0, 0.0) + np.where(STEPS >= 70, 1.0, 0.0)
    assert max_slope_step(two) == 20
    assert sharpness(two) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 2 points"):
        max_slope_step([1.0])


def test_batched_curves() -> None:
    ys = np.stack([sigmoid(c, 2.0) for c in (20.5, 50.5, 80.5)])
    np.testing.assert_array_equal(max_slope_step(ys), [21, 51, 81])
    assert sharpness(ys).shape == (3,)


def curve_frame(centres: dict[str, list[float]], seed: int = 0) -> pd.DataFrame:
    """Results-like rows (seq, pos, direction, length, l2), shuffled, one sigmoid per curve."""
    rows = []
    for direction, cs in centres.items():
        for seq, c in enumerate(cs):
            rows.append(
                pd.DataFrame(
                    {
                        "seq": seq,
                        "pos": 9,
                        "direction": direction,
                        "length": STEPS / 100,
                        "l2": 3.0 * sigmoid(c, 1.5),
                    }
                )
            )
    df = pd.concat(rows, ignore_index=True)
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def test_curve_statistics_frame() -> None:
    df = curve_frame({"real": [30.5, 40.5, 50.5], "random": [60.5, 70.5]})
    out = curve_statistics(df, "l2", threshold=0.5)
    assert list(out.columns) == [
        "seq",
        "pos",
        "direction",
        "max_slope_step",
        "plateau_length",
        "sharpness",
        "end_value",
    ]
    got = dict(zip(zip(out.direction, out.seq, strict=True), out.max_slope_step, strict=True))
    assert got == {
        ("random", 0): 61,
        ("random", 1): 71,
        ("real", 0): 31,
        ("real", 1): 41,
        ("real", 2): 51,
    }
    # y_i > 0.5 y_100 with a symmetric sigmoid: the first step past the centre
    np.testing.assert_array_equal(out.plateau_length, out.max_slope_step)
    with pytest.raises(ValueError, match="same number of lengths"):
        curve_statistics(df.iloc[1:], "l2")


def test_summary_and_ks_vs_reference() -> None:
    stats = pd.DataFrame(
        {
            "direction": ["real"] * 4 + ["same"] * 4 + ["far"] * 4,
            "max_slope_step": [10, 20, 30, 40, 10, 20, 30, 40, 70, 80, 90, 95],
        }
    )
    ks = ks_vs_reference(stats, reference="real").set_index("direction")
    assert ks.loc["real", "ks"] == 0.0
    assert ks.loc["same", "ks"] == 0.0
    assert ks.loc["far", "ks"] == 1.0  # disjoint supports
    assert ks.loc["far", "mean"] == pytest.approx(83.75)
    assert ks.loc["real", "std"] == pytest.approx(np.std([10, 20, 30, 40], ddof=1))
    summ = statistic_summary(stats).set_index("direction")
    assert summ.loc["far", "median"] == pytest.approx(85.0)
    assert summ.loc["real", "n"] == 4
    with pytest.raises(KeyError, match="reference"):
        ks_vs_reference(stats, reference="nope")
