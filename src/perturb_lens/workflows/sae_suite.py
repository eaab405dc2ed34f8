"""SAE experiment suites: one sweep per SAE (per layer, per SAE type and L0), and their summary.

A suite config (YAML/TOML) has a ``base`` experiment config (everything but ``sae`` and ``hook``)
and a list of ``saes`` (``label``, ``sae`` reference, optional ``hook``: default the SAE's own).
Each SAE's sweep is an ordinary run in ``<out>/<label>/``, so runs resume and load as usual. The
presets (Lee & Heimersheim figures 3-8, Gurnee):

- SAE substitution: ``sae-error`` with ``scale: raw`` at length 1 is ``SAE(x)``; ``isotropic``,
  ``cov-random-mixture`` and ``real-mixture`` with ``scale: sae-error`` at length 1 are the
  epsilon-baselines ``x + eps u`` with ``eps = ||SAE(x) - x||``; the ``size`` column of the results
  is the per-token reconstruction error, so a run holds the error-vs-KL scatter data.
- SAE error / feature extrapolation: ``sae-error`` / ``sae-feature`` (unit) on the ``sae`` grid.

:func:`suite_summary` gives the mean of each metric per SAE, direction and length, and the ratio
of the ``reference`` direction's mean (default label ``SAE(x)``) to every other direction's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from perturb_lens.common.files import first_few
from perturb_lens.common.names import check_folder_name
from perturb_lens.config.schema import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    check_run_name,
    explain,
    read_config_file,
    validate_config,
)
from perturb_lens.metrics.builtin import metric_names
from perturb_lens.models.base import LensModel
from perturb_lens.saes.sae import SAE

SUMMARY_FILE = "summary.csv"
SUITE_FILE = "suite.json"
_TAIL = re.compile(r"[-_](?:l1[-_]?|L|l|k)[\d.]+$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SuiteSAE(_Strict):
    """One SAE of a suite."""

    label: str
    sae: str = Field(description="SAELens folder, release:sae_id, or e2e_sae checkpoint")
    hook: str | None = Field(None, description="default: the hook the SAE records")
    type: str | None = Field(
        None,
        description="its panel in figures 5-6; default: the objective it was trained with "
        "(perturb-lens sae train), else the label without a trailing -l1-N / -LN",
    )

    @field_validator("label")
    @classmethod
    def _plain_label(cls, v: str) -> str:
        return check_folder_name(v, "SAE label", "--out/LABEL (its run)")


class SAESuiteConfig(_Strict):
    """Several sweeps that differ only in the SAE (and its hook)."""

    name: str = "sae-suite"
    base: dict[str, Any]
    saes: list[SuiteSAE]
    reference: str = Field("SAE(x)", description="direction label the ratios are taken against")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return check_run_name(v)  # the default --out is runs/NAME

    @model_validator(mode="after")
    def _check(self) -> SAESuiteConfig:
        labels = [s.label for s in self.saes]
        if len(set(labels)) != len(labels):
            raise ValueError(f"SAE labels must be unique; got {labels}")
        for key in ("sae", "hook", "name"):
            if key in self.base:
                raise ValueError(f"base must not set {key!r}: each SAE entry sets it")
        return self

    def run_config(self, entry: SuiteSAE, hook: str) -> dict[str, Any]:
        """The plain experiment config of one entry."""
        return {**self.base, "name": f"{self.name}-{entry.label}", "hook": hook, "sae": entry.sae}


def load_suite_config(path: str | Path, overrides: list[str] | None = None) -> SAESuiteConfig:
    """Read and validate a suite config; every run's config is validated too."""
    data = apply_overrides(read_config_file(path), overrides or [])
    try:
        cfg = SAESuiteConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            explain(err, SAESuiteConfig, f"Invalid SAE suite config {path}")
        ) from None
    for entry in cfg.saes:
        validate_config(cfg.run_config(entry, entry.hook or cfg.base.get("hook", "")))
    return cfg


def is_suite_file(path: str | Path) -> bool:
    """Whether a config file is an SAE suite (has ``base`` and ``saes``)."""
    data = read_config_file(path)
    return "base" in data and "saes" in data


