"""A run's activation statistics, fitted once and cached: the fit sample's tokens
(:func:`stats_tokens`), the fit (:func:`fit_run_stats`), and the files (``stats.safetensors``,
``pool.pt``) kept in the run folder and in a shared cache keyed by the model's weights, the fit
tokens and the settings (:func:`cached_stats`), so that runs on the same model and hook share one
fit."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from perturb_lens.common.files import UnreadableFileError, torch_load
from perturb_lens.common.paths import cache_root
from perturb_lens.common.seeds import derive_seed
from perturb_lens.common.writes import atomic_write, file_sha256
from perturb_lens.config.schema import ExperimentConfig
from perturb_lens.data.text import read_rows, token_source_hash
from perturb_lens.models.base import LensModel
from perturb_lens.models.fingerprint import model_fingerprint
from perturb_lens.statistics.activations import (
    DEFAULT_FIT_PER_DIM,
    ActivationStats,
    PoolSampler,
    StatsAccumulator,
    StatsFileError,
    fit_stats,
    hook_activations,
    take_batch,
)

log = logging.getLogger(__name__)

STATS_FILE = "stats.safetensors"
POOL_FILE = "pool.pt"


def fit_run_stats(
    cfg: ExperimentConfig, model: LensModel, tokens: Tensor, progress: bool = True
) -> tuple[ActivationStats, Tensor]:
    """Mean/covariance/norms of the non-BOS activations at the hook over the statistics tokens,
    and a seeded pool of them (``stats.pool_size``) for the real-* directions."""
    n, t = tokens.shape
    if t < 2:
        raise ValueError("Sequences need at least 2 tokens (BOS + text) to fit statistics.")
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "pool"))
    pool = PoolSampler(n * (t - 1), cfg.stats.pool_size, gen)
    batches = hook_activations(model, tokens, cfg.hook, cfg.stats.batch_seqs, progress=progress)
    stats = fit_stats(
        batches, hook=cfg.hook, frame=model.frame, jitter=cfg.stats.jitter, seed=cfg.seed, pool=pool
    )
    return stats, pool.sample()


def stats_tokens(
    cfg: ExperimentConfig,
    model: LensModel,
    tokens: Tensor,
    *,
    given: bool = False,
    progress: bool = True,
) -> Tensor:
    """The token rows the statistics are fitted on (``stats`` section): ``stats.n_seqs`` rows, or
    enough for ``stats.n_tokens`` non-BOS samples, or by default for max(20 x d_model, the
    measured) samples. From the run's own source the measured ``tokens`` are the first rows and
    the rest is read beyond them; from ``stats.source``, rows of that source. ``given`` (tokens
    handed in, not read from ``data``) with no ``stats.source``: a prefix of ``tokens``."""
    n, t = tokens.shape
    if t < 2:
        raise ValueError("Sequences need at least 2 tokens (BOS + text) to fit statistics.")
    sc = cfg.stats
    if sc.n_seqs is not None:
        rows = sc.n_seqs
    elif sc.n_tokens is not None:
        rows = math.ceil(sc.n_tokens / (t - 1))
    else:
        rows = max(n, math.ceil(DEFAULT_FIT_PER_DIM * model.spec.d_model / (t - 1)))
    if sc.source is None and (given or rows <= n):
        return tokens[:rows]
    source = cfg.data.source if sc.source is None else sc.source
    out = read_rows(cfg.data, model, source, rows, progress=progress)
    if out.shape[0] < rows:
        log.warning(
            "The statistics source %s has %d rows of %d tokens, fewer than the %d asked for: "
            "fitting on those",
            source,
            out.shape[0],
            t,
            rows,
        )
    return out


def cached_stats(
    cfg: ExperimentConfig,
    model: LensModel,
    tokens: Tensor,
    run_dir: Path,
    progress: bool,
    recorded: dict[str, Any] | None = None,
) -> tuple[ActivationStats, Tensor, Path]:
    """Statistics, pool and the folder of their files: the run dir's if they match the sha256s
    ``recorded`` (the meta of the run's manifest; None: a new run), else the shared cache (keyed
    by the model's weights, the fit sample's tokens and the settings), else fitted on ``tokens``
    (the fit sample) into it. Damaged cache files are refitted."""
    cache = stats_cache_dir(cfg, model, tokens)
    if recorded is not None and _run_stats_intact(run_dir, recorded):
        return *load_stats(run_dir), run_dir
    if (cache / STATS_FILE).is_file() or (cache / POOL_FILE).is_file():
        try:
            return *load_stats(cache), cache
        except (StatsFileError, FileNotFoundError) as e:
            log.warning("Ignoring unreadable statistics cache %s (%s); fitting again", cache, e)
    stats, pool = fit_run_stats(cfg, model, tokens, progress)
    cache.mkdir(parents=True, exist_ok=True)
    save_stats(cache, stats, pool)
    return stats, pool, cache


def stats_cache_dir(cfg: ExperimentConfig, model: LensModel, tokens: Tensor) -> Path:
    """The shared cache folder of a fit: keyed by the model's weights and frame, the dtype, the
    hook, the fit sample's tokens and the settings."""
    key = derive_seed(
        model_fingerprint(model),
        model.frame,
        cfg.dtype,
        cfg.hook,
        token_source_hash(tokens),
        cfg.stats.jitter,
        cfg.stats.pool_size,
        cfg.seed,
    )
    return cache_root() / "stats" / f"{key:016x}"


