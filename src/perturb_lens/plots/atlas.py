"""The layer-atlas figure (``perturb-lens compare --atlas``): mean KL of each baseline direction
over isotropic's against relative depth, the models side by side (one column per model, one row
per length relative to the layer's median norm), with the 95% CIs over sequences as bands; its
numbers (:func:`~perturb_lens.analysis.atlas.atlas_table`) are saved beside it as CSV."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from perturb_lens.analysis.atlas import REFERENCE, atlas_table
from perturb_lens.plots.figures import line_panels
from perturb_lens.plots.registry import Plot, check_formats, save_plots

ATLAS = "atlas"


def atlas_plot(table: pd.DataFrame, *, reference: str = REFERENCE) -> Plot:
    """The atlas figure of an :func:`~perturb_lens.analysis.atlas.atlas_table`."""
    models = list(dict.fromkeys(table["model"]))
    lengths = sorted(table["relative_length"].unique())
    panels = {}
    for rel in lengths:
        for m in models:
            part = table[(table["model"] == m) & (table["relative_length"] == rel)]
            spec = part.iloc[0]
            title = f"{m} (d {spec['d_model']}, {spec['n_layers']} layers): {rel:g} x median norm"
            panels[title] = part
    fig = line_panels(
        panels,
        x="depth",
        y="ratio",
        series="direction",
        xlabel="relative depth (layer / n_layers, resid_pre)",
        ylabel=f"mean KL / mean KL of {reference}",
        ncols=len(models),
        sharey=True,
    )
    for ax in fig.axes:
        ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
        ax.set_xlim(-0.02, 1.0)
    per_dim = (table["stats_samples"] / table["d_model"]).groupby(table["model"], sort=False).min()
    caption = (
        f"Mean KL of each baseline direction divided by that of {reference} at the same length, "
        "at the resid_pre of every third layer (first and last included), lengths relative to "
        "each layer's median activation norm; bands: 95% bootstrap CIs over sequences (paired, "
        "ratio of the published token means). Statistics fitted on at least "
        + ", ".join(f"{v:.3g} x d_model ({m})" for m, v in per_dim.items())
        + " samples."
    )
    return Plot(ATLAS, "Layer atlas", caption, fig, table, True, list(table["direction"].unique()))


def write_atlas(
    paths: Iterable[str | Path],
    out: str | Path,
    *,
    formats: Iterable[str] = ("svg",),
    reference: str = REFERENCE,
) -> dict[str, Path]:
    """Write the atlas figure of the atlas folders ``paths`` (one per model) as
    ``out/atlas.{fmt}`` and its numbers as ``out/atlas.csv``; returns the files by format."""
    formats = check_formats(formats)
    table = atlas_table(paths, reference=reference)
    plot = atlas_plot(table, reference=reference)
    return save_plots([plot], out, formats)[ATLAS]