def run_suite(
    cfg: SAESuiteConfig,
    out: str | Path | None = None,
    *,
    model: LensModel | None = None,
    progress: bool = True,
    only: list[str] | None = None,
    figures: bool = True,
) -> Path:
    """Run (or resume) every SAE's sweep into ``out/<label>``; write and return ``out``: also
    ``saes.json`` (each SAE's type and L0 on the run's tokens), ``summary.csv`` and, with
    ``figures``, figures 5-6 (``plots.suite``) in ``out/figures``."""
    from perturb_lens.models.load import load_model
    from perturb_lens.plots.suite import SAES_FILE
    from perturb_lens.saes.io import load_sae
    from perturb_lens.workflows.experiment import run_experiment

    out = Path(out) if out is not None else Path("runs") / cfg.name
    labels = [s.label for s in cfg.saes]
    unknown = [n for n in only or [] if n not in labels]
    if unknown:
        raise ValueError(f"--only {unknown[0]!r} names no SAE of the suite; its labels: {labels}.")
    if out.is_dir() and not (out / SUITE_FILE).exists() and any(out.iterdir()):
        shown = first_few(sorted(p.name for p in out.iterdir()))
        raise FileExistsError(
            f"{out} is not empty and holds no SAE suite ({shown}): a suite gets a folder of its "
            f"own. Choose a new or empty --out (e.g. --out {out / cfg.name})."
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / SUITE_FILE).write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
    base = validate_config(
        cfg.run_config(cfg.saes[0], cfg.base.get("hook", "blocks.0.hook_resid_pre"))
    )
    if model is None:
        model = load_model(base.model, frame=base.frame, dtype=base.dtype, device=base.device)
    records = _read_records(out / SAES_FILE)
    for entry in cfg.saes:
        if only is not None and entry.label not in only:
            continue
        sae = load_sae(entry.sae, hook=entry.hook, model=base.model)
        run_cfg = validate_config(cfg.run_config(entry, entry.hook or sae.hook))
        run_dir = out / entry.label
        run_experiment(
            run_cfg, run_dir, resume=run_dir.exists(), model=model, sae=sae, progress=progress
        )
        records[entry.label] = sae_record(entry, sae, model, run_cfg)
    (out / SAES_FILE).write_text(json.dumps(list(records.values()), indent=1))
    summary = suite_summary(out, reference=cfg.reference)
    summary.to_csv(out / SUMMARY_FILE, index=False)
    if figures:
        from perturb_lens.plots.registry import save_plots
        from perturb_lens.plots.suite import suite_figures

        save_plots(suite_figures(out), out / "figures")
    return out


def sae_type(entry: SuiteSAE, sae: SAE) -> str:
    """The SAE's type (a panel of figures 5-6): the entry's ``type``, else the objective it was
    trained with, else its label without a trailing ``-l1-N`` / ``-LN`` / ``-kN``."""
    if entry.type:
        return entry.type
    objective = sae.cfg.metadata.get("objective") if sae.cfg.metadata else None
    return str(objective) if objective else _TAIL.sub("", entry.label) or entry.label


def sae_record(entry: SuiteSAE, sae: SAE, model: LensModel, run_cfg: ExperimentConfig) -> dict:
    """``label``, ``hook``, ``type`` and ``l0`` (mean over the run's tokens and averaged positions)
    of one SAE of the suite."""
    from perturb_lens.data.text import dataset_tokens
    from perturb_lens.saes.quality import sae_stats

    tokens = dataset_tokens(run_cfg.data, model, progress=False)
    stats = sae_stats(sae, model, tokens, include_bos=run_cfg.include_bos, progress=False)[0]
    return {"label": entry.label, "hook": sae.hook, "type": sae_type(entry, sae), "l0": stats.l0}


def _read_records(path: Path) -> dict[str, dict]:
    """The SAE records of an earlier (partial) run of the suite, by label."""
    return {r["label"]: r for r in json.loads(path.read_text())} if path.is_file() else {}


def suite_summary(out: str | Path, *, reference: str = "SAE(x)") -> pd.DataFrame:
    """Mean of every metric (published averaging) per SAE label, hook, direction and length,
    with ``ratio_<metric>`` = mean of ``reference`` / mean of the direction (same SAE, length).
    Streamed shard by shard from either result mode (``size``: rows runs only)."""
    from perturb_lens.plots.registry import RunReader
    from perturb_lens.results.aggregate import aggregate_curves

    frames = []
    for run_dir in sorted(p for p in Path(out).iterdir() if (p / "manifest.json").is_file()):
        view = RunReader(run_dir)
        means = [
            aggregate_curves(view.aggregates(m), stat=("mean",), ci=None)
            .set_index(["direction", "length"])["mean"]
            .rename(m)
            for m in (*metric_names(), "size")
            if m in view.columns
        ]
        g = pd.concat(means, axis=1).reset_index()
        g["direction"] = g["direction"].astype(str)
        g.insert(0, "hook", view.meta["hook"])
        g.insert(0, "sae", run_dir.name)
        frames.append(g)
    if not frames:
        raise ValueError(f"No finished runs under {out}.")
    df = pd.concat(frames, ignore_index=True)
    for metric in [m for m in ("kl", "l2") if m in df.columns]:
        ref = df[df["direction"] == reference].set_index(["sae", "length"])[metric]
        key = pd.MultiIndex.from_frame(df[["sae", "length"]])
        df[f"ratio_{metric}"] = ref.reindex(key).to_numpy() / df[metric].to_numpy()
    return df
