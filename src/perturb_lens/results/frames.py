"""Checks and picks on a results frame shared by the store's aggregates and the analysis: the
columns a computation needs (:func:`_require`, with an error that points an aggregate run to its
API), quantile names (``q05``) and the lengths a figure shows (:func:`pick_lengths`)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd


def _quantile(name: str) -> float | None:
    """``"q05"`` -> 0.05, ``"q975"`` -> 0.975 (the digits after ``q`` are the decimals)."""
    m = re.fullmatch(r"q(\d+)", name)
    return float(f"0.{m[1]}") if m else None


class MissingColumnError(KeyError):
    """A results frame without a column asked for; its message says which, and what to do."""

    def __str__(self) -> str:  # the message as written, not KeyError's repr of it
        return str(self.args[0])


def _require(df: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing and df.attrs.get("results") == "aggregate":
        run = df.attrs.get("run_dir", "RUN")
        raise MissingColumnError(
            f"this frame holds the per-shard aggregate tables of the aggregate run {run} (config "
            f"results: aggregate), not one row per token, so it has no column {missing[0]!r}. "
            f"Read its curves with perturb_lens.open_run({run!r}).curves({missing[-1]!r}), or "
            f"its merged aggregates with perturb_lens.open_run({run!r}).aggregates(METRIC)."
        )
    if missing:
        raise MissingColumnError(
            f"columns {missing} not in the results frame (it has {list(df.columns)})"
        )


def pick_lengths(df: pd.DataFrame, lengths: Sequence[float] | None = None) -> list[float]:
    """The lengths of the frame's grid nearest to ``lengths`` (in order, duplicates dropped).

    ``lengths=None`` takes four from the grid: its largest and those 1/4, 1/2 and 3/4 of the way
    along it.
    """
    _require(df, ["length"])
    grid = np.sort(df["length"].dropna().unique())
    if grid.size == 0:
        raise ValueError("the results frame has no lengths")
    if lengths is None:
        picked = grid[np.unique(np.round(np.linspace(0, grid.size - 1, 5)).astype(int))[1:]]
        picked = picked if picked.size else grid
    else:
        picked = [grid[np.argmin(np.abs(grid - float(x)))] for x in lengths]
    return list(dict.fromkeys(picked))  # two requests may share a nearest length
