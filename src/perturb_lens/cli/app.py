"""The ``perturb-lens`` command line: a thin layer over the Python API."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from perturb_lens.cli.atlas import SHORT_HELP as ATLAS_HELP
from perturb_lens.cli.atlas import atlas
from perturb_lens.cli.errors import checked_out, set_verbose, user_errors
from perturb_lens.cli.options import Quiet, console
from perturb_lens.cli.presets import presets
from perturb_lens.cli.replication import HELP, SHORT_HELP, replication
from perturb_lens.cli.sae import sae_app

app = typer.Typer(
    name="perturb-lens",
    help="Activation-perturbation (sensitive directions) experiments on transformer LMs.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(sae_app)


def _print_version(value: bool) -> None:
    if value:
        from perturb_lens.common.version import __version__

        typer.echo(f"perturb-lens {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log progress to stderr.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Activation-perturbation (sensitive directions) experiments on transformer LMs."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    set_verbose(verbose)


def model_info(lens: Any) -> dict[str, Any]:
    """What ``info`` shows: the model's spec, frame, hook points and origin."""
    from perturb_lens.common.hooks import HOOK_KINDS
    from perturb_lens.models.registry import get_family

    spec = lens.spec
    return {
        **asdict(spec),
        "path": get_family(spec.family).path,
        "frame": lens.frame,
        "hooks": {
            "kinds": list(HOOK_KINDS),
            "layers": [0, spec.n_layers - 1],
            "count": len(lens.hook_names()),
            "default_read": lens.default_read,
        },
        "source": lens.source,
    }


