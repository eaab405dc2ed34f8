"""``perturb-lens replication RUNS_ROOT``: evaluate every published claim on its runs and write
``REPLICATION.md`` (registered in :mod:`perturb_lens.cli.app`)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from perturb_lens.cli.errors import checked_out, user_errors
from perturb_lens.cli.options import console
from perturb_lens.replication.layout import layout_text

HELP = (
    "Judge every published claim (Lee & Heimersheim, Gurnee, Braun et al., Giglemiani et al., "
    "Heimersheim, Janiak et al.) on the runs under RUNS_ROOT and write a generated markdown "
    "table: claim, paper's number, ours, sample, verdict (replicated / not replicated / "
    "inconclusive) with its CI or test, and the command of each run. A missing run gives a "
    "'not run' row with its command.\n\nRuns-root layout (one folder per run; run each command "
    "from the repository root):\n\n" + "\b\n" + layout_text()
)
SHORT_HELP = "Write REPLICATION.md: every published claim judged on its runs under RUNS_ROOT."


def replication(
    runs_root: Annotated[str, typer.Argument(help="Folder holding the runs (layout below).")],
    out: Annotated[
        str, typer.Option("--out", "-o", help="Markdown file to write.")
    ] = "REPLICATION.md",
) -> None:
    from perturb_lens.replication import write_replication

    checked_out(out)
    with user_errors():
        path, results = write_replication(runs_root, out)
    table = Table(title=f"Replication ({runs_root})")
    for col in ("claim", "verdict", "ours"):
        table.add_column(col, overflow="fold")
    for r in results:
        table.add_row(r.claim.claim_id, r.verdict, r.ours)
    console().print(table)
    console().print(f"Written: [bold]{path}[/bold]")
