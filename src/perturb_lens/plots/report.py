"""Self-contained HTML reports: one run (``report``) or several overlaid (``compare``).

The page needs no network: figures are inline SVG (text as text), styles and a few lines of
JavaScript are inline, and every link to data (manifest, shards, figure files, CSV of the plotted
numbers) is relative, so a copied run directory still opens on another machine.
"""

from __future__ import annotations

import errno
import html
import json
import os
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from perturb_lens.analysis.tables import pick_lengths
from perturb_lens.analysis.verdicts import (
    judged,
    stats_fit,
    verdict_notes,
    verdict_rows,
    verdicts,
)
from perturb_lens.common import version
from perturb_lens.plots.figures import (
    Palette,
    bar_panels,
    line_panels,
    run_palette,
    series_color,
    series_slug,
)
from perturb_lens.plots.registry import (
    Plot,
    RunReader,
    check_formats,
    figures_for,
    save_plots,
)
from perturb_lens.plots.render import render_plots
from perturb_lens.plots.sets import (
    bar_lengths,
    interpolation_stats,
    length_label,
    metric_label,
    metric_threshold,
    sae_directions,
    sharpness_plot,
    size_kl_plot,
    size_kl_points,
)
from perturb_lens.plots.token_view import tokens_section
from perturb_lens.results.store import MANIFEST, atomic_write, diff_configs
from perturb_lens.statistics.fit_size import fit_size_warning

DEFAULT_FORMATS = ("svg",)  # the page's own figures; PNG (a render as dear again) on request
REPORT = "report.html"
COMPARE = "compare.html"
FIGURES = "figures"

_CSS = """
:root { --fg: #1d1d1f; --muted: #5f6368; --line: #d9d9de; --accent: #0072B2; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
  margin: 0 auto; max-width: 1180px; padding: 24px 28px 60px; }
h1 { font-size: 1.6em; margin: 0 0 4px; } h2 { margin-top: 2.2em; border-bottom: 1px solid
  var(--line); padding-bottom: 4px; } .sub { color: var(--muted); margin: 0 0 16px; }
nav { font-size: .92em; margin: 12px 0 18px; } nav a { margin-right: 12px; }
a { color: var(--accent); } table { border-collapse: collapse; font-size: .88em; margin: 8px 0; }
th, td { padding: 3px 10px; border-bottom: 1px solid var(--line); text-align: right; }
th:first-child, td:first-child { text-align: left; } thead th { border-bottom: 2px solid #999; }
table.facts td:first-child { color: var(--muted); } table.facts td { text-align: left; }
p.warning { background: #fff3cd; border: 1px solid #d39e00; padding: 8px 12px; border-radius: 6px; }
figure.plot { margin: 26px 0; padding: 12px 14px; border: 1px solid var(--line);
  border-radius: 8px; } figure.plot svg { max-width: 100%; height: auto; display: block;
  margin: 0 auto; }
figure.plot h3 { margin: 0 0 6px; font-size: 1.05em; } figcaption { color: var(--muted);
  font-size: .9em; margin-top: 6px; } .tools { float: right; font-size: .85em; }
.tools button { font: inherit; padding: 2px 9px; border: 1px solid var(--line);
  border-radius: 5px; background: #f6f6f8; cursor: pointer; }
.tools button.on { background: var(--accent); color: #fff; }
#toggles { position: sticky; top: 0; background: #fffffff0; padding: 8px 0; z-index: 2;
  border-bottom: 1px solid var(--line); font-size: .9em; } #toggles label { margin-right: 14px;
  white-space: nowrap; cursor: pointer; } .swatch { display: inline-block; width: 11px;
  height: 11px; border-radius: 2px; margin: 0 4px -1px 2px; }
details pre { background: #f6f6f8; padding: 10px; overflow-x: auto; font-size: .85em; }
.links { font-size: .85em; } .links a { margin-right: 8px; }
"""

_JS = """
function setSeries(slug, on) {
  document.querySelectorAll('[id*="-pl--' + slug + '--"]').forEach(function (el) {
    el.style.display = on ? '' : 'none';
  });
}
document.querySelectorAll('#toggles input').forEach(function (box) {
  box.addEventListener('change', function () { setSeries(box.dataset.series, box.checked); });
});
document.querySelectorAll('button.logy').forEach(function (btn) {
  btn.addEventListener('click', function () {
    var fig = btn.closest('figure'), log = !btn.classList.contains('on');
    btn.classList.toggle('on', log);
    fig.querySelector('.view-lin').hidden = log;
    fig.querySelector('.view-log').hidden = !log;
  });
});
"""


