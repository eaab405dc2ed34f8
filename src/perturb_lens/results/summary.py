"""The rows of a run that enter its published averages, and its count of non-finite rows."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from perturb_lens.metrics import NONFINITE
from perturb_lens.results.store import load_manifest, load_results


def summary_rows(run_dir: str | Path) -> pd.DataFrame:
    """The rows that enter the published mean: drop the last position (all-positions) / BOS if
    the run says so, and rows recorded as non-finite (``nonfinite=record``)."""
    meta = load_manifest(Path(run_dir))["meta"]
    df = load_results(run_dir)
    if meta["scope"] == "all-positions" and meta.get("drop_last_position", True):
        df = df[df["pos"] < meta["seq_len"] - 1]
    if not meta.get("include_bos", True):
        df = df[df["pos"] > 0]
    if NONFINITE in df.columns:
        df = df[~df[NONFINITE].astype(bool)]
    return df


def nonfinite_rows(run_dir: str | Path) -> int:
    """How many rows of a run were recorded as non-finite (NaN/inf; ``nonfinite=record``)."""
    shards = load_manifest(Path(run_dir))["shards"].values()
    return sum(int((e.get("info") or {}).get(NONFINITE, 0)) for e in shards)
