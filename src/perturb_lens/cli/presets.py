"""``perturb-lens presets``: the experiment presets that ship inside the package."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from perturb_lens.cli.errors import user_errors
from perturb_lens.cli.options import console


def presets(
    name: Annotated[
        str | None, typer.Argument(help="A preset to print in full (its YAML), to copy and edit.")
    ] = None,
) -> None:
    """List the presets (name, experiment, description), or print one. Run one with
    `perturb-lens run NAME [model=...] [key=value ...]`; its layer (e.g. blocks.middle) and its
    lengths (relative to the median norm) adapt to the model."""
    from perturb_lens.config.preset import list_presets, preset_path

    if name is not None:
        with user_errors():
            path = preset_path(name)
        typer.echo(path.read_text(encoding="utf-8"), nl=False)
        return
    table = Table(title="perturb-lens presets (run one: perturb-lens run NAME model=...)")
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("experiment", no_wrap=True)
    table.add_column("description", overflow="fold")
    for info in list_presets():
        table.add_row(info.name, info.experiment, info.description)
    console().print(table)
