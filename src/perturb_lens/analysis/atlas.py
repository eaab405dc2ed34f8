"""The layer atlas: per model, the resid_pre of every third layer (first and last included), the
mean KL of each baseline direction over isotropic's at lengths relative to that layer's median
norm, with a bootstrap CI over sequences. An atlas folder (``perturb-lens atlas``) holds one run
per layer and ``atlas.json`` (model, layer count, d_model, the runs); atlases of models of
different d_model, vocabularies and norms compare on relative lengths and relative depth."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from perturb_lens.analysis.verdicts import sequence_matrix, stats_fit
from perturb_lens.common.files import load_json
from perturb_lens.common.writes import atomic_write_json
from perturb_lens.results.shards import run_directions, sequence_sums
from perturb_lens.results.store import MANIFEST, load_manifest
from perturb_lens.statistics.bootstrap import ratio_intervals

ATLAS_FILE = "atlas.json"
EVERY = 3
RELATIVE_LENGTHS = (0.2, 0.4)
REFERENCE = "isotropic"
COLUMNS = [
    "model",
    "n_layers",
    "d_model",
    "layer",
    "depth",
    "hook",
    "direction",
    "relative_length",
    "length",
    "median_norm",
    "mean",
    "mean_isotropic",
    "ratio",
    "ci_low",
    "ci_high",
    "n_seqs",
    "stats_samples",
]


def atlas_layers(n_layers: int, every: int = EVERY) -> list[int]:
    """Every ``every``-th layer from the first, and the last: 0, 3, ..., n_layers - 1."""
    if n_layers < 1 or every < 1:
        raise ValueError(f"need n_layers >= 1 and every >= 1, got {n_layers} and {every}")
    layers = list(range(0, n_layers, every))
    return layers if layers[-1] == n_layers - 1 else [*layers, n_layers - 1]


def run_folder(layer: int) -> str:
    """The folder of a layer's run inside an atlas folder."""
    return f"L{layer:02d}"


def write_atlas_index(
    folder: str | Path, model: str, n_layers: int, d_model: int, layers: Sequence[int]
) -> Path:
    """Write ``atlas.json``: what the atlas of ``model`` holds (its runs, one per layer). The
    label is the model's name, or the last part of its path."""
    index = {
        "model": Path(model).name if "/" in model or "\\" in model else model,
        "source": model,
        "n_layers": int(n_layers),
        "d_model": int(d_model),
        "runs": {run_folder(layer): int(layer) for layer in layers},
    }
    path = Path(folder) / ATLAS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, index)
    return path


def read_atlas(folder: str | Path) -> dict[str, Any]:
    """The ``atlas.json`` of an atlas folder (ValueError saying how to make one otherwise)."""
    path = Path(folder) / ATLAS_FILE
    if not path.is_file():
        raise ValueError(
            f"{folder} is not an atlas folder (no {ATLAS_FILE}): make one with "
            "`perturb-lens atlas MODEL --out FOLDER`"
        )
    index = load_json(path, "atlas index")
    if not isinstance(index, dict):
        raise ValueError(f"{path} is not an atlas index: rewrite it with `perturb-lens atlas`")
    for key in ("model", "n_layers", "d_model", "runs"):
        if key not in index:
            raise ValueError(f"{path} lacks {key!r}: rewrite it with `perturb-lens atlas`")
    return index


def run_ratios(
    run_dir: str | Path,
    *,
    reference: str = REFERENCE,
    metric: str = "kl",
    ci: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per direction (other than ``reference``) and length of one run: the mean of ``metric``
    over the published rows, the reference's, their ratio and its ``ci`` bootstrap interval over
    sequences (:func:`~perturb_lens.statistics.bootstrap.ratio_intervals`), and the length
    relative to the run's median norm."""
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    meta = manifest["meta"]
    labels = list(run_directions(manifest))
    if reference not in labels:
        raise ValueError(f"{run_dir} has no {reference!r} direction to divide by (it has {labels})")
    sums = sequence_sums(run_dir, metric)
    seqs, lengths = np.sort(sums["seq"].unique()), np.sort(sums["length"].unique())
    b = sequence_matrix(sums, reference, seqs, lengths)
    frames = []
    for label in labels:
        if label == reference:
            continue
        res = ratio_intervals(
            sequence_matrix(sums, label, seqs, lengths), b, ci=ci, n_boot=n_boot, seed=seed
        )
        res.insert(0, "length", lengths)
        res.insert(0, "direction", label)
        frames.append(res)
    out = pd.concat(frames, ignore_index=True).rename(
        columns={"mean_a": "mean", "mean_b": f"mean_{reference}"}
    )
    norm = float(meta["median_norm"])
    out["relative_length"] = (out["length"] / norm).round(6)
    out["median_norm"] = norm
    out["hook"] = meta["hook"]
    fit = stats_fit(run_dir, manifest)
    out["stats_samples"] = fit[0] if fit is not None else np.nan
    return out


def atlas_runs(paths: Iterable[str | Path]) -> list[tuple[dict[str, Any], int, Path]]:
    """``(atlas index, layer, run dir)`` of every run of the atlas folders ``paths`` (a path may
    also be one run inside an atlas folder)."""
    found = []
    for path in map(Path, paths):
        if (path / MANIFEST).is_file() and (path.parent / ATLAS_FILE).is_file():
            index = read_atlas(path.parent)
            if path.name not in index["runs"]:
                raise ValueError(f"{path} is not one of the runs in {path.parent / ATLAS_FILE}")
            found.append((index, int(index["runs"][path.name]), path))
            continue
        index = read_atlas(path)
        for name, layer in index["runs"].items():
            run = path / name
            if not (run / MANIFEST).is_file() or not load_manifest(run).get("complete"):
                raise ValueError(
                    f"{path / name} (layer {layer}) has no finished run: resume it with "
                    f"`perturb-lens atlas {index.get('source', index['model'])} --out {path} "
                    "--resume`"
                )
            found.append((index, int(layer), path / name))
    if not found:
        raise ValueError("no atlas folder given: pass folders written by `perturb-lens atlas`")
    return found


def atlas_table(
    paths: Iterable[str | Path],
    *,
    reference: str = REFERENCE,
    metric: str = "kl",
    ci: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """The atlas of one or more models (atlas folders ``paths``): one row per model, layer,
    direction and relative length (:data:`COLUMNS`); ``depth`` is ``layer / n_layers`` (the
    fraction of the blocks before the hook)."""
    frames = []
    for index, layer, run in atlas_runs(paths):
        res = run_ratios(run, reference=reference, metric=metric, ci=ci, n_boot=n_boot, seed=seed)
        res["model"], res["n_layers"], res["d_model"] = (
            index["model"],
            index["n_layers"],
            index["d_model"],
        )
        res["layer"] = layer
        res["depth"] = layer / index["n_layers"]
        frames.append(res)
    table = pd.concat(frames, ignore_index=True)
    columns = [c if c != "mean_isotropic" else f"mean_{reference}" for c in COLUMNS]
    # models in the order given, directions in the runs' order
    ranks = {
        c: {v: i for i, v in enumerate(dict.fromkeys(table[c]))} for c in ("model", "direction")
    }
    table = table.assign(**{f"_{c}": table[c].map(r) for c, r in ranks.items()})
    order = ["_model", "relative_length", "_direction", "layer"]
    table = table.sort_values(order, kind="stable", ignore_index=True)
    return table[columns]
