"""Loss recovered against L0 (``perturb-lens sae l0-sweep``): one panel per measure, a line for
the SAE with its frequent latents masked and one through the family trained at other L1 / k."""

from __future__ import annotations

import pandas as pd

from perturb_lens.plots.figures import line_panels
from perturb_lens.plots.registry import Plot

PANELS = {
    "loss_recovered_zero": "loss recovered (zero ablation)",
    "loss_recovered_mean": "loss recovered (mean ablation)",
    "kl": "KL(p_clean || p_SAE) (nats)",
}


def series_name(way: str, sae: str) -> str:
    """The legend entry of a row of the sweep table."""
    return f"{sae}: frequent latents masked" if way == "masked" else "family (L1 / k)"


def loss_recovered_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The sweep table in long form: ``panel``, ``series``, ``l0``, ``value`` (what is drawn)."""
    series = [series_name(w, s) for w, s in zip(table["way"], table["sae"], strict=True)]
    frames = []
    for col, title in PANELS.items():
        low, high = (
            (table[f"{col}_low"], table[f"{col}_high"])
            if f"{col}_low" in table
            else (float("nan"), float("nan"))
        )
        frame = {"panel": title, "series": series, "l0": table["l0"], "value": table[col]}
        frames.append(pd.DataFrame(frame | {"ci_low": low, "ci_high": high}))
    return pd.concat(frames, ignore_index=True)


def loss_recovered_plot(table: pd.DataFrame) -> Plot:
    """The figure of an :func:`~perturb_lens.saes.l0_sweep.l0_sweep` table."""
    data = loss_recovered_frame(table)
    panels = {title: data[data["panel"] == title] for title in PANELS.values()}
    fig = line_panels(
        panels,
        x="l0",
        y="value",
        bands=(("ci_low", "ci_high"),),  # loss recovered: 95 % CI over sequences; KL: none
        series="series",
        xlabel="L0 (latents active per token)",
        title=f"Loss recovered vs L0 at {table['hook'].iloc[0]}",
        ncols=3,
    )
    for ax in fig.axes:
        ax.legend(loc="best")  # the curves rise or fall with L0: no one corner is free
    caption = (
        "Two ways to a lower L0: masking the SAE's most frequent latents after the activation, "
        "or training at a larger L1 / smaller k. Loss recovered = (CE_ablated - CE_SAE) / "
        f"(CE_ablated - CE_clean) over {int(table['n_tokens'].iloc[0])} tokens; bands: its 95 % "
        "interval from resampling sequences."
    )
    return Plot("loss_recovered_vs_l0", "Loss recovered vs L0", caption, fig, data)
