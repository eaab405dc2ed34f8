"""``perturb-lens sae ...``: train SAEs, compute their statistics and loss recovered vs L0, run
SAE experiment suites."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from perturb_lens.cli.errors import checked_out, user_errors
from perturb_lens.cli.options import OnlySAE, OutFolder, Quiet, console

if TYPE_CHECKING:
    from torch import Tensor

    from perturb_lens.models.base import LensModel
    from perturb_lens.saes.sae import SAE

sae_app = typer.Typer(
    name="sae",
    help="Sparse autoencoders: train, statistics, loss recovered vs L0, SAE experiment suites.",
    no_args_is_help=True,
)


@sae_app.command()
def train(
    config: Annotated[str, typer.Argument(help="SAE training config (.yaml/.toml).")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value overrides, e.g. data.n_seqs=100.")
    ] = None,
    out: OutFolder = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted training in --out.")
    ] = False,
    only: OnlySAE = None,
    quiet: Quiet = False,
) -> None:
    """Train the SAEs of CONFIG: one SAELens folder per SAE, checkpoints, resumable."""
    from perturb_lens.workflows.sae_training import load_train_config, train_saes

    out = checked_out(out)
    with user_errors():
        cfg = load_train_config(config, overrides or [])
        folder = Path(out) if out is not None else Path("runs") / cfg.name
        if (folder / "train_config.json").is_file() and not resume:
            raise FileExistsError(
                f"{folder} already holds a training; pass --resume to continue it or choose "
                "another --out."
            )
        folders = train_saes(cfg, folder, progress=not quiet, only=only)
    for name, path in folders.items():
        console().print(f"{name}: [bold]{path}[/bold]{_train_summary(path)}")


def _train_summary(folder: Path) -> str:
    """`` (N tokens/s; held-out EV, L0, dead, dCE)`` from the files training wrote, if any."""
    parts = []
    if (folder / "train_log.json").is_file():
        log = json.loads((folder / "train_log.json").read_text())
        if "tokens_per_s" in log:
            parts.append(f"{log['tokens']} tokens at {log['tokens_per_s']:.0f} tokens/s")
    if (folder / "eval.json").is_file():
        ev = json.loads((folder / "eval.json").read_text())
        tok = ev["tokens"]
        text = f"held-out EV {tok['explained_variance']:.3f}, L0 {tok['l0']:.1f}, "
        text += f"dead {ev['dead_fraction']:.3f}"
        if "ce" in ev:
            text += f", dCE {ev['ce']['ce_increase']:.3f}"
        parts.append(text)
    return f" ({'; '.join(parts)})" if parts else ""


ModelName = Annotated[str, typer.Option(help="The model the SAEs read.")]
DataSource = Annotated[
    str, typer.Option(help="Text source: file/folder, builtin:lee or HF dataset.")
]
NSeqs = Annotated[int, typer.Option(help="Sequences to evaluate on.")]
SeqLen = Annotated[int, typer.Option(help="Tokens per sequence (BOS first).")]
IncludeBos = Annotated[bool, typer.Option(help="Count the BOS position.")]
Frame = Annotated[str | None, typer.Option(help="centered | raw.")]
MeanFrom = Annotated[
    str | None,
    typer.Option(
        help="Mean ablation with this run's fitted mean (run folder or stats.safetensors); "
        "default: the mean over the evaluated tokens."
    ),
]


def _eval_setup(
    model: str, frame: str | None, data: str, n_seqs: int, seq_len: int, quiet: bool
) -> tuple[LensModel, Tensor]:
    """The model and the evaluation tokens of ``sae stats`` / ``sae l0-sweep``."""
    from perturb_lens.config.schema import DataConfig
    from perturb_lens.data.text import dataset_tokens
    from perturb_lens.models.load import load_model

    lens = load_model(model, frame=frame)
    text = DataConfig(source=data, n_seqs=n_seqs, seq_len=seq_len)
    return lens, dataset_tokens(text, lens, progress=not quiet)


def _means(mean_from: str | None, saes: dict[str, SAE], frame: str) -> dict[str, Tensor]:
    """hook -> fitted mean from ``--mean-from`` for every hook of ``saes`` (none without it)."""
    from perturb_lens.saes.quality import load_ablation_mean

    if mean_from is None:
        return {}
    return {s.hook: load_ablation_mean(mean_from, s.hook, frame) for s in saes.values()}


@sae_app.command()
def stats(
    saes: Annotated[list[str], typer.Argument(help="SAE folders, release:sae_id or e2e .pt.")],
    model: ModelName = "smollm2-135m",
    data: DataSource = "default",
    n_seqs: NSeqs = 64,
    seq_len: SeqLen = 64,
    include_bos: IncludeBos = False,
    frame: Frame = None,
    mean_from: MeanFrom = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    csv: Annotated[str | None, typer.Option(help="Also write the table to this CSV.")] = None,
    quiet: Quiet = False,
) -> None:
    """L0, alive/dead latents, MSE, explained variance, CE increase, KL and loss recovered."""
    import pandas as pd

    from perturb_lens.saes.io import load_sae
    from perturb_lens.saes.quality import sae_stats

    csv = checked_out(csv, "--csv", "sae_stats.csv")
    with user_errors():
        if csv is not None and Path(csv).is_dir():
            raise IsADirectoryError(
                f"--csv {csv} is a folder: give a file name for the table, e.g. --csv "
                f"{Path(csv) / 'sae_stats.csv'}."
            )
        lens, tokens = _eval_setup(model, frame, data, n_seqs, seq_len, quiet)
        named = {Path(s).name if Path(s).exists() else s: load_sae(s, model=model) for s in saes}
        means = _means(mean_from, named, lens.frame)
        rows = sae_stats(
            named, lens, tokens, include_bos=include_bos, means=means, progress=not quiet
        )
    df = pd.DataFrame([r.to_dict() for r in rows])
    if csv is not None:
        with user_errors():
            df.to_csv(csv, index=False)
    if as_json:
        typer.echo(json.dumps(df.to_dict(orient="records"), indent=2))
        return
    cols = {"l0": "L0", "alive": "alive", "dead": "dead", "mse": "MSE"}
    cols |= {"explained_variance": "EV", "ce_increase": "dCE", "kl": "KL"}
    cols |= {"loss_recovered_zero": "LR zero", "loss_recovered_mean": "LR mean"}
    title = f"SAE statistics ({model}, {int(df['n_tokens'].iloc[0])} tokens; EV = explained "
    title += "variance, dCE = CE increase, KL of SAE(x), nats; LR = loss recovered against zero "
    title += f"/ mean ablation, mean from {df['mean_source'].iloc[0]}; [95 % CI over sequences])"
    table = Table(title=title)
    table.add_column("sae", style="bold")
    table.add_column("hook")
    for head in cols.values():
        table.add_column(head, justify="right")
    for r in df.itertuples():
        table.add_row(r.name, r.hook, *(_cell(r, c) for c in cols))
    console().print(table)


def _cell(row: Any, col: str) -> str:
    """A table cell: the value, with its 95 % interval where the row has one (loss recovered)."""
    text = f"{getattr(row, col):.4g}"
    low, high = getattr(row, f"{col}_low", None), getattr(row, f"{col}_high", None)
    if low is not None and high is not None and low == low and high == high:
        text += f" [{low:.3g}, {high:.3g}]"
    return text


@sae_app.command("l0-sweep")
def l0_sweep_cmd(
    sae: Annotated[str, typer.Argument(help="The SAE whose frequent latents are masked.")],
    family: Annotated[
        list[str] | None,
        typer.Option(
            help="SAEs at other L1 / k: SAE folders, a `sae train` output folder or an SAE "
            "suite config (repeatable)."
        ),
    ] = None,
    l0: Annotated[
        list[float] | None, typer.Option(help="L0 targets of the masking steps (repeatable).")
    ] = None,
    steps: Annotated[
        int, typer.Option(help="Without --l0: targets evenly spaced from the SAE's L0 to 0.")
    ] = 8,
    model: ModelName = "smollm2-135m",
    data: DataSource = "default",
    n_seqs: NSeqs = 64,
    seq_len: SeqLen = 64,
    include_bos: IncludeBos = False,
    frame: Frame = None,
    mean_from: MeanFrom = None,
    out: OutFolder = None,
    fmt: Annotated[str, typer.Option("--format", help="Figure files: png,svg.")] = "png,svg",
    quiet: Quiet = False,
) -> None:
    """Loss recovered, KL and CE increase against L0: SAE with its most frequent latents masked
    step by step, beside a FAMILY trained at other L1 / k. Writes a table and a figure."""
    from perturb_lens.plots.registry import save_plots
    from perturb_lens.plots.sae_l0 import loss_recovered_plot
    from perturb_lens.saes.io import load_sae
    from perturb_lens.workflows.l0_sweep import TABLE_FILE, family_refs, l0_sweep

    out = checked_out(out)
    with user_errors():
        formats = [f.strip().lower() for f in fmt.split(",") if f.strip()]
        lens, tokens = _eval_setup(model, frame, data, n_seqs, seq_len, quiet)
        main = load_sae(sae, model=model)
        fam = {k: load_sae(ref, model=model) for k, ref in family_refs(family or []).items()}
        mean = _means(mean_from, {"sae": main}, lens.frame).get(main.hook)
        name = Path(sae).name if Path(sae).exists() else sae
        df = l0_sweep(
            main, lens, tokens, name=name, family=fam, l0_grid=l0, n_steps=steps,
            include_bos=include_bos, mean=mean, progress=not quiet,
        )  # fmt: skip
        plain = re.sub(r"[^A-Za-z0-9._-]", "_", name)  # a reference may hold '/' or ':'
        folder = Path(out) if out is not None else Path("runs") / f"l0_sweep_{plain}"
        folder.mkdir(parents=True, exist_ok=True)
        df.to_csv(folder / f"{TABLE_FILE}.csv", index=False)
        df.to_parquet(folder / f"{TABLE_FILE}.parquet", index=False)
        files = save_plots([loss_recovered_plot(df)], folder, formats)
    cols = {"l0": "L0", "loss_recovered_zero": "LR zero", "loss_recovered_mean": "LR mean"}
    cols |= {"kl": "KL", "ce_increase": "dCE"}
    title = f"Loss recovered vs L0 ({model}, {df['hook'].iloc[0]}, {int(df['n_tokens'].iloc[0])} "
    table = Table(
        title=title + "tokens; LR = loss recovered against zero / mean ablation [95 % CI over "
        "sequences], nats)"
    )
    for head in ("way", "sae", "setting", *cols.values()):
        table.add_column(head, justify="right" if head in cols.values() else "left")
    for r in df.itertuples():
        table.add_row(r.way, r.sae, r.setting, *(_cell(r, c) for c in cols))
    console().print(table)
    shown = ", ".join(str(p) for p in files["loss_recovered_vs_l0"].values())
    console().print(f"Table: [bold]{folder / TABLE_FILE}.csv[/bold] (.parquet); figure: {shown}")


@sae_app.command("run")
def run_suite_cmd(
    config: Annotated[str, typer.Argument(help="SAE suite config (base + saes).")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value overrides, e.g. base.data.n_seqs=8.")
    ] = None,
    out: OutFolder = None,
    only: OnlySAE = None,
    quiet: Quiet = False,
) -> None:
    """Run (or resume) one sweep per SAE; print the mean KL per SAE and direction + ratios."""
    from perturb_lens.workflows.sae_suite import load_suite_config, run_suite, suite_summary

    out = checked_out(out)
    with user_errors():
        cfg = load_suite_config(config, overrides or [])
        folder = run_suite(cfg, out, progress=not quiet, only=only)
        df = suite_summary(folder, reference=cfg.reference)
    cols = [c for c in ("kl", "size", "ratio_kl") if c in df.columns]
    table = Table(title=f"SAE suite {cfg.name}: mean per SAE, direction and length")
    for c in ("sae", "hook", "direction", "length", *cols):
        table.add_column(c, justify="right" if c in (*cols, "length") else "left")
    for r in df.itertuples():
        table.add_row(
            r.sae, r.hook, r.direction, f"{r.length:g}", *(f"{getattr(r, c):.4g}" for c in cols)
        )
    console().print(table)
    console().print(f"Summary: [bold]{folder / 'summary.csv'}[/bold]")
    console().print(f"Figures 5-6: [bold]{folder / 'figures'}[/bold]")


@sae_app.command()
def pack(
    folders: Annotated[list[str], typer.Argument(help="Trained SAE folders (SAELens layout).")],
    name: Annotated[str, typer.Option(help="Pack name (the NAME of pack:NAME/ID).")],
    version: Annotated[str, typer.Option(help="Pack version, e.g. 1 or 2026-11-29.")] = "1",
    archive: Annotated[
        str | None,
        typer.Option("--archive", help="Archive to write (default NAME-VERSION.tar.gz)."),
    ] = None,
) -> None:
    """Pack trained SAE folders into a versioned .tar.gz (manifest: sha256s, hook, model, training
    config, held-out metrics) to ship without retraining."""
    from perturb_lens.saes.pack import pack_saes

    archive = checked_out(archive, "--archive", f"{name}-{version}.tar.gz")
    with user_errors():
        path = pack_saes(folders, archive or f"{name}-{version}.tar.gz", name=name, version=version)
    console().print(f"Packed {len(folders)} SAE(s): [bold]{path}[/bold]")


@sae_app.command()
def unpack(
    archive: Annotated[str, typer.Argument(help="An SAE pack (.tar.gz) made by sae pack.")],
    dest: Annotated[
        str | None, typer.Option(help="Install folder (default: the perturb-lens cache).")
    ] = None,
) -> None:
    """Verify an SAE pack and install it; print the pack:NAME/ID references presets can use."""
    from perturb_lens.common.files import load_json
    from perturb_lens.saes.pack import MANIFEST
    from perturb_lens.saes.pack import unpack as unpack_archive

    dest = checked_out(dest, "--dest", "saes")
    with user_errors():
        target = unpack_archive(archive, dest)
        manifest = load_json(target / MANIFEST, "an SAE pack manifest")
    console().print(f"Installed [bold]{target}[/bold]")
    for sae_id in sorted(manifest["saes"]):
        console().print(f"  pack:{manifest['name']}@{manifest['version']}/{sae_id}")
