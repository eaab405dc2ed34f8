"""Text sources -> token batches [N, seq_len] with BOS first, cached by content hash.

A source is a local file (``.txt``/``.cor`` one document per line, ``.jsonl``, ``.parquet``), a
local folder of such files, ``"builtin:lee"`` (the Lee news corpus inside the PyPI ``gensim``
wheel: no hub needed), or a Hugging Face dataset name (streamed with ``datasets``). Documents are
concatenated and cut into rows the way TransformerLens' ``tokenize_and_concatenate`` did for the
published runs: ``seq_len - 1`` tokens per row, BOS prepended, the incomplete last row dropped.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from perturb_lens.common.files import regular_file, torch_load
from perturb_lens.common.paths import file_mode

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from perturb_lens.config.schema import DataConfig

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".cor", ".jsonl", ".parquet")
TOKEN_SUFFIXES = (".pt", ".npy", ".safetensors")
BUILTIN_SOURCES = ("builtin:lee",)
CACHE_FORMAT = 1  # bump when the cached bytes for a given key would change
CONTENT_HASH_MAX_BYTES = 200 * 2**20  # larger local files are keyed by size + mtime instead
TOKENIZE_BATCH_DOCS = 256
_LEE_FILE = ("test", "test_data", "lee_background.cor")
_SAFETENSORS_KEY = "tokens"


# ---------------------------------------------------------------------------------------------
# Text sources


def lee_corpus_path() -> Path | None:
    """Path of the Lee news corpus inside an installed ``gensim`` (not imported), or None."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*_LEE_FILE)
        if path.is_file():
            return path
    return None


def default_text_source() -> str:
    """The text used when none is given: ``builtin:lee`` if gensim is installed, else WebText."""
    if lee_corpus_path() is not None:
        return "builtin:lee"
    webtext = Path(__file__).resolve().parents[3] / "shared/data/webtext/webtext.test.jsonl"
    if webtext.is_file():
        return str(webtext)
    raise FileNotFoundError(
        "No default text source: `pip install gensim` (its wheel ships the Lee news corpus used "
        "as the built-in default) or pass a text source (a .txt/.jsonl/.parquet file or folder, "
        "or a Hugging Face dataset name)."
    )


def load_texts(
    source: str | os.PathLike[str],
    *,
    split: str = "train",
    text_field: str = "text",
    max_docs: int | None = None,
    streaming: bool = True,
) -> Iterator[str]:
    """Yield the documents of ``source`` (local file/folder, ``builtin:lee``, or a hub dataset).

    Files are read lazily; a hub dataset is streamed (``streaming=True``) so nothing beyond what
    is consumed is downloaded.
    """
    kind, target = _resolve(os.fspath(source))
    if kind == "hub":
        docs = _hub_texts(target, split=split, text_field=text_field, streaming=streaming)
    else:
        docs = _local_texts(Path(target), text_field)
    return itertools.islice(docs, max_docs)


def _resolve(source: str) -> tuple[str, str]:
    """("local", path) or ("hub", name); errors for unknown builtins and missing local paths."""
    if source.startswith("builtin:"):
        if source != "builtin:lee":
            raise ValueError(f"Unknown built-in source {source!r}; known: {BUILTIN_SOURCES}")
        path = lee_corpus_path()
        if path is None:
            raise ModuleNotFoundError(
                "'builtin:lee' reads the Lee news corpus shipped in the gensim wheel: "
                "`pip install gensim` (gensim is not imported, only its data file is read)."
            )
        return "local", str(path)
    path = Path(source).expanduser()
    if path.exists():
        return "local", str(path)
    if source.startswith((".", "/", "~")) or path.suffix.lower() in TEXT_SUFFIXES + TOKEN_SUFFIXES:
        raise FileNotFoundError(
            f"Text source {source!r} looks like a local path but {path} does not exist."
        )
    return "hub", source


def _local_files(path: Path) -> list[Path]:
    """The text files a local source stands for: the file itself, or a folder's (sorted)."""
    if not path.is_dir():
        regular_file(path, "a text source")  # a pipe or a device is named, not read
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in TOKEN_SUFFIXES:
            raise ValueError(
                f"{path} holds pre-tokenized tensors, not text: read it with "
                "perturb_lens.data.text.load_tokens."
            )
        if suffix not in TEXT_SUFFIXES:
            raise ValueError(f"{path}: unsupported text file type; use one of {TEXT_SUFFIXES}.")
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in TEXT_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise FileNotFoundError(f"No {'/'.join(TEXT_SUFFIXES)} files in folder {path}.")
    return files


