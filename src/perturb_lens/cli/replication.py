"""``perturb-lens replication RUNS_ROOT``: evaluate every published claim on its runs and write
``REPLICATION.md`` (registered in :mod:`perturb_lens.cli.app`)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from perturb_lens.cli.errors import checked_out, user_errors
from perturb_lens.cli.options import console
from perturb_lens.replication.layout import layout_text
from perturb_lens.replication.models import MODEL_LAYERS, PRESET_MODEL

_OTHERS = [m for m in MODEL_LAYERS if m != PRESET_MODEL]
HELP = (
    "Judge every published claim (Lee & Heimersheim, Gurnee, Braun et al., Giglemiani et al., "
    "Heimersheim, Janiak et al.) on the runs under RUNS_ROOT and write a generated markdown "
    "table: claim, paper's number, and per model its verdict (replicated / not replicated / "
    "inconclusive) with our number, the sample and the CI or test. A missing run gives a "
    "'not run' cell with the command that makes it for that model; an inconclusive verdict "
    "gets the sample size that would decide it in a footnote.\n\nRuns-root layout: one folder "
    f"per model ({', '.join(MODEL_LAYERS)}), one folder per run inside it (run each command "
    f"from the repository root); {PRESET_MODEL}'s runs may also sit directly under RUNS_ROOT "
    "(the single-model layout: without any model folder the table has its column only). "
    f"{PRESET_MODEL}'s runs:\n\n" + "\b\n" + layout_text(f"RUNS_ROOT/{PRESET_MODEL}") + "\n\n"
    f"{' and '.join(_OTHERS)}: the same runs under RUNS_ROOT/<model>/, each command with "
    "model=NAME hook=blocks.K.hook_resid_pre (K = n_layers // 2) and a TopK SAE trained at that "
    "layer (the table's 'not run' cells give each command)."
)
SHORT_HELP = "Write REPLICATION.md: every published claim judged on its runs under RUNS_ROOT."


def replication(
    runs_root: Annotated[str, typer.Argument(help="Folder holding the runs (layout below).")],
    out: Annotated[
        str, typer.Option("--out", "-o", help="Markdown file to write.")
    ] = "REPLICATION.md",
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help=f"A model column (repeatable; {', '.join(MODEL_LAYERS)}). Default: all of them "
            "when RUNS_ROOT holds a model folder, else the single-model table.",
        ),
    ] = None,
) -> None:
    from perturb_lens.replication import write_replication

    checked_out(out)
    with user_errors():
        path, results = write_replication(runs_root, out, models=model or None)
    models = list(dict.fromkeys(r.model for r in results))
    table = Table(title=f"Replication ({runs_root})")
    table.add_column("claim", overflow="fold")
    if len(models) == 1 and not model:
        for col in ("verdict", "ours"):
            table.add_column(col, overflow="fold")
        for r in results:
            table.add_row(r.claim.claim_id, r.verdict, r.ours)
    else:
        for m in models:
            table.add_column(m, overflow="fold")
        ids = list(dict.fromkeys(r.claim.claim_id for r in results))
        verdict = {(r.claim.claim_id, r.model): r.verdict for r in results}
        for cid in ids:
            table.add_row(cid, *(verdict[(cid, m)] for m in models))
    console().print(table)
    console().print(f"Written: [bold]{path}[/bold]")
