"""The rows of a run that enter its published averages."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from perturb_lens.results.store import load_manifest, load_results


def summary_rows(run_dir: str | Path) -> pd.DataFrame:
    """The rows that enter the published mean: drop the last position (all-positions) / BOS if
    the run says so."""
    meta = load_manifest(Path(run_dir))["meta"]
    df = load_results(run_dir)
    if meta["scope"] == "all-positions" and meta.get("drop_last_position", True):
        df = df[df["pos"] < meta["seq_len"] - 1]
    if not meta.get("include_bos", True):
        df = df[df["pos"] > 0]
    return df
