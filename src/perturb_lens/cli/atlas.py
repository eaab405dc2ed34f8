"""``perturb-lens atlas MODEL --out DIR``: the layer atlas of one model (registered in
:mod:`perturb_lens.cli.app`); ``perturb-lens compare --atlas DIR...`` draws several side by side."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from perturb_lens.cli.errors import checked_out, user_errors
from perturb_lens.cli.options import Quiet, console

if TYPE_CHECKING:
    import pandas as pd

SHORT_HELP = "Layer atlas of MODEL: baselines over isotropic at every third layer."


def atlas(
    model: Annotated[
        str, typer.Argument(help="smollm2-135m, another named model, a .gguf file or HF folder.")
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Atlas folder (one run per layer).")],
    data: Annotated[
        str, typer.Option(help="Text source: file/folder, builtin:lee or HF dataset.")
    ] = "builtin:lee",
    n_seqs: Annotated[int, typer.Option(help="Sequences measured per layer.")] = 16,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence (BOS first).")] = 64,
    length: Annotated[
        list[float] | None,
        typer.Option(help="A length, times the layer's median norm (repeatable; 0.2 and 0.4)."),
    ] = None,
    every: Annotated[int, typer.Option(help="Every N-th layer (the last one too).")] = 3,
    threads: Annotated[int | None, typer.Option(help="Torch threads per shard.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted atlas in --out.")
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Run the layer atlas of MODEL: at the resid_pre of every third layer (first and last
    included), the mean KL of each baseline direction over isotropic's at 0.2 and 0.4 of that
    layer's median norm, 95% bootstrap CIs over sequences, statistics fitted on 20 x d_model
    samples. Writes one run per layer and atlas.csv to --out; `perturb-lens compare --atlas`
    draws several models side by side."""
    from perturb_lens.analysis.atlas import RELATIVE_LENGTHS, atlas_table
    from perturb_lens.workflows.atlas import run_atlas

    checked_out(out)
    with user_errors():
        folder = run_atlas(
            model, out, source=data, n_seqs=n_seqs, seq_len=seq_len,
            lengths=tuple(length or RELATIVE_LENGTHS), every=every, threads=threads,
            resume=resume, progress=not quiet,
        )  # fmt: skip
        table = atlas_table([folder])
        table.to_csv(folder / "atlas.csv", index=False)
    print_atlas(table)
    console().print(f"Atlas: [bold]{folder}[/bold] (numbers in {folder / 'atlas.csv'})")


def print_atlas(table: pd.DataFrame) -> None:
    """Per model and relative length, one line per layer: each direction's ratio [CI]."""
    directions = list(dict.fromkeys(table["direction"]))
    for (model, rel), part in table.groupby(["model", "relative_length"], sort=False):
        out = Table(title=f"{model}: mean KL / mean KL of isotropic at {rel:g} x median norm")
        for col in ("layer", "depth", "seqs", "fit / d", *directions):
            out.add_column(col, justify="right")
        for layer, g in part.groupby("layer", sort=True):
            by = g.set_index("direction")
            first = g.iloc[0]
            cells = [
                f"{by.loc[d, 'ratio']:.3g} [{by.loc[d, 'ci_low']:.3g}, {by.loc[d, 'ci_high']:.3g}]"
                for d in directions
            ]
            fit = first["stats_samples"] / first["d_model"]
            out.add_row(
                str(layer), f"{first['depth']:.2f}", str(int(first["n_seqs"])), f"{fit:.3g}", *cells
            )
        console().print(out)
