"""The tokens of a run as text: written beside its shards and read back.

A run keeps ``tokens.parquet`` beside its shards (manifest key ``tokens``: file, sha256, the
sequences it covers): one row per (seq, pos) of the sequences whose rows the run keeps (every
sequence of a rows run; the first :data:`~perturb_lens.results.aggregate.SAMPLE_SEQS` of an
aggregate run), with the token id and the tokenizer's decoding of that id alone (null when the
model had no tokenizer). The run folder stays self-contained: no tokenizer is needed to read it.

Which tokens are most sensitive is :func:`perturb_lens.analysis.tokens.token_table`.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from perturb_lens.results.aggregate import SAMPLE_SEQS
from perturb_lens.results.store import (
    ChecksumError,
    ResultStore,
    atomic_write,
    load_manifest,
    verified_bytes,
)

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


def save_token_text(store: ResultStore, tokens: Any, tokenizer: Any, *, results: str) -> None:
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
