"""Figures 5-6 of Lee & Heimersheim for an SAE suite (``perturb-lens sae run``): a metric against
the length along each SAE's error direction, one panel per SAE type, each SAE coloured by its L0,
against the epsilon-baselines of the same tokens (dashed grey).

The suite folder holds one run per SAE (``<out>/<label>/``), ``suite.json`` (the suite config) and
``saes.json`` (per SAE: ``label``, ``type``, ``l0``, written by ``run_suite``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from perturb_lens.plots.figures import _grid, _tag
from perturb_lens.plots.registry import Plot, RunReader
from perturb_lens.plots.sets import length_label, metric_label, sae_directions
from perturb_lens.plots.style import style

SAES_FILE = "saes.json"  # written by saes.suite.run_suite
BASELINE_GREYS = ("#555555", "#999999", "#bbbbbb", "#333333")
CMAP = "viridis"


def suite_views(folder: str | Path) -> list[tuple[RunReader, dict]]:
    """Each finished run of a suite folder with its SAE's record (``type``, ``l0``; label order
    of ``saes.json``, then any other run)."""
    folder = Path(folder)
    path = folder / SAES_FILE
    records = json.loads(path.read_text()) if path.is_file() else []
    info = {r["label"]: r for r in records}
    runs = [p for p in sorted(folder.iterdir()) if (p / "manifest.json").is_file()]
    order = {label: i for i, label in enumerate(info)}
    runs.sort(key=lambda p: order.get(p.name, len(order)))
    return [(RunReader(p, p.name), info.get(p.name, {"label": p.name})) for p in runs]


def extrapolation_curves(folder: str | Path, metric: str = "kl") -> pd.DataFrame:
    """``analysis.curves`` of every run of the suite (mean, 95 % interval per direction and
    length) with ``sae``, ``type``, ``l0`` and ``kind`` (``sae``: its SAE direction, or
    ``baseline``)."""
    frames = []
    for view, rec in suite_views(folder):
        if metric not in view.columns:
            continue
        cv = view.curves(metric)
        own = set(sae_directions(view))
        kind = np.where(cv["direction"].astype(str).isin(own), "sae", "baseline")
        frames.append(
            cv.assign(
                direction=cv["direction"].astype(str),
                sae=view.label,
                type=str(rec.get("type") or view.label),
                l0=float(rec.get("l0", np.nan)),
                kind=kind,
            )
        )
    if not frames:
        raise ValueError(f"No finished runs with {metric!r} under {folder}.")
    return pd.concat(frames, ignore_index=True)


def l0_colors(data: pd.DataFrame) -> tuple[dict[str, tuple], Normalize | None]:
    """The colour of each SAE by its L0 (log scale over the suite's L0s; no L0: by order)."""
    saes = data.drop_duplicates("sae")[["sae", "l0"]]
    cmap = colormaps[CMAP]
    l0 = saes["l0"].to_numpy(float)
    if np.isfinite(l0).all() and (l0 > 0).all() and l0.size:
        norm: Normalize = (
            LogNorm(l0.min(), l0.max()) if l0.min() < l0.max() else Normalize(0, 2 * l0.min())
        )
        return {s: cmap(norm(v)) for s, v in zip(saes["sae"], l0, strict=True)}, norm
    order = np.linspace(0.0, 1.0, len(saes)) if len(saes) > 1 else [0.5]
    return {s: cmap(v) for s, v in zip(saes["sae"], order, strict=True)}, None


def extrapolation_panels(data: pd.DataFrame, *, xlabel: str, ylabel: str, title: str) -> Figure:
    """One panel per SAE type: each SAE's error-direction mean (coloured by L0) and the
    baselines of that panel's first SAE run (dashed grey; the same tokens and seeds)."""
    colors, norm = l0_colors(data)
    types = list(dict.fromkeys(data["type"]))
    with style():
        fig, axes = _grid(len(types), 3, (4.6, 3.5), title)
        for ax, kind in zip(axes, types, strict=True):
            d = data[data["type"] == kind]
            for sae, s in d[d["kind"] == "sae"].groupby("sae", sort=False):
                for direction, c in s.groupby("direction", sort=False):
                    c = c.sort_values("length")
                    l0 = c["l0"].iloc[0]
                    label = f"{sae} (L0 {l0:.3g})" if np.isfinite(l0) else str(sae)
                    if s["direction"].nunique() > 1:
                        label += f" · {direction}"
                    _tag(ax.plot(c["length"], c["mean"], color=colors[sae], label=label), sae)
            first = d["sae"].iloc[0]
            base = d[(d["kind"] == "baseline") & (d["sae"] == first)]
            for i, (direction, c) in enumerate(base.groupby("direction", sort=False)):
                c = c.sort_values("length")
                grey = BASELINE_GREYS[i % len(BASELINE_GREYS)]
                line = ax.plot(c["length"], c["mean"], color=grey, ls="--", label=direction)
                _tag(line, direction)
            ax.set_title(str(kind))
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.legend(loc="upper left", fontsize="small")
        if norm is not None:
            fig.colorbar(ScalarMappable(norm, colormaps[CMAP]), ax=axes, label="L0")
    return fig


def suite_figures(folder: str | Path, metrics: tuple[str, ...] = ("kl", "l2")) -> list[Plot]:
    """Figures 5-6 of a suite folder, one per metric its runs have (none for a suite of
    one-length runs: SAE substitution)."""
    views = suite_views(folder)
    if not views:
        raise ValueError(f"No finished runs under {folder}.")
    first = views[0][0]
    if len(first.grid) < 2:  # a substitution suite: figures 3-4, not 5-6
        return []
    out = []
    for metric in [m for m in metrics if m in first.columns]:
        data = extrapolation_curves(folder, metric)
        figure = extrapolation_panels(
            data,
            xlabel=length_label(first),
            ylabel=metric_label(metric, first),
            title=f"SAE error extrapolation ({metric}): {first.meta.get('model', '?')}",
        )
        caption = (
            f"Lee & Heimersheim figures 5-6: mean {metric} over tokens against the length along "
            "each SAE's error direction, one panel per SAE type, colour by L0 (measured on the "
            "run's tokens); dashed grey: the epsilon-baselines (the panel's first SAE run)."
        )
        out.append(Plot(f"fig5_6_{metric}", f"Figures 5-6 · {metric}", caption, figure, data, True))
    return out
