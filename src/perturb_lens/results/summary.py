"""The rows of a run that enter its published averages (one rule, also for the streamed readers of
:mod:`perturb_lens.results.shards`), and its count of non-finite rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from perturb_lens.metrics.builtin import NONFINITE
from perturb_lens.results.store import load_manifest, load_results


def summary_filters(meta: dict[str, Any]) -> list[tuple[str, str, Any]] | None:
    """The rows that enter the published mean, as pyarrow filters on ``pos`` (None: all rows).

    Under the all-positions scope the last position is dropped unless the run says
    ``drop_last_position: false`` (its next-token prediction has no target in the published
    setup); BOS (``pos`` 0) is dropped when the run says ``include_bos: false``.
    """
    filters: list[tuple[str, str, Any]] = []
    if meta["scope"] == "all-positions" and meta.get("drop_last_position", True):
        filters.append(("pos", "<", int(meta["seq_len"]) - 1))
    if not meta.get("include_bos", True):
        filters.append(("pos", ">", 0))
    return filters or None


def summary_rows(run_dir: str | Path) -> pd.DataFrame:
    """The rows that enter the published mean (:func:`summary_filters`), without rows recorded
    as non-finite (``nonfinite=record``)."""
    manifest = load_manifest(Path(run_dir))
    if manifest["config"].get("results", "rows") == "aggregate":
        raise ValueError(
            f"{run_dir} is an aggregate run (results: aggregate): it stores no rows; read its "
            "statistics with perturb_lens.results.aggregate.run_aggregates, or rerun with "
            "results: rows"
        )
    meta = manifest["meta"]
    df = load_results(run_dir, filters=summary_filters(meta))
    if NONFINITE in df.columns:
        df = df[~df[NONFINITE].astype(bool)].reset_index(drop=True)
    return df


def nonfinite_rows(run_dir: str | Path) -> int:
    """How many rows of a run were recorded as non-finite (NaN/inf; ``nonfinite=record``)."""
    shards = load_manifest(Path(run_dir))["shards"].values()
    return sum(int((e.get("info") or {}).get(NONFINITE, 0)) for e in shards)