def inline_svg(svg: bytes, prefix: str) -> str:
    """Matplotlib SVG made fit to inline: no XML prologue or metadata, ids prefixed (unique in
    the page). Its natural size stays; the page's CSS shrinks it to narrow windows."""
    text = svg.decode()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, count=1, flags=re.S)
    text = re.sub(r'id="([^"]+)"', rf'id="{prefix}-\1"', text)
    text = re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}-\1)", text)
    text = re.sub(r'href="#([^"]+)"', rf'href="#{prefix}-\1"', text)
    return text


def _rel(path: Path, start: Path) -> str:
    """``path`` relative to the folder ``start``, with forward slashes (for an href)."""
    return Path(os.path.relpath(path, start)).as_posix()


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _table(df: pd.DataFrame, *, index: bool = True) -> str:
    """A frame as a plain HTML table, numbers to 4 significant digits."""
    return df.to_html(index=index, float_format=lambda v: f"{v:.4g}", border=0, na_rep="–")


def _facts(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in pairs)
    return f'<table class="facts">{rows}</table>'


def _figure(plot: Plot, files: dict[str, Path], out_dir: Path, log_y: bool = False) -> str:
    """One plot as a <figure>: inline SVG (with ``log_y``, and a log-y view where the plot has
    one), caption, links to its files."""
    views = f'<div class="view-lin">{inline_svg(plot.render("svg"), plot.name)}</div>'
    tools = ""
    if log_y and plot.log_toggle:
        log_svg = inline_svg(plot.render("svg", logy=True), f"{plot.name}-log")
        views += f'<div class="view-log" hidden>{log_svg}</div>'
        tools = '<span class="tools"><button class="logy" type="button">log y</button></span>'
    links = " ".join(
        f'<a href="{_esc(_rel(p, out_dir))}">{fmt.upper()}</a>' for fmt, p in files.items()
    )
    return (
        f'<figure class="plot" id="fig-{_esc(plot.name)}" data-figure="{_esc(plot.name)}">'
        f"{tools}<h3>{_esc(plot.title)}</h3>{views}<figcaption>{_esc(plot.caption)} "
        f'<span class="links">{links}</span></figcaption></figure>'
    )


def _toggles(*groups: tuple[Sequence[str], Palette | None]) -> str:
    """Checkboxes that show or hide a series (direction, run) in every figure."""
    names: dict[str, Palette | None] = {}
    for group, palette in groups:
        for n in group:
            names.setdefault(n, palette)
    if not names:
        return ""
    boxes = "".join(
        f'<label><input type="checkbox" checked data-series="{_esc(series_slug(n))}">'
        f'<span class="swatch" style="background:{series_color(n, pal)}"></span>{_esc(n)}</label>'
        for n, pal in names.items()
    )
    return f'<div id="toggles"><b>Show:</b> {boxes}</div>'


def _page(title: str, subtitle: str, body: str, sections: Sequence[tuple[str, str]]) -> str:
    nav = " ".join(f'<a href="#{sid}">{_esc(name)}</a>' for sid, name in sections)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{_esc(title)}</title><style>{_CSS}</style>'
        f'</head><body><h1>{_esc(title)}</h1><p class="sub">{_esc(subtitle)}</p><nav>{nav}</nav>'
        f'{body}<p class="sub">Written by perturb-lens {version.__version__} on {stamp}.</p>'
        f"<script>{_JS}</script></body></html>\n"
    )


