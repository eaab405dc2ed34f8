"""Tokens as text (issue 26 item 3): ``Run.tokens()`` against a plain pandas computation on the
rows with the tokenizer's own decoding; the report's token section and text view escape token
text; an aggregate run says it ranks only its first sequences; an old run without token text says
so instead of failing."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from synthetic_runs import make_run, small_config

from perturb_lens import open_run
from perturb_lens.config.schema import validate_config
from perturb_lens.data.text import dataset_tokens, token_source_hash
from perturb_lens.plots.registry import RunReader
from perturb_lens.plots.token_view import label_curves, text_view, tokens_section
from perturb_lens.results import load_manifest, load_results
from perturb_lens.results.aggregate import SAMPLE_SEQS

KL_THRESHOLD = 0.1  # the registered threshold of kl (metrics.py), written out: the reference's own


def _reference(run_dir: Path, config: dict, tokenizer) -> pd.DataFrame:
    """Per (direction, seq, pos), written plainly: the smallest length whose KL exceeds 0.1 over
    the averaged rows (all-positions: the last position left out), the largest KL, and the
    token's text and its 4 tokens of context, each decoded by the tokenizer alone."""
    rows = load_results(run_dir)
    seq_len = config["data"]["seq_len"]
    rows = rows[rows["pos"] < seq_len - 1].astype({"direction": str})
    records = []
    for (direction, seq, pos), g in rows.groupby(["direction", "seq", "pos"]):
        crossed = g.loc[g["kl"] > KL_THRESHOLD, "length"]
        records.append(
            {
                "direction": direction,
                "seq": seq,
                "pos": pos,
                "threshold_length": float(crossed.min()) if len(crossed) else np.nan,
                "max_kl": float(g["kl"].max()),
            }
        )
    ref = pd.DataFrame(records)
    model = SimpleNamespace(tokenizer=tokenizer, bos_token_id=tokenizer.bos_token_id)
    ids = dataset_tokens(validate_config(config).data, model, progress=False)
    # the run's own tokens: the manifest's hash of them agrees
    assert token_source_hash(ids) == load_manifest(run_dir)["meta"]["dataset_hash"]
    ids = ids.numpy()
    ref["token_id"] = [ids[s, p] for s, p in zip(ref["seq"], ref["pos"], strict=True)]
    ref["token"] = [tokenizer.decode([i]) for i in ref["token_id"]]
    ref["context"] = [
        "".join(tokenizer.decode([i]) for i in ids[s, max(p - 4, 0) : p])
        for s, p in zip(ref["seq"], ref["pos"], strict=True)
    ]
    return ref


