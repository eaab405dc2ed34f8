"""Tokens as text: curve labels with context (``…capital of| France|``), and the report's "Most
sensitive tokens" section (per direction, the tokens whose metric crosses its threshold at the
smallest length and those that cross latest or never, and a few sequences as text, each token
shaded by its threshold length; hovering shows the length).

The numbers come from :func:`~perturb_lens.analysis.tokens.token_table` (also ``Run.tokens()``);
every token text reaches the page through :func:`html.escape`, so a token ``<script>`` shows as
text.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from perturb_lens.analysis.tokens import token_table
from perturb_lens.plots.registry import RunReader
from perturb_lens.results.aggregate import metric_threshold
from perturb_lens.results.tokens import CONTEXT_TOKENS, load_token_text

N_TABLE = 8  # tokens in each of the most / least sensitive tables
N_VIEW_SEQS = 3  # sequences in the text view
_SHADE = (213, 94, 0)  # vermillion (Okabe-Ito): darker = crosses at a smaller length
_VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

_CSS = """
.tokdir { margin: 10px 0 18px; border: 1px solid var(--line); border-radius: 8px;
  padding: 6px 14px; } .tokdir summary { cursor: pointer; font-size: 1.02em; }
.tokcols { display: flex; flex-wrap: wrap; gap: 10px 36px; } .tokcols h4 { margin: 10px 0 2px; }
td.tt { text-align: left; white-space: pre; font-family: ui-monospace, Menlo, Consolas,
  monospace; font-size: .95em; } td.tt .ctx { color: var(--muted); } td.tt b { color: #000; }
.tokview { font-size: 14px; line-height: 2.0; white-space: pre-wrap; word-break: break-word;
  border-left: 3px solid var(--line); padding: 2px 0 2px 10px; margin: 8px 0; }
.tokview .seqno { color: var(--muted); font-size: .8em; margin-right: 8px; white-space: nowrap; }
.tok { position: relative; border-radius: 3px; padding: 1px 0; }
.tok.na { color: #9a9a9a; } .tok[data-tip]:hover { outline: 1px solid #333; }
.tok[data-tip]:hover::after { content: attr(data-tip); position: absolute; left: 0; top: 1.7em;
  z-index: 5; background: #222; color: #fff; font: 12px/1.3 system-ui, sans-serif;
  padding: 3px 7px; border-radius: 4px; white-space: pre; pointer-events: none; }
.toklegend { font-size: .85em; color: var(--muted); } .toklegend .tok { padding: 1px 6px; }
"""


def shown(text: str) -> str:
    """A token's text with its whitespace and control characters made visible (one line)."""
    for char, sign in _VISIBLE.items():
        text = text.replace(char, sign)
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", text)


def _more_before(pos: int, context: int = CONTEXT_TOKENS) -> str:
    return "…" if pos > context else ""


def token_label(token: str | None, context: str | None, seq: int, pos: int) -> str:
    """``…capital of| France|``: a few tokens of context, then the token between bars (visible
    whitespace); ``token seq=0, pos=25`` when its text is unknown (no tokenizer)."""
    if token is None or pd.isna(token):
        return f"token seq={seq}, pos={pos}"
    return f"{_more_before(pos)}{shown(context or '')}|{shown(token)}|"


def label_curves(curves: pd.DataFrame, view: RunReader) -> pd.DataFrame:
    """Token curves (``analysis.token_curves``) with a ``label`` column: the token in context
    (:func:`token_label`), for the legends of the token-curve figures; unchanged (labelled by
    position) when the run keeps no token text."""
    text, _ = load_token_text(view.run_dir, view.manifest)
    if text is None:
        return curves
    keys = curves[["seq", "pos"]].drop_duplicates().merge(text, on=["seq", "pos"], how="left")
    labels = [
        token_label(r.get("token"), r.get("context"), int(r["seq"]), int(r["pos"]))
        for r in keys.to_dict("records")
    ]
    keys = keys[["seq", "pos"]].assign(label=[lab.replace("$", r"\$") for lab in labels])
    return curves.merge(keys, on=["seq", "pos"], how="left")


def _section_metric(view: RunReader) -> str | None:
    """The metric the section ranks by: KL if the run has it, else the first with a threshold."""
    with_threshold = [m for m in view.metrics if metric_threshold(m) is not None]
    return "kl" if "kl" in with_threshold else next(iter(with_threshold), None)


def _num(value: float) -> str:
    return "never" if pd.isna(value) else f"{value:.4g}"


def _table(rows: pd.DataFrame, metric: str) -> str:
    """Rank, token in context, position, threshold length and maximum, as an HTML table."""
    head = (
        '<tr><th>#</th><th style="text-align: left">token in context</th><th>seq · pos</th>'
        "<th>crosses at α</th>"
        f"<th>max {html.escape(metric)}</th></tr>"
    )
    body = []
    for r in rows.to_dict("records"):
        if r["token"] is None or pd.isna(r["token"]):
            cell = "–"
        else:
            before = html.escape(_more_before(int(r["pos"])) + shown(r["context"] or ""))
            cell = f'<span class="ctx">{before}</span>|<b>{html.escape(shown(r["token"]))}</b>|'
        body.append(
            f'<tr><td>{r["rank"]}</td><td class="tt">{cell}</td><td>{r["seq"]} · {r["pos"]}</td>'
            f"<td>{_num(r['threshold_length'])}</td><td>{r[f'max_{metric}']:.4g}</td></tr>"
        )
    return f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def _shade(length: float, grid: np.ndarray) -> str:
    """Background of a token crossing at ``length``: darkest at the grid's first length."""
    if pd.isna(length):
        return ""
    frac = np.searchsorted(grid, length) / max(len(grid) - 1, 1)
    r, g, b = _SHADE
    return f"background: rgba({r}, {g}, {b}, {0.85 - 0.7 * min(frac, 1.0):.2f})"


def text_view(
    rows: pd.DataFrame,
    text: pd.DataFrame,
    grid: Sequence[float],
    seqs: Sequence[int],
    *,
    metric: str,
    threshold: float,
) -> str:
    """The sequences ``seqs`` as text (``text``: one row per seq and pos, with ``token``), each
    token shaded by its threshold length in ``rows`` (one direction of :func:`token_table`);
    hovering shows the length. Tokens outside the averages are greyed."""
    grid = np.sort(np.asarray(grid, dtype=np.float64))
    keys = zip(rows["seq"].tolist(), rows["pos"].tolist(), strict=True)
    crossing = dict(zip(keys, rows["threshold_length"].tolist(), strict=True))
    shown_seqs = text[text["seq"].isin(list(seqs))].sort_values(["seq", "pos"])
    spans: dict[int, list[str]] = {
        int(s): [f'<span class="seqno">seq {int(s)}</span>'] for s in seqs
    }
    for seq, pos, token_id, token in zip(
        shown_seqs["seq"].tolist(),
        shown_seqs["pos"].tolist(),
        shown_seqs["token_id"].tolist(),
        shown_seqs["token"].tolist(),
        strict=True,
    ):
        token = token if isinstance(token, str) else f"<id {token_id}>"
        shown_text = html.escape(_CONTROL.sub("�", token.replace("\n", "↵\n")))
        if (seq, pos) not in crossing:
            tip, cls, style = f"pos {pos}: not in the averages", "tok na", ""
        else:
            length = crossing[(seq, pos)]
            tip = (
                f"{metric} > {threshold:g} from α = {length:.4g}"
                if not pd.isna(length)
                else f"{metric} ≤ {threshold:g} up to α = {grid[-1]:.4g}"
            ) + f"  (pos {pos})"
            cls, style = "tok", _shade(length, grid)
        spans[int(seq)].append(
            f'<span class="{cls}" style="{style}" data-tip="{html.escape(tip)}">{shown_text}</span>'
        )
    return "".join(f'<div class="tokview">{"".join(line)}</div>' for line in spans.values())


def _legend(grid: np.ndarray, metric: str, threshold: float) -> str:
    picks = grid[np.unique(np.linspace(0, len(grid) - 1, 5).round().astype(int))]
    swatches = " ".join(
        f'<span class="tok" style="{_shade(x, grid)}">α = {x:.3g}</span>' for x in picks
    )
    return (
        f'<p class="toklegend">Shade: the smallest α at which {html.escape(metric)} exceeds '
        f"{threshold:g} for the token, {swatches}; unshaded: never on the grid; grey: not in "
        "the averages. Hover over a token for its number.</p>"
    )


def tokens_section(view: RunReader, n: int = N_TABLE, n_seqs: int = N_VIEW_SEQS) -> str:
    """The report's "Most sensitive tokens" section (HTML; its own styles inline)."""
    metric = _section_metric(view)
    if metric is None:
        return "<p>No metric of this run has a threshold to rank tokens by.</p>"
    table = token_table(view.run_dir, metric)
    threshold = table.attrs["threshold"]
    text, _ = load_token_text(view.run_dir, view.manifest)
    grid = np.sort(table["threshold_length"].dropna().unique())
    grid = np.union1d(grid, np.asarray(view.meta.get("lengths") or grid, dtype=np.float64))
    notes = "".join(f'<p class="warning">{html.escape(note)}</p>' for note in table.attrs["notes"])
    intro = (
        f"<p>Per direction, the tokens whose {html.escape(metric)} first exceeds {threshold:g} "
        "at the smallest perturbation length α (most sensitive), and those that cross latest or "
        f"never (least sensitive; ties: the larger maximum {html.escape(metric)} first), over "
        "the tokens of the published averages. The full table: "
        f"<code>perturb_lens.open_run(RUN).tokens({metric!r})</code>.</p>"
    )
    seqs = sorted(text["seq"].unique())[:n_seqs] if text is not None else []
    parts = []
    for direction, rows in table.groupby("direction", observed=True, sort=False):
        view_html = (
            text_view(rows, text, grid, seqs, metric=metric, threshold=threshold)
            if text is not None
            else ""
        )
        parts.append(_direction_block(str(direction), rows, metric, n, view_html))
    legend = _legend(grid, metric, threshold) if text is not None and len(grid) else ""
    return f"<style>{_CSS}</style>{notes}{intro}{legend}{''.join(parts)}"


def _direction_block(direction: str, rows: pd.DataFrame, metric: str, n: int, view: str) -> str:
    """One direction: its most and least sensitive tokens (position 0, BOS, summed up apart:
    it would fill the least sensitive list) and its text view."""
    crossed = rows["threshold_length"].notna().mean()
    first = rows[rows["pos"] == 0]
    listed = rows[rows["pos"] > 0]
    bos = ""
    if len(first):
        never = int(first["threshold_length"].isna().sum())
        lowest = first["threshold_length"].min()
        rest = "." if never == len(first) else f"; the others from α = {lowest:.4g}."
        bos = (
            f'<p class="sub">Position 0 (BOS) is left out of both lists: {never} of '
            f"{len(first)} never cross{rest}</p>"
        )
    return (
        f'<details class="tokdir" open><summary><b>{html.escape(direction)}</b> · '
        f"{len(rows):,} tokens, {crossed:.0%} cross</summary>"
        f'<div class="tokcols"><div><h4>Most sensitive</h4>{_table(listed.head(n), metric)}</div>'
        f"<div><h4>Least sensitive</h4>{_table(listed.tail(n).iloc[::-1], metric)}</div></div>"
        f"{bos}" + (f"<h4>Text view</h4>{view}" if view else "") + "</details>"
    )