def _local_texts(path: Path, text_field: str) -> Iterator[str]:
    for file in _local_files(path):
        suffix = file.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl_texts(file, text_field)
        elif suffix == ".parquet":
            yield from _parquet_texts(file, text_field)
        else:
            yield from _line_texts(file)


def _text_lines(file: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file; binary or other encodings: a clear error."""
    with file.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{file}, line {lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the "
                    "line): convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8), or point "
                    "data.source at a text file."
                ) from None
            if "\x00" in line:
                raise ValueError(
                    f"{file}, line {lineno}: holds NUL bytes, so it is binary, not text: point "
                    "data.source at a .txt/.cor/.jsonl/.parquet text source."
                )
            yield lineno, line


def _line_texts(file: Path) -> Iterator[str]:
    """One document per line; blank lines skipped."""
    for _, line in _text_lines(file):
        line = line.rstrip("\r\n")
        if line.strip():
            yield line


def _jsonl_texts(file: Path, text_field: str) -> Iterator[str]:
    for lineno, line in _text_lines(file):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}, line {lineno}: not valid JSON ({e}).") from e
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"{file}, line {lineno}: no field {text_field!r} (available: {keys}); "
                "pass text_field=... to name the text field."
            )
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(
                f"{file}, line {lineno}: field {text_field!r} is a {type(text).__name__}, "
                "not a string."
            )
        yield text


def _parquet_texts(file: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(
            f"{file} is not a readable Parquet file ({e}): check the file, or give it the suffix "
            "of what it holds (.txt, .jsonl)."
        ) from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ValueError(
            f"{file}: no column {text_field!r} (available: {names}); "
            "set data.text_field to name the text column."
        )
    kind = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(
            f"{file}: column {text_field!r} holds {kind}, not strings: set data.text_field to the "
            f"column with the text (columns: {names})."
        )
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def _hub_texts(name: str, *, split: str, text_field: str, streaming: bool) -> Iterator[str]:
    """Rows of a Hugging Face dataset, via ``datasets.load_dataset`` (optional extra)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"{name!r} is not a local path, so it is read as a Hugging Face dataset, which needs "
            "the optional `datasets` package: pip install 'perturb-lens[datasets]'"
        ) from e
    ds = datasets.load_dataset(name, split=split, streaming=streaming)
    for i, row in enumerate(ds):
        if text_field not in row:
            raise ValueError(
                f"Dataset {name!r} (split {split!r}), row {i}: no field {text_field!r} "
                f"(available: {sorted(row)}); pass text_field=... to name the text field."
            )
        yield row[text_field]


# ---------------------------------------------------------------------------------------------
# Chunking