def _run_facts(view: RunReader) -> list[tuple[str, Any]]:
    m, c, man = view.meta, view.config, view.manifest
    lengths = m.get("lengths") or []
    data = c.get("data", {})
    rows = sum(int(s.get("rows", 0)) for s in man.get("shards", {}).values())
    return [
        ("experiment", view.experiment),
        ("model", f"{m.get('model')} ({m.get('architecture', '?')}, {m.get('model_source', '?')})"),
        ("frame / dtype", f"{m.get('frame')} / {m.get('dtype')}"),
        ("hook → read", f"{m.get('hook')} → {m.get('read')}"),
        ("scope", m.get("scope")),
        ("directions", ", ".join(str(d) for d in _direction_names(c))),
        (
            "lengths",
            f"{len(lengths)} from {min(lengths, default=0):.4g} to {max(lengths, default=0):.4g}"
            + (" (relative to the median norm)" if c.get("relative_lengths") else ""),
        ),
        ("median activation norm", f"{m.get('median_norm', float('nan')):.4g}"),
        ("data", f"{data.get('source')}: {m.get('n_seqs')} × {m.get('seq_len')} tokens"),
        ("statistics fit", _fit_text(view)),
        (
            "averaging",
            f"BOS {'in' if m.get('include_bos', True) else 'out'}, last position "
            f"{'dropped' if m.get('drop_last_position', True) else 'kept'}",
        ),
        ("metrics", ", ".join(view.metrics)),
        ("rows / shards", f"{rows:,} / {len(man.get('shards', {}))}"),
        ("seed / config hash", f"{m.get('seed')} / {man.get('config_hash')}"),
        ("created → finished", f"{man.get('created')} → {man.get('finished', 'not finished')}"),
        (
            "versions",
            f"perturb-lens {m.get('perturb_lens_version')}, torch {m.get('torch_version')}",
        ),
    ]


def _fit_text(view: RunReader) -> str:
    fit = stats_fit(view.run_dir, view.manifest)
    return "unknown" if fit is None else f"{fit[0]:,} samples ({fit[0] / fit[1]:.3g} × d_model)"


def _fit_banner(view: RunReader) -> str:
    """A warning box when the statistics were fitted on fewer than 10 x d_model samples."""
    fit = stats_fit(view.run_dir, view.manifest)
    warning = fit_size_warning(*fit) if fit is not None else None
    return "" if warning is None else f'<p class="warning"><b>Warning:</b> {_esc(warning)}</p>'


def _direction_names(config: dict) -> list[str]:
    names = []
    for d in config.get("directions", []):
        names.append(d if isinstance(d, str) else d.get("label") or d.get("name"))
    return names


def _length_columns(table: pd.DataFrame) -> pd.DataFrame:
    """``kl@17.5721`` -> ``α = 17.6`` (the metric is in the table's heading)."""
    return table.rename(columns=lambda c: f"α = {float(c.split('@')[1]):.3g}")


def _tables(view: RunReader) -> str:
    parts = []
    for metric in view.metrics:
        table = _length_columns(view.summary(metric))
        parts.append(f"<h3>Mean {_esc(metric)} by length</h3>{_table(table)}")
        threshold = metric_threshold(metric)
        if threshold is not None:
            thr = view.threshold_summary(metric, threshold)
            parts.append(
                f"<h3>Length at which {_esc(metric)} first exceeds {threshold:g}</h3>"
                f"{_table(thr, index=False)}"
            )
    return "".join(parts)


def _verdicts(view: RunReader) -> str:
    """The published claims that apply to the run, per metric (paired 95% CIs, sequences
    resampled), with their notes; or a line saying why there are none."""
    if not judged(view.experiment):
        return f"<p>Not applicable: a {_esc(view.experiment)} run has no directions to compare.</p>"
    parts = []
    for metric in [m for m in ("kl", "l2") if m in view.metrics]:
        table = verdicts(view.run_dir, metric=metric)
        if len(table):
            notes = "".join(f"<li>{_esc(n)}</li>" for n in verdict_notes(table))
            rows = pd.DataFrame(verdict_rows(table))
            parts.append(f"<h3>{_esc(metric)}</h3>{_table(rows, index=False)}<ul>{notes}</ul>")
    return "".join(parts) or "<p>No published claim applies to this run's directions.</p>"


