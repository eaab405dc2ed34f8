"""Text sources, concatenate-and-chunk, the token cache, and token files (perturb_lens.data)."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_gpt2_tokenizer

from perturb_lens.data import text as data
from perturb_lens.data.text import (
    chunk_tokens,
    default_text_source,
    load_texts,
    load_tokens,
    save_tokens,
    token_source_hash,
    tokenize_dataset,
)

EOT = 50256  # GPT-2 <|endoftext|>: its BOS and EOS


@pytest.fixture(scope="module")
def gpt2_tok(tmp_path_factory: pytest.TempPathFactory):
    """The real GPT-2 BPE tokenizer (files from ../shared/data, HF folder layout)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("gpt2-tok")
    write_gpt2_tokenizer(folder)  # skips when ../shared/data is absent
    return AutoTokenizer.from_pretrained(folder)


class CountingTokenizer:
    """Wraps a tokenizer, counting calls; raises once ``fail`` is set (to prove a cache hit)."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.backend_tokenizer = tok.backend_tokenizer
        self.calls = 0
        self.fail = False

    def __call__(self, texts, **kwargs):
        if self.fail:
            raise AssertionError("tokenizer called although the result should come from the cache")
        self.calls += 1
        return self.tok(texts, **kwargs)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Tokenizer reference and chunking


def test_gpt2_tokenizer_reference(gpt2_tok) -> None:
    ids = gpt2_tok("The capital of France is", add_special_tokens=False)["input_ids"]
    assert ids == [464, 3139, 286, 4881, 318]


def test_chunk_tokens_hand_computed() -> None:
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11]]  # stream 1..11: three rows of 3, 2 left
    out = chunk_tokens(docs, seq_len=4, bos_id=99)
    assert out.dtype == torch.long
    assert out.tolist() == [[99, 1, 2, 3], [99, 4, 5, 6], [99, 7, 8, 9]]


def test_chunk_tokens_separator_and_empty_docs() -> None:
    docs = [[1, 2, 3], [], [4, 5], [6, 7, 8, 9]]  # stream 1 2 3 0 4 5 0 6 7 | 8 9 dropped
    out = chunk_tokens(docs, seq_len=4, bos_id=99, sep_id=0)
    assert out.tolist() == [[99, 1, 2, 3], [99, 0, 4, 5], [99, 0, 6, 7]]


def test_chunk_tokens_n_seqs_stops_consuming() -> None:
    def docs():
        yield [1, 2, 3, 4, 5]
        yield [6, 7]
        raise AssertionError("read past the requested number of rows")

    out = chunk_tokens(docs(), seq_len=3, bos_id=0, n_seqs=3)
    assert out.tolist() == [[0, 1, 2], [0, 3, 4], [0, 5, 6]]


def test_chunk_tokens_shortfall_warns_and_empty_raises() -> None:
    with pytest.warns(UserWarning, match=r"Only 1 of the 5 requested sequences: found 5 tokens"):
        out = chunk_tokens([[1, 2, 3, 4, 5]], seq_len=4, bos_id=9, n_seqs=5)
    assert out.tolist() == [[9, 1, 2, 3]]
    with pytest.raises(ValueError, match=r"Found 2 tokens .* seq_len=4 needs 3"):
        chunk_tokens([[1], [2]], seq_len=4, bos_id=9)
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        chunk_tokens([[1, 2]], seq_len=1, bos_id=9)


# ---------------------------------------------------------------------------------------------
# Text sources


def test_load_texts_txt_cor_jsonl_parquet(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\n\n   \nsecond doc\r\nthird", encoding="utf-8")
    assert list(load_texts(str(txt))) == ["first doc", "second doc", "third"]
    cor = tmp_path / "b.cor"
    cor.write_text("x y\nz\n", encoding="utf-8")
    assert list(load_texts(str(cor))) == ["x y", "z"]
    jl = write_jsonl(tmp_path / "c.jsonl", [{"body": "one", "id": 1}, {"body": "two", "id": 2}])
    assert list(load_texts(str(jl), text_field="body")) == ["one", "two"]
    pq.write_table(pa.table({"text": ["p1", None, "p2"], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    assert list(load_texts(str(tmp_path / "d.parquet"))) == ["p1", "p2"]
    assert list(load_texts(str(txt), max_docs=2)) == ["first doc", "second doc"]


def test_load_texts_folder_sorted(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.txt").write_text("b1\nb2\n", encoding="utf-8")
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a1"}])
    (tmp_path / "sub" / "c.txt").write_text("c1\n", encoding="utf-8")
    (tmp_path / ".hidden" / "x.txt").write_text("hidden\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored\n", encoding="utf-8")
    assert list(load_texts(str(tmp_path))) == ["a1", "b1", "b2", "c1"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"No \.txt/\.cor/\.jsonl/\.parquet files"):
        list(load_texts(str(empty)))


def test_load_texts_field_errors(tmp_path: Path) -> None:
    jl = write_jsonl(tmp_path / "c.jsonl", [{"text": "ok"}, {"body": "x", "id": 3}])
    with pytest.raises(
        ValueError, match=r"c\.jsonl, line 2: no field 'text' \(available: \['body', 'id'\]\)"
    ):
        list(load_texts(str(jl)))
    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"no column 'text' \(available: \['content'\]\)"):
        list(load_texts(str(tmp_path / "d.parquet")))
    save_tokens(torch.ones(2, 3, dtype=torch.long), tmp_path / "t.pt")
    with pytest.raises(ValueError, match="load_tokens"):
        list(load_texts(str(tmp_path / "t.pt")))


@pytest.mark.parametrize(
    "source", ["./nope.txt", "/no/such/dir", "~/no-such-perturb-lens", "x.jsonl"]
)
def test_missing_local_path(source: str) -> None:
    with pytest.raises(FileNotFoundError, match="looks like a local path"):
        load_texts(source)


def test_hub_name_routes_to_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    with pytest.raises(ImportError, match=r"pip install 'perturb-lens\[datasets\]'"):
        list(load_texts("Skylion007/openwebtext"))

    calls = []

    def load_dataset(name, *, split, streaming):
        calls.append((name, split, streaming))
        return [{"text": "hub one"}, {"text": "hub two"}, {"text": "hub three"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert list(load_texts("Skylion007/openwebtext", split="validation", max_docs=2)) == [
        "hub one",
        "hub two",
    ]
    assert calls == [("Skylion007/openwebtext", "validation", True)]
    with pytest.raises(ValueError, match=r"no field 'body' \(available: \['text'\]\)"):
        list(load_texts("Skylion007/openwebtext", text_field="body"))


def test_builtin_lee() -> None:
    if data.lee_corpus_path() is None:
        pytest.skip("gensim is not installed (pip install gensim): it ships the Lee corpus")
    docs = list(load_texts("builtin:lee"))
    # 300 lines: `wc -l` says 299 because the last article has no trailing newline
    assert len(docs) == 300
    assert docs[0].startswith("Hundreds of people have been forced to vacate their homes")
    assert "gensim" not in sys.modules  # the file is read without importing gensim
    assert default_text_source() == "builtin:lee"


def test_builtin_errors_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="Unknown built-in source"):
        load_texts("builtin:nope")
    monkeypatch.setattr(data, "lee_corpus_path", lambda: None)
    with pytest.raises(ImportError, match="pip install gensim"):
        load_texts("builtin:lee")
    webtext = Path(data.__file__).resolve().parents[3] / "shared/data/webtext/webtext.test.jsonl"
    if webtext.is_file():
        assert default_text_source() == str(webtext)
    else:
        with pytest.raises(FileNotFoundError, match="pip install gensim"):
            default_text_source()


# ---------------------------------------------------------------------------------------------
# Tokenizing and the cache


def test_tokenize_dataset_matches_reference(gpt2_tok, webtext_path: Path, tmp_path: Path) -> None:
    seq_len, n_seqs = 64, 40
    tokens = tokenize_dataset(
        str(webtext_path),
        gpt2_tok,
        seq_len=seq_len,
        n_seqs=n_seqs,
        bos_id=EOT,
        sep_id=EOT,
        cache_dir=tmp_path,
        show_progress=False,
    )
    # reference: each document tokenized alone, joined by EOT, cut by hand
    stream: list[int] = []
    with webtext_path.open(encoding="utf-8") as f:
        for line in f:
            if len(stream) > n_seqs * seq_len:
                break
            ids = gpt2_tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            stream += ([EOT] if stream else []) + ids
    expected = [[EOT, *stream[i * 63 : (i + 1) * 63]] for i in range(n_seqs)]
    assert tokens.dtype == torch.long
    assert tokens.tolist() == expected


def test_cache_hit_and_invalidation(gpt2_tok, tmp_path: Path) -> None:
    src = tmp_path / "docs.txt"
    src.write_text("The capital of France is Paris.\n" * 40, encoding="utf-8")
    tok = CountingTokenizer(gpt2_tok)
    cache = tmp_path / "cache"
    kw = dict(seq_len=16, n_seqs=10, bos_id=EOT, sep_id=EOT, cache_dir=cache, show_progress=False)
    first = tokenize_dataset(str(src), tok, **kw)
    assert tok.calls == 1 and first.shape == (10, 16)
    assert [p.suffix for p in cache.iterdir()] == [".safetensors"]  # no temp file left behind

    tok.fail = True  # a hit must neither read nor tokenize
    assert torch.equal(tokenize_dataset(str(src), tok, **kw), first)
    moved = tmp_path / "moved.txt"  # same content elsewhere: keyed by content, still a hit
    moved.write_bytes(src.read_bytes())
    assert torch.equal(tokenize_dataset(str(moved), tok, **kw), first)

    tok.fail = False
    src.write_text("The capital of Italy is Rome.\n" * 40, encoding="utf-8")
    changed = tokenize_dataset(str(src), tok, **kw)
    assert tok.calls == 2 and not torch.equal(changed, first)
    tokenize_dataset(str(src), tok, **{**kw, "seq_len": 8})
    assert tok.calls == 3 and len(list(cache.iterdir())) == 3

    for entry in cache.iterdir():  # an unreadable entry is rebuilt, not fatal
        entry.write_bytes(b"garbage")
    assert torch.equal(tokenize_dataset(str(moved), tok, **kw), first)
    assert tok.calls == 4


def test_tokenize_dataset_from_hub(gpt2_tok, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    rows = [{"text": "The capital of France is"}] * 3
    fake = types.SimpleNamespace(load_dataset=lambda name, split, streaming: rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    tokens = tokenize_dataset(
        "someone/web", gpt2_tok, seq_len=6, n_seqs=None, bos_id=EOT, cache_dir=tmp_path
    )
    assert tokens.tolist() == [[EOT, 464, 3139, 286, 4881, 318]] * 3


# ---------------------------------------------------------------------------------------------
# Token files and the dataset hash


@pytest.mark.parametrize("suffix", [".pt", ".npy", ".safetensors"])
def test_token_files_roundtrip(tmp_path: Path, suffix: str) -> None:
    tokens = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    path = save_tokens(tokens, tmp_path / f"t{suffix}")
    loaded = load_tokens(path)
    assert loaded.dtype == torch.long and torch.equal(loaded, tokens.long())


def test_token_files_validation(tmp_path: Path) -> None:
    bad = {
        "1d.npy": (np.arange(5), "2-D"),
        "float.npy": (np.ones((2, 3), dtype=np.float32), "must be integers"),
        "empty.npy": (np.zeros((0, 3), dtype=np.int64), "empty token tensor"),
        "neg.npy": (-np.ones((2, 3), dtype=np.int64), "negative token id"),
    }
    for name, (arr, msg) in bad.items():
        np.save(tmp_path / name, arr)
        with pytest.raises(ValueError, match=msg):
            load_tokens(tmp_path / name)
    torch.save({"a": torch.ones(2, 2)}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="got dict"):
        load_tokens(tmp_path / "dict.pt")
    from safetensors.torch import save_file

    save_file(
        {"a": torch.ones(2, 2, dtype=torch.long), "b": torch.ones(1, 1)}, tmp_path / "x.safetensors"
    )
    with pytest.raises(ValueError, match="'tokens' or a single tensor"):
        load_tokens(tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="unsupported token file type"):
        save_tokens(torch.ones(2, 2, dtype=torch.long), tmp_path / "t.csv")
    with pytest.raises(FileNotFoundError):
        load_tokens(tmp_path / "absent.pt")


def test_token_source_hash() -> None:
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    expected = hashlib.sha256(
        np.array([1, 2, 3, 4, 5, 6], dtype="<i8").tobytes() + b"[2, 3]"
    ).hexdigest()
    assert token_source_hash(tokens) == expected
    assert token_source_hash(tokens.to(torch.int32)) == expected  # dtype-independent
    assert token_source_hash(tokens.reshape(3, 2)) != expected  # shape matters
    assert token_source_hash(tokens.T.contiguous().T) == expected  # memory layout does not