def chunk_tokens(
    token_lists: Iterable[list[int]],
    seq_len: int,
    bos_id: int,
    *,
    n_seqs: int | None = None,
    sep_id: int | None = None,
) -> torch.Tensor:
    """Concatenate documents (joined by ``sep_id`` if given) into rows [N, seq_len] of int64.

    Each row is BOS + ``seq_len - 1`` consecutive stream tokens; the incomplete last chunk is
    dropped and consumption stops after ``n_seqs`` rows. Documents with no tokens are skipped.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (BOS + one token), got {seq_len}.")
    if n_seqs is not None and n_seqs < 1:
        raise ValueError(f"n_seqs must be positive or None, got {n_seqs}.")
    chunk = seq_len - 1
    rows: list[list[int]] = []
    buf: list[int] = []
    n_tokens = 0  # stream tokens seen, separators included
    for ids in token_lists:
        if len(ids) == 0:
            continue
        if sep_id is not None and n_tokens:
            buf.append(sep_id)
            n_tokens += 1
        buf.extend(ids)
        n_tokens += len(ids)
        n_full = len(buf) // chunk
        if n_seqs is not None:
            n_full = min(n_full, n_seqs - len(rows))
        rows.extend(buf[i * chunk : (i + 1) * chunk] for i in range(n_full))
        del buf[: n_full * chunk]
        if len(rows) == n_seqs:
            break
    if not rows:
        raise ValueError(
            f"Found {n_tokens} tokens but one sequence of seq_len={seq_len} needs {chunk} "
            "(plus BOS): give more text or lower seq_len."
        )
    if n_seqs is not None and len(rows) < n_seqs:
        warnings.warn(
            f"Only {len(rows)} of the {n_seqs} requested sequences: found {n_tokens} tokens, "
            f"{n_seqs} x {chunk} needed. Give more text or lower n_seqs/seq_len.",
            stacklevel=2,
        )
    body = torch.tensor(rows, dtype=torch.long)  # [N, seq_len - 1]
    return torch.cat([torch.full((len(rows), 1), bos_id, dtype=torch.long), body], dim=1)


def require_sequences(tokens: torch.Tensor, n_seqs: int, source: str) -> None:
    """Stop (as the README promises) when ``source`` gave fewer rows than ``n_seqs``."""
    n, seq_len = tokens.shape
    if n < n_seqs:
        raise ValueError(
            f"Too little data: {source} gives {n} sequences of {seq_len} tokens, fewer than "
            f"data.n_seqs={n_seqs}. Set data.n_seqs={n} (or lower data.seq_len), or give more "
            "text."
        )


# ---------------------------------------------------------------------------------------------
# Tokenizing with a content-hash cache


def tokenize_dataset(
    source: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq_len: int,
    n_seqs: int | None,
    bos_id: int,
    sep_id: int | None = None,
    text_field: str = "text",
    split: str = "train",
    cache_dir: Path | None = None,
    show_progress: bool = True,
) -> torch.Tensor:
    """Token rows [N, seq_len] (int64, BOS first) from a text source, cached on disk.

    The cache key hashes the source's identity (file contents for local files), the tokenizer,
    and every argument that changes the result; a hit skips reading and tokenizing entirely.
    """
    source = os.fspath(source)
    key = _cache_key(
        source,
        tokenizer,
        seq_len=seq_len,
        n_seqs=n_seqs,
        bos_id=bos_id,
        sep_id=sep_id,
        text_field=text_field,
        split=split,
    )
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"{key}.safetensors"
    if path.is_file():
        from safetensors import SafetensorError

        try:
            tokens = load_tokens(path)
        except (OSError, ValueError, SafetensorError) as e:  # unreadable entry: rebuild it
            log.warning("Ignoring unreadable token cache %s (%s)", path, e)
        else:
            log.info("Token cache hit: %s", path)
            return tokens

    from tqdm.auto import tqdm

    total = n_seqs * (seq_len - 1) if n_seqs is not None else None
    with tqdm(
        total=total, unit="tok", unit_scale=True, desc="Tokenizing", disable=not show_progress
    ) as bar:
        texts = load_texts(source, split=split, text_field=text_field)
        token_lists = _tokenize_batches(
            texts, tokenizer, on_batch=lambda n: bar.update(min(n, total - bar.n) if total else n)
        )
        tokens = chunk_tokens(token_lists, seq_len, bos_id, n_seqs=n_seqs, sep_id=sep_id)
    save_tokens(tokens, path)
    log.info("Tokenized %s -> %s, cached at %s", source, tuple(tokens.shape), path)
    return tokens


class _HasTokenizer(Protocol):
    tokenizer: Any
    bos_token_id: int


def dataset_tokens(
    data: DataConfig, model: _HasTokenizer, *, progress: bool = True
) -> torch.Tensor:
    """Token rows [n_seqs, seq_len] of a config's ``data`` section for ``model``'s tokenizer (BOS
    first, the tokenizer's EOS between documents; cached by content hash)."""
    tokens = read_rows(data, model, data.source, data.n_seqs, progress=progress)
    require_sequences(tokens, data.n_seqs, _source_name(data.source))
    return tokens


def read_rows(
    data: DataConfig, model: _HasTokenizer, source: str, n_seqs: int, *, progress: bool = True
) -> torch.Tensor:
    """Up to ``n_seqs`` token rows of ``source``, chunked as ``data`` says (seq_len, split, text
    field). Rows come in stream order, so a shorter read is a prefix of a longer one; a source
    with fewer rows gives what it has, silently (the caller judges what is enough)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # chunk_tokens' "only N of M sequences"
        return tokenize_dataset(
            _source_name(source),
            model.tokenizer,
            seq_len=data.seq_len,
            n_seqs=n_seqs,
            bos_id=model.bos_token_id,
            sep_id=getattr(model.tokenizer, "eos_token_id", None),
            text_field=data.text_field,
            split=data.split,
            show_progress=progress,
        )


def _source_name(source: str) -> str:
    return default_text_source() if source == "default" else source


def default_cache_dir() -> Path:
    """Token batch cache: ``<cache root>/tokens`` (``$PERTURB_LENS_CACHE`` moves the root)."""
    from perturb_lens.common.paths import cache_root

    return cache_root() / "tokens"


def _tokenize_batches(
    texts: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    on_batch: Callable[[int], Any],
) -> Iterator[list[int]]:
    """Token ids per document, tokenized lazily in batches (fast tokenizers parallelize)."""
    it = iter(texts)
    while batch := list(itertools.islice(it, TOKENIZE_BATCH_DOCS)):
        # verbose=False: documents longer than the model's context are expected (they get chunked)
        ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        on_batch(sum(len(x) for x in ids))
        yield from ids


def _cache_key(source: str, tokenizer: PreTrainedTokenizerBase, **params: Any) -> str:
    """sha256 over (format, source identity, tokenizer identity, params), 32 hex chars."""
    payload = {
        "format": CACHE_FORMAT,
        "source": _source_identity(source),
        "tokenizer": _tokenizer_identity(tokenizer),
        **params,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _source_identity(source: str) -> Any:
    """Hub datasets by name; local sources by content: (suffix, sha256) per file in read order.

    Names and locations do not matter (a moved or renamed file is still a hit) except through
    the suffix, which decides parsing, and the order. Files above 200 MB: path, size and mtime.
    """
    kind, target = _resolve(source)
    if kind == "hub":
        return {"hub": target}
    return {"files": [[f.suffix.lower(), _file_identity(f)] for f in _local_files(Path(target))]}


def _file_identity(path: Path) -> str:
    st = path.stat()
    if st.st_size > CONTENT_HASH_MAX_BYTES:
        return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(2**20):
            h.update(block)
    return h.hexdigest()


def _tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the full fast-tokenizer definition, or of the sorted vocabulary for slow ones."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:
        blob = type(tokenizer).__name__ + json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Pre-tokenized tensors


def token_source_hash(tokens: torch.Tensor) -> str:
    """sha256 hex of the tokens as little-endian int64 (C order) followed by the shape as JSON.

    This is the dataset hash run manifests record.
    """
    arr = np.ascontiguousarray(tokens.detach().cpu().to(torch.int64).numpy(), dtype="<i8")
    h = hashlib.sha256(arr.tobytes())
    h.update(json.dumps(list(arr.shape)).encode())
    return h.hexdigest()


def load_tokens(path: str | Path) -> torch.Tensor:
    """Read a 2-D integer token tensor [N, T] from ``.pt``, ``.npy`` or ``.safetensors``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Token file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".pt":
        obj = torch_load(path, "token file")
    elif suffix == ".npy":
        obj = torch.from_numpy(np.load(path, allow_pickle=False))
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(path)
        if _SAFETENSORS_KEY not in tensors and len(tensors) != 1:
            raise ValueError(
                f"{path}: expected a tensor named {_SAFETENSORS_KEY!r} or a single tensor, "
                f"found {sorted(tensors)}."
            )
        obj = tensors.get(_SAFETENSORS_KEY, next(iter(tensors.values())))  # non-empty here
    else:
        raise ValueError(f"{path}: unsupported token file type; use one of {TOKEN_SUFFIXES}.")
    return _check_tokens(obj, str(path))


def save_tokens(tokens: torch.Tensor, path: str | Path) -> Path:
    """Write a token tensor [N, T] (as int64) to ``.pt``/``.npy``/``.safetensors``, atomically."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in TOKEN_SUFFIXES:
        raise ValueError(f"{path}: unsupported token file type; use one of {TOKEN_SUFFIXES}.")
    tokens = _check_tokens(tokens, "tokens to save").contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if suffix == ".pt":
            torch.save(tokens, tmp)
        elif suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, tokens.numpy())
        else:
            from safetensors.torch import save_file

            save_file({_SAFETENSORS_KEY: tokens}, tmp)
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; the cache gets what the umask allows
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _check_tokens(obj: Any, what: str) -> torch.Tensor:
    """A non-empty 2-D non-negative integer tensor, as int64 on the CPU; else a clear error."""
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{what}: expected a 2-D integer tensor [N, T], got {type(obj).__name__}.")
    if obj.dim() != 2:
        raise ValueError(
            f"{what}: expected a 2-D token tensor [N, T], got shape {tuple(obj.shape)}."
        )
    if obj.dtype.is_floating_point or obj.dtype.is_complex or obj.dtype == torch.bool:
        raise ValueError(f"{what}: token ids must be integers, got dtype {obj.dtype}.")
    if obj.numel() == 0:
        raise ValueError(f"{what}: empty token tensor of shape {tuple(obj.shape)}.")
    tokens = obj.detach().cpu().to(torch.long)
    if int(tokens.min()) < 0:
        raise ValueError(f"{what}: negative token id {int(tokens.min())}.")
    return tokens