def _data_links(view: RunReader, out_dir: Path) -> str:
    items = [
        f'<li><a href="{_esc(_rel(view.run_dir / MANIFEST, out_dir))}">{MANIFEST}</a>'
        " (config, meta, shard checksums)</li>"
    ]
    for _, entry in sorted(view.manifest.get("shards", {}).items()):
        href = _rel(view.run_dir / entry["file"], out_dir)
        items.append(
            f'<li><a href="{_esc(href)}">{_esc(entry["file"])}</a> ({entry["rows"]:,} rows)</li>'
        )
    for extra in sorted(view.run_dir.glob("*.safetensors")) + sorted(view.run_dir.glob("*.pt")):
        items.append(f'<li><a href="{_esc(_rel(extra, out_dir))}">{_esc(extra.name)}</a></li>')
    return f"<ul>{''.join(items)}</ul>"


def run_view(run_dir: str | Path) -> RunReader:
    """The run at ``run_dir``, refused (saying what to do) when it has no finished shard."""
    view = RunReader(run_dir)
    if not view.manifest["shards"]:
        raise ValueError(
            f"{view.run_dir} has no finished shard yet, so there is nothing to plot: finish it "
            f"with `perturb-lens run CONFIG --out {view.run_dir} --resume`, then report again."
        )
    return view


def _figures_html(
    plots: Sequence[Plot], out_dir: Path, formats: Sequence[str], log_y: bool = False
) -> str:
    render_plots(plots, formats, log_y=log_y)
    try:
        files = save_plots(plots, out_dir / FIGURES, formats)
    except PermissionError as e:
        raise PermissionError(
            e.errno,
            f"cannot write the figures into {out_dir / FIGURES} ({e.strerror or e}): pass --out a "
            "folder or .html file you can write",
        ) from e
    return "".join(_figure(p, files[p.name], out_dir, log_y) for p in plots)


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    formats: Iterable[str] = DEFAULT_FORMATS,
    *,
    log_y: bool = False,
) -> Path:
    """Write ``report.html`` (figures, tables, config, data links) and ``figures/`` for a run.

    ``out``: an HTML file or a folder (default: the run directory). Figures are saved as
    ``figures/{name}.{fmt}`` for each of ``formats`` (default SVG; ``("png", "svg")`` adds PNG at
    the cost of a second render) with the plotted numbers as ``{name}.csv``; the page itself is
    self-contained. ``log_y``: the curve figures also get a log-y view (a button; one more render
    each, about a third of the report's time). Returns the path of the HTML file.
    """
    formats = check_formats(formats)
    view = run_view(run_dir)
    out_file = _out_file(out, view.run_dir, REPORT)
    out_dir = out_file.parent
    plots = figures_for(view)
    title = f"perturb-lens report: {view.config.get('name', view.run_dir.name)}"
    subtitle = (
        f"{view.experiment} · {view.meta.get('model')} · {view.meta.get('hook')} · "
        f"{view.meta.get('scope')}" + ("" if view.manifest.get("complete") else " · INCOMPLETE")
    )
    config = json.dumps(view.config, indent=2)
    body = (
        f"{_toggles((_direction_names(view.config), None), *((p.series, None) for p in plots))}"
        f'<h2 id="run">Run</h2>{_fit_banner(view)}{_facts(_run_facts(view))}'
        f'<h2 id="figures">Figures</h2>{_figures_html(plots, out_dir, formats, log_y)}'
        f'<h2 id="tables">Summary tables</h2>{_tables(view)}'
        f'<h2 id="tokens">Most sensitive tokens</h2>{tokens_section(view)}'
        f'<h2 id="verdicts">Verdicts</h2>{_verdicts(view)}'
        f'<h2 id="config">Config</h2><details><summary>config (validated, hash '
        f"{_esc(view.manifest.get('config_hash'))})</summary><pre>{_esc(config)}</pre></details>"
        f'<h2 id="data">Data</h2>{_data_links(view, out_dir)}'
    )
    sections = [
        ("run", "Run"),
        ("figures", "Figures"),
        ("tables", "Tables"),
        ("tokens", "Tokens"),
        ("verdicts", "Verdicts"),
        ("config", "Config"),
        ("data", "Data"),
    ]
    _write_page(out_file, _page(title, subtitle, body, sections))
    for p in plots:
        p.figure.clear()
    return out_file


