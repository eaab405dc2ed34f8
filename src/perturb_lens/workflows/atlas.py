"""The layer atlas of one model (``perturb-lens atlas MODEL``): a sensitive-directions run at the
resid_pre of every third layer (first and last included), the six baseline directions at lengths
relative to that layer's median norm, KL only, statistics fitted on the default 20 x d_model
samples; the runs go to ``OUT/L<layer>/`` beside ``atlas.json``. The model is loaded once and
every layer's statistics are fitted in one pass over it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from perturb_lens.analysis.atlas import (
    EVERY,
    RELATIVE_LENGTHS,
    atlas_layers,
    run_folder,
    write_atlas_index,
)
from perturb_lens.config.schema import BASELINES, validate_config
from perturb_lens.data.text import dataset_tokens
from perturb_lens.executors.compute import resolve_threads, torch_threads
from perturb_lens.results.store import load_manifest
from perturb_lens.statistics.cache import prefill_stats, stats_tokens
from perturb_lens.statistics.fit_size import DEFAULT_FIT_PER_DIM
from perturb_lens.workflows.experiment import run_experiment

log = logging.getLogger(__name__)

SHARD_SEQS = 8


def atlas_config(
    model: str,
    layer: int,
    *,
    source: str = "builtin:lee",
    n_seqs: int = 16,
    seq_len: int = 64,
    lengths: Sequence[float] = RELATIVE_LENGTHS,
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, Any]:
    """The run of one atlas layer: the baselines at ``blocks.{layer}.hook_resid_pre``, lengths
    relative to its median norm, KL, all positions, the default statistics fit (20 x d_model)."""
    return {
        "name": f"atlas-{run_folder(layer)}",
        "model": model,
        "hook": f"blocks.{layer}.hook_resid_pre",
        "scope": "all-positions",
        "lengths": [float(x) for x in lengths],
        "relative_lengths": True,
        "metrics": ["kl"],
        "directions": list(BASELINES),
        "data": {"source": source, "seq_len": seq_len, "n_seqs": n_seqs},
        "seed": seed,
        "shard_seqs": SHARD_SEQS,
        "threads": threads,
    }


def run_atlas(
    model: str,
    out: str | Path,
    *,
    source: str = "builtin:lee",
    n_seqs: int = 16,
    seq_len: int = 64,
    lengths: Sequence[float] = RELATIVE_LENGTHS,
    every: int = EVERY,
    seed: int = 0,
    threads: int | None = None,
    resume: bool = False,
    progress: bool = True,
    lens: Any = None,
) -> Path:
    """Run the atlas of ``model`` (a name or path :func:`~perturb_lens.models.load.load_model`
    takes; ``lens``: the model already loaded) into ``out``; returns ``out``. ``resume``:
    continue an interrupted atlas (finished layers are read back, not recomputed)."""
    from perturb_lens.models.load import load_model

    if not lengths or any(x <= 0 for x in lengths):
        raise ValueError(f"lengths must be positive multiples of the median norm, got {lengths}")
    out = Path(out)
    lens = load_model(lens if lens is not None else model)
    spec = lens.spec
    layers = atlas_layers(spec.n_layers, every)
    if out.exists() and any(out.iterdir()) and not resume:
        raise FileExistsError(
            f"{out} is not empty: pass --resume to continue that atlas, or choose another --out"
        )
    write_atlas_index(out, model, spec.n_layers, spec.d_model, layers)
    cfgs = {
        layer: validate_config(
            atlas_config(
                model,
                layer,
                source=source,
                n_seqs=n_seqs,
                seq_len=seq_len,
                lengths=lengths,
                seed=seed,
                threads=threads,
            )
        )
        for layer in layers
    }
    # every layer's statistics in one pass over the model (the runs then find them cached)
    first = cfgs[layers[0]]
    tokens = dataset_tokens(first.data, lens, progress=progress)
    with torch_threads(resolve_threads(threads, None, out)):
        prefill_stats(list(cfgs.values()), lens, stats_tokens(first, lens, tokens), progress)
    for layer, cfg in cfgs.items():
        folder = out / run_folder(layer)
        log.info("atlas of %s: layer %d of %d", model, layer, spec.n_layers)
        run_experiment(cfg, folder, resume=folder.exists(), model=lens, progress=progress)
        fit = load_manifest(folder)["meta"]["stats"]["n_samples"]
        if fit < DEFAULT_FIT_PER_DIM * spec.d_model:
            log.warning(
                "layer %d: statistics fitted on %d samples < %d x d_model = %d (the source is "
                "short): use a longer source",
                layer, fit, DEFAULT_FIT_PER_DIM, DEFAULT_FIT_PER_DIM * spec.d_model,
            )  # fmt: skip
    return out
