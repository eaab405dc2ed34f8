"""The runs-root layout of ``perturb-lens replication``: ``RUNS_ROOT/<model>/<run name>/``, one
folder per model and run (the presets' model's runs may also sit directly under the root, the
single-model layout), each written by the command beside it (run from the repository root)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from perturb_lens.replication.models import MODEL_LAYERS, PRESET_MODEL, middle_hook, middle_layer

Kind = Literal["run", "suite", "sae-folders"]
WEBTEXT = "../shared/data/webtext/webtext.test.jsonl"
# The sizes below are what 2 CPU cores allowed for the committed REPLICATION.md (the presets hold
# the published sizes: drop the overrides on a bigger machine).
SUBSTITUTION_SEQS = "base.data.n_seqs=12"
# Another model than the presets' is judged with one TopK SAE at its middle layer (the layer-15
# set's topk-k64, trained there by the specialized `sae train` command).
SAE_TRAIN = "sae_train_smollm2_layer15_topk_e2e"
MIDDLE_SAE = "{root}/" + SAE_TRAIN + "/topk-k64"


@dataclass(frozen=True)
class ReplicationRun:
    """A run folder under the runs root: ``name``, ``kind`` (``run``: a run directory with
    manifest.json; ``suite``: an ``sae run`` folder of runs; ``sae-folders``: an ``sae train``
    folder of SAEs with eval.json) and the ``command`` that writes it (``{root}``: the root)."""

    name: str
    kind: Kind
    command: str
    specialize: tuple[str, ...] = ()
    """What a run of another model adds before ``--out``: templates of ``{model}``, ``{layer}``
    (its middle layer), ``{hook}`` (that layer's resid_pre) and ``{root}`` (the model's
    folder)."""

    def path(self, root: str | Path) -> Path:
        return Path(root) / self.name

    def present(self, root: str | Path) -> bool:
        """Whether the folder holds what its kind needs (else the claim is 'not run')."""
        path = self.path(root)
        if self.kind == "run":
            return (path / "manifest.json").is_file()
        marker = "manifest.json" if self.kind == "suite" else "eval.json"
        return path.is_dir() and any((p / marker).is_file() for p in path.iterdir())

    def command_for(self, root: str | Path, model: str | None = None) -> str:
        """The command writing this run under ``root`` (a model's folder): the preset's for its
        own model (None), specialized with :attr:`specialize` for another."""
        where = str(root).rstrip("/") or "."
        command = self.command.format(root=where)
        if model is None or model == PRESET_MODEL:
            return command
        head, out = command.rsplit(" --out ", 1)
        at = {"model": model, "layer": middle_layer(model), "hook": middle_hook(model)}
        extra = (t.format(root=where, **at) for t in self.specialize)
        return " ".join((head, *extra, "--out", out))


def _spec(
    name: str, kind: Kind, command: str, preset: str, *overrides: str, specialize: tuple[str, ...]
) -> ReplicationRun:
    args = " ".join((f"configs/{preset}.yaml", *overrides))
    command = f"perturb-lens {command} {args} --out {{root}}/{name}"
    return ReplicationRun(name, kind, command, specialize)


MODEL_HOOK = ("model={model}", "hook={hook}")


def _run(name: str, preset: str, *overrides: str, sae: bool = False) -> ReplicationRun:
    extra = (f"sae={MIDDLE_SAE}",) if sae else ()
    return _spec(name, "run", "run", preset, *overrides, specialize=MODEL_HOOK + extra)


def _suite(name: str, *overrides: str, label: str = "topk-k64") -> ReplicationRun:
    saes = f"'saes=[{{{{label: {label}, sae: {MIDDLE_SAE}}}}}]'"
    specialize = ("base.model={model}", saes)
    return _spec(name, "suite", "sae run", name, *overrides, specialize=specialize)


RUNS: dict[str, ReplicationRun] = {
    r.name: r
    for r in (
        _run("sensitive_directions_lee", "replicate_sensitive_directions_smollm2"),
        _run(
            "sensitive_directions_webtext",
            "replicate_sensitive_directions_smollm2",
            f"data.source={WEBTEXT}",
        ),
        _suite("sae_substitution_smollm2", SUBSTITUTION_SEQS),
        _suite("sae_substitution_smollm2_layers", SUBSTITUTION_SEQS, label="L{layer:02d}"),
        _suite("sae_error_extrapolation_smollm2"),
        _suite("sae_feature_extrapolation_smollm2"),
        _spec(
            SAE_TRAIN,
            "sae-folders",
            "sae train",
            SAE_TRAIN,
            specialize=(*MODEL_HOOK, "--only topk-k64"),
        ),
        _run("synthetic_activations", "synthetic_activations_smollm2", sae=True),
        _run("plateaus", "plateaus_smollm2", "data.n_seqs=100", sae=True),
        _run("stable_regions", "stable_regions_smollm2", "data.n_seqs=100"),
    )
}
"""The run folders the registered claims read, by name."""


def layout_text(root: str = "RUNS_ROOT", model: str | None = None) -> str:
    """The layout of one model's folder ``root``: each run's folder, then (indented) the command
    that writes it (``model``: None for the presets' own)."""
    return "\n".join(f"{r.path(root)}/\n    {r.command_for(root, model)}" for r in RUNS.values())


def models_layout_text(root: str = "RUNS_ROOT", models: tuple[str, ...] = ()) -> str:
    """The multi-model layout: :func:`layout_text` of ``root/<model>`` per model (default:
    every model of :data:`~perturb_lens.replication.models.MODEL_LAYERS`)."""
    return "\n".join(
        layout_text(f"{str(root).rstrip('/') or '.'}/{m}", m) for m in models or tuple(MODEL_LAYERS)
    )