@app.command()
def info(
    model: Annotated[
        str, typer.Argument(help="smollm2-135m, a .gguf file, an HF folder or hub id.")
    ],
    frame: Annotated[
        str | None, typer.Option(help="centered | raw (default: the family's default).")
    ] = None,
    native: Annotated[
        bool, typer.Option("--native/--generic", help="Native fast path or generic hooks.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Load MODEL and describe it: architecture, shapes, hook points, frame and origin."""
    from perturb_lens.models.load import load_model

    with user_errors():  # ModelLoadError and bad frames: the message says what to do
        lens = load_model(model, frame=frame, device="cpu", native=native)
    facts = model_info(lens)
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    hooks = facts["hooks"]
    n = facts["n_layers"]
    rows = [
        ("architecture", facts["architecture"]),
        ("family / path", f"{facts['family']} / {facts['path']}"),
        ("parameters", f"{facts['n_params']:,}"),
        ("layers", str(n)),
        ("d_model", str(facts["d_model"])),
        (
            "heads / kv heads",
            f"{facts['n_heads']} / {facts['n_kv_heads']} (d_head {facts['d_head']})",
        ),
        ("d_mlp", str(facts["d_mlp"])),
        ("vocab", f"{facts['vocab_size']:,}"),
        ("context", f"{facts['n_ctx']:,}"),
        ("norm", facts["norm"]),
        ("frame", facts["frame"]),
        (
            "hook points",
            f"blocks.{{0..{n - 1}}}.{{{', '.join(hooks['kinds'])}}} ({hooks['count']})",
        ),
        ("default read", hooks["default_read"]),
        ("source", facts["source"]),
    ]
    table = Table(title=f"perturb-lens info: {model}", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    console().print(table)


@app.command(context_settings={"allow_extra_args": False})
def run(
    config: Annotated[
        str,
        typer.Argument(
            help="A preset name (perturb-lens presets) or a config file (.yaml/.yml/.toml)."
        ),
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key=value overrides, e.g. data.n_seqs=64 scope=single-position."),
    ] = None,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Run directory (default runs/NAME-HASH).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run in --out.")
    ] = False,
    quiet: Quiet = False,
    executor: Annotated[
        str,
        typer.Option(
            help="Where shards are computed: local | ray (pip install 'perturb-lens\\[ray]')."
        ),
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster to join (auto, host:6379, ...); default: a local one."),
    ] = None,
    allow_cpu_change: Annotated[
        bool,
        typer.Option(
            "--allow-cpu-change",
            help="Resume (or run Ray workers) on another CPU kind than the run's, accepting "
            "shards that may differ in the last bits.",
        ),
    ] = False,
) -> None:
    """Run (or resume) an experiment; write Parquet shards + manifest; print a summary table."""
    from perturb_lens.analysis.verdicts import judged
    from perturb_lens.config.schema import load_config
    from perturb_lens.results.summary import nonfinite_rows
    from perturb_lens.workflows.experiment import run_experiment

    out = checked_out(out)
    with user_errors():
        cfg = load_config(config, overrides or [])
        run_dir = run_experiment(
            cfg,
            out,
            resume=resume,
            progress=not quiet,
            executor=executor,
            address=address,
            allow_cpu_change=allow_cpu_change,
        )
        tables = run_dir.tables()
    for title, table in tables.items():
        if all("@" in str(c) for c in table.columns):  # length@L -> L
            table.columns = [f"{float(str(c).split('@')[1]):.3g}" for c in table.columns]
        _print_frame(table, title)
    _print_fit(run_dir)
    if judged(cfg.experiment):
        _print_verdicts(run_dir, [m for m in ("kl", "l2") if m in cfg.metrics][:1] or ["kl"])
    if n_bad := nonfinite_rows(run_dir):
        console().print(
            f"Non-finite rows (NaN/inf): {n_bad}, flagged in column 'nonfinite' and left out of "
            "the means above"
        )
    console().print(f"Results: [bold]{run_dir}[/bold]  (in Python: perturb_lens.open_run(path))")


def _print_verdicts(run_dir: Any, metrics: list[str], claims: list[str] | None = None) -> None:
    """The verdict table of each metric (nothing when no claim applies to the run's directions)."""
    from perturb_lens.analysis.verdicts import verdict_table, verdicts

    for metric in metrics:
        with user_errors():
            table = verdicts(run_dir, claims or None, metric=metric)
        if len(table):
            console().print(verdict_table(table))
        elif claims is None:
            console().print(f"Verdicts ({metric}): no published claim applies to these directions")


def _print_fit(run_dir: Path) -> None:
    """The statistics' fit size; below 10 x d_model samples, a loud warning saying the fix."""
    from perturb_lens.analysis.verdicts import stats_fit
    from perturb_lens.statistics.fit_size import fit_size_warning

    if (fit := stats_fit(run_dir)) is None:
        return
    n, d = fit
    console().print(f"Statistics fitted on {n:,} samples ({n / d:.3g} x d_model = {d})")
    if warning := fit_size_warning(n, d):
        console(stderr=True).print(f"[bold red]WARNING[/bold red]: {warning}")


def _print_frame(df: Any, title: str) -> None:
    """A pandas frame as a rich table (index as the first column)."""
    table = Table(title=title)
    table.add_column("direction", style="bold")
    for col in df.columns:
        table.add_column(str(col), justify="right")
    for idx, row in df.iterrows():
        table.add_row(str(idx), *(f"{v:.4g}" for v in row.to_numpy()))
    console().print(table)


LogY = Annotated[
    bool,
    typer.Option(
        "--log-y", help="Also a log-y view of each curve figure (a button; one more render each)."
    ),
]


def _formats(value: str) -> list[str]:
    return [f.strip().lower() for f in value.split(",") if f.strip()]


@app.command()
def report(
    run_dir: Annotated[str, typer.Argument(help="Run directory (holds manifest.json).")],
    out: Annotated[
        str | None,
        typer.Option("--out", "-o", help="HTML file or folder (default: RUN_DIR/report.html)."),
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="Figure files to write beside it: svg, png or png,svg.")
    ] = "svg",
    log_y: LogY = False,
) -> None:
    """Write a self-contained HTML report of a run: figures, summary tables, config, data links."""
    from perturb_lens.plots import write_report

    out = checked_out(out)
    with user_errors():
        path = write_report(run_dir, out, formats=_formats(fmt), log_y=log_y)
    console().print(f"Report: [bold]{path}[/bold]  (figures in {path.parent / 'figures'})")


@app.command()
def compare(
    run_dirs: Annotated[list[str], typer.Argument(help="Run directories (e.g. one per layer).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder (or .html file) to write.")],
    metric: Annotated[str, typer.Option(help="Metric to overlay: kl, l2, js, ...")] = "kl",
    fmt: Annotated[
        str, typer.Option("--format", help="Figure files to write beside it: svg, png or png,svg.")
    ] = "svg",
    log_y: LogY = False,
    atlas_dirs: Annotated[
        bool,
        typer.Option(
            "--atlas",
            help="RUN_DIRS are atlas folders (perturb-lens atlas), one per model: write one "
            "figure of each baseline's mean KL over isotropic against relative depth, the models "
            "side by side, and its CSV (atlas.svg / atlas.csv in --out).",
        ),
    ] = False,
) -> None:
    """Overlay several runs (e.g. one per layer or SAE) in one HTML page with figures; with
    --atlas, draw the layer atlases of several models side by side."""
    checked_out(out)
    if atlas_dirs:
        from perturb_lens.plots.atlas import write_atlas

        with user_errors():
            files = write_atlas(run_dirs, out, formats=_formats(fmt))
        console().print("Atlas: " + ", ".join(f"[bold]{p}[/bold]" for p in files.values()))
        return
    from perturb_lens.plots import write_comparison

    with user_errors():
        path = write_comparison(run_dirs, out, metric=metric, formats=_formats(fmt), log_y=log_y)
    console().print(f"Comparison: [bold]{path}[/bold]")


@app.command(name="verdicts")
def verdicts_command(
    run_dir: Annotated[str, typer.Argument(help="Run directory, or a suite folder of runs.")],
    metric: Annotated[
        list[str] | None, typer.Option("--metric", "-m", help="Metric(s) to test (default kl).")
    ] = None,
    claim: Annotated[
        list[str] | None,
        typer.Option(
            "--claim", "-c", help='A claim to test instead, e.g. "real-mixture > isotropic".'
        ),
    ] = None,
) -> None:
    """Test the published claims that apply to a run (paired 95% CIs, sequences resampled):
    per claim the lengths where it holds, is reversed or cannot be told, and one verdict word."""
    _print_verdicts(run_dir, metric or ["kl"], claim)


app.command(help=HELP, short_help=SHORT_HELP)(replication)
app.command()(presets)
app.command(short_help=ATLAS_HELP)(atlas)

if __name__ == "__main__":
    app()
