"""Command-line options shared by several ``perturb-lens`` commands (one definition each)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

# Tables written to a file or a pipe (logs, CI) are not cut to 80 columns, rich's default there.
PIPE_WIDTH = 200


def console(*, stderr: bool = False) -> Console:
    """A rich console: the terminal's width, or ``PIPE_WIDTH`` columns when not a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else PIPE_WIDTH)


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
OutFolder = Annotated[
    str | None, typer.Option("--out", "-o", help="Output folder (default runs/NAME).")
]
OnlySAE = Annotated[
    list[str] | None,
    typer.Option("--only", help="Only this SAE (its name or label in CONFIG; repeatable)."),
]