def prefill_stats(
    cfgs: list[ExperimentConfig], model: LensModel, tokens: Tensor, progress: bool = True
) -> list[Path]:
    """Fit the statistics of several runs that differ only in their hook (the fit sample
    ``tokens`` is theirs: :func:`stats_tokens`) in one pass over the model, into the shared cache
    where :func:`cached_stats` finds them; the same numbers as fitting each alone (the same
    activations, batches, seeds and pool draws). Fits already cached are skipped. Returns the
    cache folders."""
    hooks = [model.parse_hook(c.hook) for c in cfgs]
    if len({h.name for h in hooks}) != len(hooks):
        raise ValueError("prefill_stats takes runs at distinct hooks")
    folders = [stats_cache_dir(c, model, tokens) for c in cfgs]
    todo = [i for i, f in enumerate(folders) if not (f / STATS_FILE).is_file()]
    if not todo:
        return folders
    n, t = tokens.shape
    first = min((hooks[i] for i in todo), key=lambda h: (h.layer, h.kind_index))
    fits = {}
    for i in todo:
        c = cfgs[i]
        gen = torch.Generator().manual_seed(derive_seed(c.seed, "pool"))
        acc = StatsAccumulator(model.spec.d_model, seed=c.seed)
        fits[i] = (acc, PoolSampler(n * (t - 1), c.stats.pool_size, gen))
    reads = [hooks[i].name for i in todo if hooks[i] != first]
    batch = cfgs[todo[0]].stats.batch_seqs
    for s0 in tqdm(range(0, n, batch), desc="Activation statistics", disable=not progress):
        clean = model.run_clean(tokens[s0 : s0 + batch].to(model.device), first, reads=reads)
        for i, (acc, pool) in fits.items():
            acts = clean.x if hooks[i] == first else clean.reads[hooks[i].name]
            take_batch(acc, pool, acts, True)
    for i, (acc, pool) in fits.items():
        c = cfgs[i]
        stats = acc.finalize(hook=c.hook, frame=model.frame, jitter=c.stats.jitter)
        folders[i].mkdir(parents=True, exist_ok=True)
        save_stats(folders[i], stats, pool.sample())
    return folders


def _run_stats_intact(run_dir: Path, recorded: dict[str, Any]) -> bool:
    """Whether ``run_dir``'s statistics files are those its manifest recorded (``recorded``: its
    meta; if not, warn: they are refitted, and a resume refused unless they come out
    identical)."""
    for name, key in ((STATS_FILE, "stats_sha256"), (POOL_FILE, "pool_sha256")):
        path = run_dir / name
        if not path.is_file() or file_sha256(path) != recorded.get(key):
            state = "damaged or replaced" if path.is_file() else "missing"
            log.warning(
                "%s is %s (its sha256 is not the one in the manifest); recomputing the "
                "statistics: the resume goes on only if they come out identical",
                path,
                state,
            )
            return False
    return True


def load_stats(folder: Path) -> tuple[ActivationStats, Tensor]:
    """Statistics and pool saved by :func:`save_stats`; damaged files raise StatsFileError."""
    stats = ActivationStats.load(folder / STATS_FILE)
    path = folder / POOL_FILE
    try:
        pool = torch_load(path, "pool of activations")
    except UnreadableFileError as e:
        raise StatsFileError(str(e)) from None
    if not (isinstance(pool, Tensor) and pool.ndim == 2 and pool.shape[1] == stats.d_model):
        raise StatsFileError(f"{path} does not hold a [n, {stats.d_model}] pool of activations")
    return stats, pool


def save_stats(folder: Path, stats: ActivationStats, pool: Tensor) -> None:
    """Statistics and the real-activation pool, saved (atomically) into ``folder``."""
    stats.save(folder / STATS_FILE)
    atomic_write(folder / POOL_FILE, lambda f: torch.save(pool.contiguous(), f))


def copy_stats(src: Path, run_dir: Path) -> None:
    """The statistics files, byte for byte (their sha256 is in the manifest), into the run dir."""
    for name in (STATS_FILE, POOL_FILE):
        data = (src / name).read_bytes()
        atomic_write(run_dir / name, lambda f, data=data: f.write(data))
