"""The runs-root layout of ``perturb-lens replication``: ``RUNS_ROOT/<run name>/``, one folder per
run below, each written by the command beside it (run from the repository root)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Kind = Literal["run", "suite", "sae-folders"]
WEBTEXT = "../shared/data/webtext/webtext.test.jsonl"
# The sizes below are what 2 CPU cores allowed for the committed REPLICATION.md (the presets hold
# the published sizes: drop the overrides on a bigger machine).
SUBSTITUTION_SEQS = "base.data.n_seqs=12"


@dataclass(frozen=True)
class ReplicationRun:
    """A run folder under the runs root: ``name``, ``kind`` (``run``: a run directory with
    manifest.json; ``suite``: an ``sae run`` folder of runs; ``sae-folders``: an ``sae train``
    folder of SAEs with eval.json) and the ``command`` that writes it (``{root}``: the root)."""

    name: str
    kind: Kind
    command: str

    def path(self, root: str | Path) -> Path:
        return Path(root) / self.name

    def present(self, root: str | Path) -> bool:
        """Whether the folder holds what its kind needs (else the claim is 'not run')."""
        path = self.path(root)
        if self.kind == "run":
            return (path / "manifest.json").is_file()
        marker = "manifest.json" if self.kind == "suite" else "eval.json"
        return path.is_dir() and any((p / marker).is_file() for p in path.iterdir())

    def command_for(self, root: str | Path) -> str:
        return self.command.format(root=str(root).rstrip("/") or ".")


def _spec(name: str, kind: Kind, command: str, preset: str, *overrides: str) -> ReplicationRun:
    args = " ".join((f"configs/{preset}.yaml", *overrides))
    return ReplicationRun(name, kind, f"perturb-lens {command} {args} --out {{root}}/{name}")


def _run(name: str, preset: str, *overrides: str) -> ReplicationRun:
    return _spec(name, "run", "run", preset, *overrides)


def _suite(name: str, *overrides: str) -> ReplicationRun:
    return _spec(name, "suite", "sae run", name, *overrides)


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
        _suite("sae_substitution_smollm2_layers", SUBSTITUTION_SEQS),
        _suite("sae_error_extrapolation_smollm2"),
        _suite("sae_feature_extrapolation_smollm2"),
        _spec(
            "sae_train_smollm2_layer15_topk_e2e",
            "sae-folders",
            "sae train",
            "sae_train_smollm2_layer15_topk_e2e",
        ),
        _run("synthetic_activations", "synthetic_activations_smollm2"),
        _run("plateaus", "plateaus_smollm2", "data.n_seqs=100"),
        _run("stable_regions", "stable_regions_smollm2", "data.n_seqs=100"),
    )
}
"""The run folders the registered claims read, by name."""


def layout_text(root: str = "RUNS_ROOT") -> str:
    """The layout: each run's folder, then (indented) the command that writes it."""
    return "\n".join(f"{r.path(root)}/\n    {r.command_for(root)}" for r in RUNS.values())
