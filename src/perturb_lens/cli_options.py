"""Command-line options shared by several ``perturb-lens`` commands (one definition each)."""

from __future__ import annotations

from typing import Annotated

import typer

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
OutFolder = Annotated[
    str | None, typer.Option("--out", "-o", help="Output folder (default runs/NAME).")
]
OnlySAE = Annotated[
    list[str] | None,
    typer.Option("--only", help="Only this SAE (its name or label in CONFIG; repeatable)."),
]
