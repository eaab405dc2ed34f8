"""The tokens of a run as text, and which of them are most sensitive to a perturbation.

A run keeps ``tokens.parquet`` beside its shards (manifest key ``tokens``: file, sha256, the
sequences it covers): one row per (seq, pos) of the sequences whose rows the run keeps (every
sequence of a rows run; the first :data:`~perturb_lens.results.aggregate.SAMPLE_SEQS` of an
aggregate run), with the token id and the tokenizer's decoding of that id alone (null when the
model had no tokenizer). The run folder stays self-contained: no tokenizer is needed to read it.

:func:`token_table` gives, per direction and token, the smallest length at which the metric
exceeds its threshold (:func:`~perturb_lens.results.analysis.threshold_lengths` over the rows
that enter the published averages) with the token's text and a few tokens of context, ranked from
the most sensitive token (smallest crossing length) to the least (never crossing, smallest
maximum). Runs written before the file existed, or without a tokenizer, still give the table,
naming tokens by position; its ``attrs["notes"]`` say why.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from perturb_lens.metrics import NONFINITE
from perturb_lens.results.aggregate import SAMPLE_SEQS, metric_threshold
from perturb_lens.results.analysis import threshold_lengths
from perturb_lens.results.shards import (
    check_measured,
    iter_batches,
    results_mode,
    run_directions,
    shard_columns,
)
from perturb_lens.results.store import (
    ChecksumError,
    RunStore,
    atomic_write,
    load_manifest,
    verified_bytes,
)
from perturb_lens.results.summary import summary_filters

TOKENS_FILE = "tokens.parquet"
TOKENS_KEY = "tokens"  # manifest key: {"file", "sha256", "seqs", "decoded"}
CONTEXT_TOKENS = 4  # tokens of context before a token in its label
_TOKENS_PATTERN = re.compile(re.escape(TOKENS_FILE))
_UNIT = ["direction", "seq", "pos"]


def kept_sequences(n_seqs: int, results: str) -> int:
    """How many (first) sequences a run keeps rows, and so token text, of."""
    return n_seqs if results == "rows" else min(n_seqs, SAMPLE_SEQS)


def token_text_frame(tokens: Any, tokenizer: Any, n_seqs: int | None = None) -> pd.DataFrame:
    """``seq``, ``pos``, ``token_id`` and ``token`` (``tokenizer.decode([id])``; None without a
    tokenizer) for the first ``n_seqs`` rows of ``tokens`` [N, T] (default: all)."""
    ids = np.asarray(tokens, dtype=np.int64)[:n_seqs]
    n, t = ids.shape
    frame = pd.DataFrame(
        {
            "seq": np.repeat(np.arange(n, dtype=np.int32), t),
            "pos": np.tile(np.arange(t, dtype=np.int32), n),
            "token_id": ids.reshape(-1),
        }
    )
    if tokenizer is None:
        frame["token"] = pd.Series([None] * len(frame), dtype=object)
    else:  # each distinct id once: a vocabulary's worth of calls at most
        text = {int(i): _utf8(tokenizer.decode([int(i)])) for i in np.unique(ids)}
        frame["token"] = frame["token_id"].map(text)
    return frame


def _utf8(text: str) -> str:
    """``text`` as Parquet can store it (a lone surrogate becomes ``?``)."""
    return str(text).encode("utf-8", "replace").decode("utf-8")


def save_token_text(store: RunStore, tokens: Any, tokenizer: Any, *, results: str) -> None:
    """Write the run's ``tokens.parquet`` (the sequences it keeps rows of) and record it in the
    manifest; a resume rewrites it (same tokens: the store refuses other ones)."""
    n = kept_sequences(int(np.asarray(tokens).shape[0]), results)
    frame = token_text_frame(tokens, tokenizer, n)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buf)
    data = buf.getvalue()
    atomic_write(store.run_dir / TOKENS_FILE, lambda f: f.write(data))
    entry = {
        "file": TOKENS_FILE,
        "sha256": hashlib.sha256(data).hexdigest(),
        "seqs": n,
        "decoded": tokenizer is not None,
    }
    store.update_manifest(lambda manifest: manifest.__setitem__(TOKENS_KEY, entry))


def load_token_text(
    run_dir: str | Path, manifest: dict | None = None
) -> tuple[pd.DataFrame | None, str | None]:
    """The run's token text (``seq``, ``pos``, ``token_id``, ``token``, ``context``) checked
    against its sha256, and None; or None and a note saying why there is none (a run made
    before token text was kept, or a damaged file)."""
    run_dir = Path(run_dir)
    manifest = manifest if manifest is not None else load_manifest(run_dir)
    entry = manifest.get(TOKENS_KEY)
    if entry is None:
        return None, (
            f"{run_dir} keeps no token text ({TOKENS_FILE}: runs made by perturb-lens before "
            "it was kept lack it), so tokens are named by sequence and position only. Resuming "
            f"the run (perturb-lens run CONFIG --out {run_dir} --resume) adds it without "
            "recomputing a shard."
        )
    try:
        data = verified_bytes(run_dir, "the run's token text", entry, _TOKENS_PATTERN)
    except ChecksumError as e:
        return None, f"{e}; tokens are named by sequence and position only."
    frame = pq.read_table(pa.BufferReader(data)).to_pandas()
    frame = frame.astype({"seq": np.int64, "pos": np.int64})
    return with_context(frame), None


def with_context(text: pd.DataFrame, n: int = CONTEXT_TOKENS) -> pd.DataFrame:
    """``text`` with column ``context``: the texts of the ``n`` tokens before each token in its
    sequence, joined (None where the token text is unknown)."""
    text = text.sort_values(["seq", "pos"], ignore_index=True)
    tokens = [t if isinstance(t, str) else None for t in text["token"].tolist()]
    seqs = text["seq"].to_numpy()
    first = np.searchsorted(seqs, seqs, side="left")  # each row's sequence starts here
    context = [
        None if tok is None else "".join(t or "" for t in tokens[max(i - n, first[i]) : i])
        for i, tok in enumerate(tokens)
    ]
    text["token"], text["context"] = pd.Series(tokens), pd.Series(context)  # pandas' text dtype
    return text


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
