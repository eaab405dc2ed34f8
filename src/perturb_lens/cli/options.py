"""Command-line options shared by several ``perturb-lens`` commands (one definition each)."""

from __future__ import annotations

import os
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


def _silence_library_bars(quiet: bool) -> bool:
    """``--quiet`` also silences the libraries' own bars (transformers' "Loading weights", the
    hub's downloads): both read ``HF_HUB_DISABLE_PROGRESS_BARS`` when transformers is imported,
    which the commands do lazily, after the options are parsed."""
    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:  # imported already (in-process callers, tests)
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    return quiet


Quiet = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="No progress bars.", callback=_silence_library_bars),
]
OutFolder = Annotated[
    str | None, typer.Option("--out", "-o", help="Output folder (default runs/NAME).")
]
OnlySAE = Annotated[
    list[str] | None,
    typer.Option("--only", help="Only this SAE (its name or label in CONFIG; repeatable)."),
]