def _out_file(out: str | Path | None, default_dir: Path, name: str) -> Path:
    """``out`` as an .html file path (a folder gets ``name`` inside), checked before any work:
    an existing file that is not a page, or a folder that cannot be written, is refused."""
    path = Path(out) if out is not None else default_dir
    if path.suffix.lower() not in (".html", ".htm"):
        if path.exists() and not path.is_dir():
            raise FileExistsError(
                f"--out {path} is an existing file, not a folder: pass a folder, or an .html file "
                "path for the page."
            )
        path = path / name
    if path.is_dir():
        raise IsADirectoryError(f"--out {path} is a folder: pass another .html file name.")
    folder = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(
            errno.EACCES,
            f"cannot write the page into {path.parent} ({folder} is not a writable folder): pass "
            "--out a folder or .html file you can write",
        )
    return path


def _write_page(out_file: Path, page: str) -> None:
    """The HTML page, atomically (its figures are already in place)."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    data = page.encode("utf-8")
    atomic_write(out_file, lambda f: f.write(data))


def run_labels(views: Sequence[RunReader]) -> list[str]:
    """Short distinct labels: an SAE suite's run names; else the config values that differ
    between runs (e.g. the hook) when one or two keys differ; else the directories' names."""
    names = [v.run_dir.name for v in views]
    parents = {v.run_dir.resolve().parent for v in views}
    if (
        len(parents) == 1
        and (parents.pop() / "suite.json").is_file()
        and len(set(names)) == len(names)
    ):
        return names  # the runs of an SAE suite: its labels (L03, local-L0=30, ...)
    keys = sorted(
        {k for v in views[1:] for k, _, _ in diff_configs(views[0].config, v.config)} - {"name"}
    )
    if 1 <= len(keys) <= 2:
        labels = [", ".join(str(_lookup(v.config, k)) for k in keys) for v in views]
        if len(set(labels)) == len(labels):
            return labels
    if len(set(names)) == len(names):
        return names
    return [f"{i}: {v.run_dir}" for i, v in enumerate(views)]


