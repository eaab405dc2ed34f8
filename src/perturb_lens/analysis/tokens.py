"""Which tokens of a run are most sensitive to a perturbation.

:func:`token_table` gives, per direction and token, the smallest length at which the metric
exceeds its threshold (:func:`~perturb_lens.analysis.tables.threshold_lengths` over the rows
that enter the published averages) with the token's text and a few tokens of context
(:mod:`perturb_lens.results.tokens`), ranked from the most sensitive token (smallest crossing
length) to the least (never crossing, smallest maximum). Runs written before the token file
existed, or without a tokenizer, still give the table, naming tokens by position; its
``attrs["notes"]`` say why.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from perturb_lens.analysis.tables import threshold_lengths
from perturb_lens.metrics.builtin import NONFINITE
from perturb_lens.results.aggregate import SAMPLE_SEQS, metric_threshold
from perturb_lens.results.shards import (
    check_measured,
    iter_batches,
    results_mode,
    run_directions,
    shard_columns,
)
from perturb_lens.results.store import load_manifest
from perturb_lens.results.summary import summary_filters
from perturb_lens.results.tokens import _UNIT, CONTEXT_TOKENS, load_token_text, with_context


def _metric_threshold(metric: str, threshold: float | None) -> float:
    if threshold is not None:
        return float(threshold)
    registered = metric_threshold(metric)
    if registered is None:
        raise ValueError(
            f"metric {metric!r} has no registered threshold: pass threshold= (the value above "
            "which a token counts as responding)"
        )
    return registered


def _per_token(rows: pd.DataFrame, metric: str, threshold: float) -> pd.DataFrame:
    """Per (direction, seq, pos): ``threshold_length`` and ``max_{metric}`` over the lengths."""
    out = threshold_lengths(rows, metric, threshold=threshold, unit=_UNIT)
    top = rows.groupby(_UNIT, observed=True, sort=True)[metric].max().astype(np.float64)
    return out.merge(top.rename(f"max_{metric}").reset_index(), on=_UNIT)


def _rows_tokens(run_dir: Path, manifest: dict, metric: str, threshold: float) -> pd.DataFrame:
    """Per token of a rows run, streamed shard by shard (a token's curve lies in one shard)."""
    columns = ["seq", "pos", "direction", "length", metric]
    if NONFINITE in shard_columns(run_dir, manifest):
        columns.append(NONFINITE)  # flagged rows are left out, as by summary_rows
    batches = iter_batches(run_dir, columns, summary_filters(manifest["meta"]), manifest=manifest)
    parts = []
    for _, group in itertools.groupby(batches, key=lambda item: item[0]):
        rows = pa.Table.from_batches([b for _, b in group]).to_pandas()
        if NONFINITE in rows.columns:
            rows = rows[~rows[NONFINITE].astype(bool)]
        parts.append(_per_token(rows, metric, threshold))
    return pd.concat(parts, ignore_index=True)


def _aggregate_tokens(run_dir: Path, manifest: dict, metric: str, threshold: float) -> pd.DataFrame:
    """Per token of the first sequences an aggregate run keeps the rows of (its ``sample``)."""
    wanted = [("kind", "=", "sample"), ("metric", "=", metric)]
    columns = ["seq", "pos", "direction", "length", "sum"]
    parts = [b.to_pandas() for _, b in iter_batches(run_dir, columns, wanted, manifest=manifest)]
    rows = pd.concat(parts, ignore_index=True).rename(columns={"sum": metric})
    return _per_token(rows.astype({"direction": str}), metric, threshold)


def token_table(
    run_dir: str | Path,
    metric: str = "kl",
    threshold: float | None = None,
    *,
    context: int = CONTEXT_TOKENS,
) -> pd.DataFrame:
    """Every token of the run per direction, from the most to the least sensitive to it.

    Columns: ``direction``, ``rank`` (1: most sensitive), ``seq``, ``pos``, ``token_id``,
    ``token`` (its text), ``context`` (the ``context`` tokens before it), ``threshold_length``
    (the smallest length whose ``metric`` exceeds ``threshold``, default the metric's registered
    one; NaN: never on the grid) and ``max_{metric}`` (its largest value on the grid). Ranked by
    threshold length, never-crossing last, ties by ``max_{metric}`` (larger first), then
    position. Over the rows that enter the published averages; an aggregate run kept only its
    first sequences' rows, so only those are ranked. ``attrs``: ``metric``, ``threshold``,
    ``seqs`` (sequences covered; None: all), ``notes`` (what the table lacks, and why).
    """
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    if not manifest["shards"]:
        raise ValueError(f"{run_dir} has no finished shard yet: run or resume it first")
    threshold = _metric_threshold(metric, threshold)
    aggregate = results_mode(manifest) == "aggregate"
    have = manifest["config"].get("metrics", []) if aggregate else shard_columns(run_dir, manifest)
    check_measured(run_dir, manifest, metric, have)
    notes = []
    if aggregate:
        per_token = _aggregate_tokens(run_dir, manifest, metric, threshold)
        notes.append(
            f"aggregate run (results: aggregate): only the rows of the first {SAMPLE_SEQS} "
            "sequences are kept, so only their tokens are ranked (rerun with results: rows to "
            "rank every token)"
        )
    else:
        per_token = _rows_tokens(run_dir, manifest, metric, threshold)
    text, missing = load_token_text(run_dir, manifest)
    if text is None:
        notes.append(missing)
        text = pd.DataFrame(
            {"seq": per_token["seq"], "pos": per_token["pos"], "token_id": pd.NA, "token": None}
        ).drop_duplicates(["seq", "pos"])
        text["context"] = None
    elif context != CONTEXT_TOKENS:
        text = with_context(text.drop(columns="context"), context)
    out = per_token.merge(text, on=["seq", "pos"], how="left")
    out = _ranked(out, metric, _direction_order(manifest, out))
    out.attrs.update(
        metric=metric,
        threshold=threshold,
        seqs=SAMPLE_SEQS if aggregate else None,
        notes=notes,
    )
    return out


def _direction_order(manifest: dict, frame: pd.DataFrame) -> list[str]:
    labels = list(run_directions(manifest))
    return [*labels, *sorted(set(frame["direction"]) - set(labels))]


def _ranked(frame: pd.DataFrame, metric: str, directions: Sequence[str]) -> pd.DataFrame:
    """Sorted by direction (run order), threshold length (NaN last), max (descending), seq, pos;
    with ``rank`` per direction."""
    frame = frame.assign(
        direction=pd.Categorical(frame["direction"], categories=list(directions)),
        _never=frame["threshold_length"].isna(),
        _neg_max=-frame[f"max_{metric}"],
    )
    frame = frame.sort_values(
        ["direction", "_never", "threshold_length", "_neg_max", "seq", "pos"],
        ignore_index=True,
        na_position="last",
    )
    frame["rank"] = frame.groupby("direction", observed=True).cumcount() + 1
    columns = ["direction", "rank", "seq", "pos", "token_id", "token", "context"]
    return frame[[*columns, "threshold_length", f"max_{metric}"]]
