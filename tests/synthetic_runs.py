"""Synthetic run directories for figure and report tests (no model: ResultStore + made-up rows)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from perturb_lens.config.schema import load_config
from perturb_lens.results import ResultStore, config_hash
from perturb_lens.results.tokens import save_token_text

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs").glob("sensitive_directions_*.yaml"))
LENGTHS = [0.0, 1.0, 3.0, 10.0, 20.0, 40.0, 61.0, 91.0]


def synthetic_rows(directions: list[str], lengths=LENGTHS, n_seq=4, seq_len=6, seed=0):
    """One row per (seq, pos, direction, length); KL and L2 grow with length, per-token scale."""
    rng = np.random.default_rng(seed)
    idx = pd.MultiIndex.from_product(
        [range(n_seq), range(seq_len), directions, lengths],
        names=["seq", "pos", "direction", "length"],
    ).to_frame(index=False)
    scale = rng.exponential(size=len(idx) // len(lengths)).repeat(len(lengths))
    idx["kl"] = (scale * (idx["length"] / 30.0) ** 2).astype(np.float32)
    idx["l2"] = (scale * idx["length"] + rng.random(len(idx))).astype(np.float32)
    return idx


def make_run(
    folder: Path,
    config: dict | None = None,
    *,
    rows: pd.DataFrame | None = None,
    hook: str = "blocks.6.hook_resid_pre",
    token_text: tuple[np.ndarray, object] | None = None,
) -> Path:
    """A complete run directory (manifest + two shards) with synthetic rows; ``token_text``:
    (token ids [N, T], tokenizer) to keep as the run's token text, as the runner does."""
    cfg = config or load_config(PRESETS[0]).model_dump(mode="json")
    cfg = {**cfg, "hook": hook}
    names = [d.get("label") or d["name"] for d in cfg["directions"]]
    rows = rows if rows is not None else synthetic_rows(names)
    seq_len = int(rows["pos"].max()) + 1
    meta = {
        "model": cfg["model"],
        "hook": hook,
        "read": "blocks.11.hook_resid_post",
        "scope": cfg["scope"],
        "frame": "centered",
        "lengths": sorted(rows["length"].unique().tolist()),
        "median_norm": 100.0,
        "n_seqs": int(rows["seq"].nunique()),
        "seq_len": seq_len,
        "seed": 0,
        "include_bos": True,
        "drop_last_position": True,
    }
    with ResultStore(folder) as store:
        store.create(cfg, config_hash(cfg), meta, resume=False)
        if token_text is not None:
            save_token_text(store, *token_text, results=cfg.get("results", "rows"))
        half = rows["seq"].max() // 2
        store.write_shard("s00000", rows[rows.seq <= half])
        store.write_shard("s00001", rows[rows.seq > half])
        store.finish({"seconds": 0.0})
    return folder


def small_config() -> dict:
    """Three directions, KL only: a report with few figures (rendering dominates the time)."""
    cfg = load_config(PRESETS[0]).model_dump(mode="json")
    cfg["metrics"] = ["kl"]
    cfg["directions"] = [{"name": n} for n in ("isotropic", "cov-random-mixture", "real-mixture")]
    return cfg


@contextmanager
def tiny_figure_run(folder: Path, experiment: str) -> Iterator[Path]:
    """A run of a test-only experiment whose figure set is one small figure (fast reports): the
    set is registered while the context is open."""
    from perturb_lens.plots import Plot, register_figures, registry
    from perturb_lens.plots.figures import line_panels

    @register_figures(experiment)
    def tiny(view) -> list[Plot]:
        cv = view.curves("kl")
        fig = line_panels({"kl": cv}, ylabel="mean kl")
        return [Plot("tiny_kl", "Tiny", "All directions.", fig, cv, True, ["isotropic"])]

    try:
        yield make_run(folder, {**small_config(), "experiment": experiment})
    finally:
        registry.FIGURE_SETS.unregister(experiment)