def _lookup(config: dict, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def compare_plots(views: Sequence[RunReader], metric: str = "kl") -> list[Plot]:
    """Figures overlaying runs: all curves (colour = direction, line style = run), one panel per
    direction (colour = run), bars per run at three lengths (per-layer / per-SAE bars), and for
    stable-region runs the sharpness quartiles per run (model sizes, checkpoints)."""
    labels = [v.label for v in views]
    palette = run_palette(labels)
    cv = pd.concat([v.curves(metric).assign(run=v.label) for v in views], ignore_index=True)
    first = views[0]
    xlabel, ylabel = length_label(first), metric_label(metric, first)
    overlay = line_panels(
        {f"mean {metric}, all runs": cv},
        linestyle_by="run",
        bands=(),
        xlabel=xlabel,
        ylabel=ylabel,
        title=f"Compare {len(views)} runs: mean {metric}",
        panel_size=(8.0, 5.0),
    )
    dirs = list(dict.fromkeys(cv["direction"].astype(str)))
    by_dir = line_panels(
        {d: cv[cv["direction"] == d] for d in dirs},
        series="run",
        palette=palette,
        xlabel=xlabel,
        ylabel=ylabel,
        title=f"Mean {metric} per direction, one colour per run",
        ncols=3,
        panel_size=(3.9, 3.0),
    )
    wanted = bar_lengths(first)
    parts = []
    for v in views:
        b = v.bars(metric, wanted)
        nearest: dict[float, float] = {}  # this run's grid length -> the first length it stands for
        for w in wanted:
            nearest.setdefault(pick_lengths(v.lengths_frame, [w])[0], w)
        parts.append(b.assign(run=v.label, requested=b["length"].map(nearest)))
    bars = pd.concat(parts, ignore_index=True)
    bar_fig = bar_panels(
        bars,
        x="run",
        hue="direction",
        panel="requested",
        ylabel=ylabel,
        title=f"Mean {metric} per run",
    )
    at = ", ".join(f"{x:.3g}" for x in sorted(bars["requested"].unique()))
    plots = [
        Plot(
            f"compare_{metric}",
            f"All runs · {metric}",
            "Mean curves of every run: colour = direction, line style = run.",
            overlay,
            cv,
            True,
            dirs,
        ),
        Plot(
            f"compare_{metric}_by_direction",
            f"Per direction · {metric}",
            "One panel per direction, one colour per run; shaded: 95 % bootstrap interval.",
            by_dir,
            cv,
            True,
            labels,
        ),
        Plot(
            f"compare_{metric}_bars",
            f"Per-run bars · {metric}",
            f"Mean per run and direction at α = {at} (figures 7-8: 20, 40, 61; each run's "
            "nearest grid length); figures 3-4 when the runs are SAEs or layers. Whiskers: 95 % "
            "bootstrap interval.",
            bar_fig,
            bars,
            False,
            dirs,
        ),
    ]
    if all(len(v.grid) == 1 for v in views):  # substitution runs: no curves
        plots = plots[2:]
    if all({"size", "kl"} <= set(v.columns) and sae_directions(v) for v in views):
        points = [size_kl_points(v, {v.label: sae_directions(v)}, "run") for v in views]
        plots.append(size_kl_plot(pd.concat(points), f"{len(views)} runs", palette))
    if all("sharpness" in v.curve_stats for v in views):  # stable regions: across models
        stats = pd.concat([interpolation_stats(v)[0].assign(run=v.label) for v in views])
        title = "Sharpness per run (e.g. model size or training checkpoint)"
        plots.append(sharpness_plot(stats, by="run", name="compare_sharpness", title=title))
    return plots


def write_comparison(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    metric: str = "kl",
    formats: Iterable[str] = DEFAULT_FORMATS,
    log_y: bool = False,
) -> Path:
    """Write ``compare.html`` (and ``figures/``) overlaying several runs' ``metric``.

    Runs are labelled by the config keys that differ between them (e.g. the hook, for per-layer
    comparisons); ``log_y``: curve figures also get a log-y view. Returns the path of the HTML
    file.
    """
    formats = check_formats(formats)
    if len(run_dirs) < 1:
        raise ValueError("compare needs at least one run directory")
    views = [run_view(r) for r in run_dirs]
    for view, label in zip(views, run_labels(views), strict=True):
        view.label = label
    missing = [str(v.run_dir) for v in views if metric not in v.columns]
    if missing:
        raise ValueError(f"metric {metric!r} is not in the results of {', '.join(missing)}")
    out_file = _out_file(out, Path("."), COMPARE)
    out_dir = out_file.parent
    plots = compare_plots(views, metric)
    palette = run_palette([v.label for v in views])
    runs = pd.DataFrame(
        {
            "run": [v.label for v in views],
            "experiment": [v.experiment for v in views],
            "model": [v.meta.get("model") for v in views],
            "hook": [v.meta.get("hook") for v in views],
            "scope": [v.meta.get("scope") for v in views],
            "tokens": [f"{v.meta.get('n_seqs')} × {v.meta.get('seq_len')}" for v in views],
        }
    )
    links = "".join(
        f'<li><b>{_esc(v.label)}</b>: <a href="{_esc(_rel(v.run_dir / MANIFEST, out_dir))}">'
        f"manifest</a>"
        + (
            f' · <a href="{_esc(_rel(v.run_dir / REPORT, out_dir))}">report</a>'
            if (v.run_dir / REPORT).exists()
            else ""
        )
        + "</li>"
        for v in views
    )
    keys = sorted({k for v in views[1:] for k, _, _ in diff_configs(views[0].config, v.config)})
    diff_table = (
        _table(pd.DataFrame({v.label: [_lookup(v.config, k) for k in keys] for v in views}, keys))
        if keys
        else "<p>The configs are identical.</p>"
    )
    table = (
        pd.concat([_length_columns(v.summary(metric)).assign(run=v.label) for v in views])
        .reset_index()
        .set_index(["run", "direction"])
    )
    body = (
        f"{_toggles((list(palette), palette), *((p.series, None) for p in plots))}"
        f'<h2 id="runs">Runs</h2>'
        f"{_table(runs, index=False)}<ul>{links}</ul><h3>Config differences</h3>{diff_table}"
        f'<h2 id="figures">Figures</h2>{_figures_html(plots, out_dir, formats, log_y)}'
        f'<h2 id="tables">Summary table</h2>{_table(table)}'
    )
    sections = [("runs", "Runs"), ("figures", "Figures"), ("tables", "Table")]
    title = f"perturb-lens comparison: {len(views)} runs, {metric}"
    _write_page(out_file, _page(title, " · ".join(v.label for v in views), body, sections))
    for p in plots:
        p.figure.clear()
    return out_file