def _by_token(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.astype({"direction": str, "seq": np.int64, "pos": np.int64, "token_id": np.int64})
    cols = ["direction", "seq", "pos", "token_id", "token", "context", "threshold_length", "max_kl"]
    return out[cols].sort_values(["direction", "seq", "pos"], ignore_index=True)


@pytest.fixture(scope="module")
def gpt2_tokenizer(gpt2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt2_dir)


def test_token_table_equals_pandas_on_the_rows(shard_reference, shard_config, gpt2_tokenizer):
    table = open_run(shard_reference).tokens("kl")
    ref = _reference(shard_reference, shard_config, gpt2_tokenizer)
    # both kinds of token, so the threshold column is tested on both
    assert ref["threshold_length"].notna().any() and ref["threshold_length"].isna().any()
    pd.testing.assert_frame_equal(_by_token(table), _by_token(ref))
    assert table.attrs["notes"] == [] and table.attrs["seqs"] is None
    # ranked per direction: crossing length (never last), then the larger maximum first
    for direction, got in table.groupby("direction", observed=True, sort=False):
        want = ref[ref["direction"] == direction].assign(
            never=lambda d: d["threshold_length"].isna(), neg=lambda d: -d["max_kl"]
        )
        want = want.sort_values(["never", "threshold_length", "neg", "seq", "pos"])
        assert got["rank"].tolist() == list(range(1, len(got) + 1))
        assert list(zip(got["seq"], got["pos"], strict=True)) == list(
            zip(want["seq"], want["pos"], strict=True)
        )


def test_token_curve_labels_show_the_token_in_context(shard_reference, gpt2_tokenizer):
    """The token-curve figure's legends: ``…context|token|`` from the tokenizer's decoding."""
    run = open_run(shard_reference)
    plot = next(p for p in run.figures() if p.name == "tokens_kl")
    ids = pd.read_parquet(shard_reference / "tokens.parquet").set_index(["seq", "pos"])["token_id"]
    legend = {t.get_text() for ax in plot.figure.axes for t in ax.get_legend().get_texts()}
    for seq, pos in plot.data[["seq", "pos"]].drop_duplicates().itertuples(index=False):
        before = [ids[(seq, p)] for p in range(max(pos - 4, 0), pos)]
        text = "".join(gpt2_tokenizer.decode([i]) for i in before)
        token = gpt2_tokenizer.decode([ids[(seq, pos)]])
        label = ("…" if pos > 4 else "") + f"{text}|{token}|".replace("\n", "↵")
        assert label.replace("$", r"\$") in legend


class _HostileTokenizer:
    """Decodes ids into text that is HTML (and a mathtext dollar) if not escaped."""

    words = ("<s>", "<script>", "alert(1)", "</script>", " A&B", ' "q"', " $x$", "\n")

    def decode(self, ids: list[int]) -> str:
        return "".join(self.words[i % len(self.words)] for i in ids)


def _hostile_run(folder: Path) -> Path:
    ids = np.arange(4 * 6).reshape(4, 6) % len(_HostileTokenizer.words)
    return make_run(folder, small_config(), token_text=(ids, _HostileTokenizer()))


def test_text_view_escapes_html_in_token_text(tmp_path: Path) -> None:
    text = pd.DataFrame(
        {"seq": 0, "pos": range(4), "token_id": range(4), "token": ["<s>", "<script>", "x", "\n"]}
    )
    rows = pd.DataFrame({"seq": 0, "pos": [0, 1, 2], "threshold_length": [1.0, 3.0, np.nan]})
    page = text_view(rows, text, [0.0, 1.0, 3.0], [0], metric="kl", threshold=0.1)
    assert "<script>" not in page and "<s>" not in page
    assert ">&lt;script&gt;</span>" in page and ">&lt;s&gt;</span>" in page
    assert 'data-tip="kl &gt; 0.1 from α = 3  (pos 1)"' in page  # hover: the number
    assert 'data-tip="kl ≤ 0.1 up to α = 3  (pos 2)"' in page
    assert 'class="tok na"' in page  # position 3: not in the averages
    # the whole report: the token section and its text view, escaped
    run = _hostile_run(tmp_path / "run")
    section = tokens_section(RunReader(run))
    assert "<script>" not in section and "&lt;script&gt;" in section
    assert "Most sensitive" in section and "Least sensitive" in section
    # position 0 (BOS) is summed up apart, not listed
    assert "Position 0 (BOS) is left out of both lists" in section
    assert not re.search(r"<td>\d+ · 0</td>", section) and re.search(r"<td>\d+ · 1</td>", section)
    assert section.count('<div class="tokview">') == 3 * 3  # 3 sequences x 3 directions


def test_report_page_holds_no_token_markup(tmp_path: Path) -> None:
    """In the written page only its own <script> is a tag; token text shows as text."""
    from perturb_lens.plots import write_report

    page = write_report(_hostile_run(tmp_path / "run")).read_text()
    assert page.count("<script>") == 1 and page.count("</script>") == 1  # the page's own JS
    assert "&lt;script&gt;" in page and 'id="tokens"' in page
    assert not re.search(r"<s>|<script>alert", page)


def test_aggregate_run_ranks_only_its_first_sequences(aggregate_reference, shard_reference):
    run = open_run(aggregate_reference)
    with pytest.warns(UserWarning, match=f"only the rows of the first {SAMPLE_SEQS} sequences"):
        table = run.tokens("kl")
    assert table.attrs["seqs"] == SAMPLE_SEQS and set(table["seq"]) == set(range(SAMPLE_SEQS))
    # the same tokens and lengths as the rows run of the same config, on those sequences
    rows_table = open_run(shard_reference).tokens("kl")
    first = rows_table[rows_table["seq"] < SAMPLE_SEQS]
    pd.testing.assert_frame_equal(_by_token(table), _by_token(first))
    assert set(pd.read_parquet(aggregate_reference / "tokens.parquet")["seq"]) == set(
        range(SAMPLE_SEQS)
    )
    section = tokens_section(RunReader(aggregate_reference))
    assert f"only the rows of the first {SAMPLE_SEQS} sequences are kept" in section


def test_old_run_without_token_text_says_so(tmp_path: Path) -> None:
    run = open_run(make_run(tmp_path / "old", small_config()))
    with pytest.warns(UserWarning, match="keeps no token text"):
        table = run.tokens()
    assert table["token"].isna().all() and table["threshold_length"].notna().any()
    view = RunReader(run)
    section = tokens_section(view)
    assert "keeps no token text" in section and "tokview" not in section.split("</style>")[1]
    curves = pd.DataFrame({"seq": [1], "pos": [2], "kl": [0.5]})
    assert label_curves(curves, view) is curves  # legends by position, as before


def test_damaged_token_text_is_named_not_fatal(tmp_path: Path) -> None:
    run = _hostile_run(tmp_path / "run")
    (run / "tokens.parquet").write_bytes(b"not parquet")
    with pytest.warns(UserWarning, match="does not match its recorded sha256"):
        table = open_run(run).tokens()
    assert table["token"].isna().all()
