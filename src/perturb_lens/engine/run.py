"""Run a configured sweep end to end: tokens, statistics, shards, result store. Resumable.

A run is split into shards of ``shard_seqs`` sequences. Each shard is a pure function of the
config, the tokens, the fitted statistics and a seed derived from (run seed, shard id, direction),
so a resumed or re-executed shard gives identical rows, wherever and however often it runs.
"""

from __future__ import annotations

import hashlib
import logging
import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

import perturb_lens
from perturb_lens.config import DirectionSpec, ExperimentConfig, validate_config
from perturb_lens.data import (
    default_text_source,
    require_sequences,
    token_source_hash,
    tokenize_dataset,
)
from perturb_lens.directions import (
    DirectionContext,
    DirectionFn,
    check_scale,
    explicit_directions,
    get_direction,
    scaled_directions,
)
from perturb_lens.engine.lengths import resolve_lengths
from perturb_lens.engine.sweep import NONFINITE, SweepSpec, clean_pass, measure
from perturb_lens.executors import Executor, ShardFn, ShardJob, get_executor
from perturb_lens.executors.compute import (
    check_same_compute,
    cpu_model,
    resolve_threads,
    torch_threads,
)
from perturb_lens.models.base import CleanRun, LensModel
from perturb_lens.models.fingerprint import model_fingerprint
from perturb_lens.paths import cache_root
from perturb_lens.results.shards import summary_filters
from perturb_lens.results.store import (
    MANIFEST,
    RunStore,
    atomic_write,
    check_new_or_resume,
    config_hash,
    file_sha256,
    load_manifest,
    load_results,
)
from perturb_lens.stats import ActivationStats, StatsAccumulator, StatsFileError

log = logging.getLogger(__name__)

STATS_FILE = "stats.safetensors"
POOL_FILE = "pool.pt"


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from the run seed and identifiers (stable across processes and machines)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def shard_ids(n_seqs: int, shard_seqs: int, n_directions: int = 0) -> list[str]:
    """Shard ids s00000, s00001, ... covering ``n_seqs`` sequences; with ``n_directions``, one
    per batch and direction: s00000-d00, s00000-d01, ..."""
    batches = [f"s{i:05d}" for i in range(math.ceil(n_seqs / shard_seqs))]
    if not n_directions:
        return batches
    return [f"{b}-d{j:02d}" for b in batches for j in range(n_directions)]


@dataclass
class RunContext:
    """Everything a shard needs; built once per process (driver or worker)."""

    config: ExperimentConfig
    model: LensModel
    tokens: Tensor  # [N, T]
    stats: ActivationStats
    pool: Tensor  # [M, d] float32 real non-BOS activations
    spec: SweepSpec
    explicit: Mapping[str, Tensor]
    sae: Any = None  # the SAE at the hook (config ``sae``), for the SAE directions
    stats_files: Path | None = None  # the folder stats and pool were read from (driver only)

    @staticmethod
    def batch_id(shard_id: str) -> str:
        """The token batch of a shard (``s00003`` for ``s00003`` and ``s00003-d01``)."""
        return shard_id.partition("-")[0]

    def shard_specs(self, shard_id: str) -> list[DirectionSpec]:
        """The directions of a shard: all of the config's, or the one its ``-dNN`` names."""
        _, _, d = shard_id.partition("-")
        return [self.config.directions[int(d[1:])]] if d else list(self.config.directions)

    def shard_slice(self, shard_id: str) -> slice:
        i = int(self.batch_id(shard_id)[1:])
        n = self.config.shard_seqs
        return slice(i * n, min((i + 1) * n, self.tokens.shape[0]))


def shard_clean(ctx: RunContext, shard_id: str, tokens: Tensor | None = None) -> CleanRun:
    """The clean pass of a shard's token rows (or of ``tokens`` standing in for them), with
    non-finite activations reported by their sequence number in the whole run."""
    sl = ctx.shard_slice(shard_id)
    rows = ctx.tokens[sl] if tokens is None else tokens
    return clean_pass(ctx.model, rows.to(ctx.model.device), ctx.spec, seq_offset=sl.start)


def compute_shard(ctx: RunContext, shard_id: str) -> pd.DataFrame:
    """Rows of one shard: clean pass, directions for every token, the sweep."""
    clean = shard_clean(ctx, shard_id)
    dirs = shard_directions(ctx, shard_id, clean.x)
    return measure(ctx.model, clean, dirs, ctx.spec, seq_offset=ctx.shard_slice(shard_id).start)


def shard_directions(
    ctx: RunContext,
    shard_id: str,
    x: Tensor,
    specs: Sequence[DirectionSpec] | None = None,
) -> dict[str, Tensor]:
    """Directions [B, T, d] per label (``specs``: default the shard's) for the activations
    ``x`` [B, T, d] of a shard, seeded by (run seed, token batch, label). Under the last-position
    scope only the last position gets one (zeros elsewhere)."""
    cfg = ctx.config
    sl = ctx.shard_slice(shard_id)
    b, t, d = x.shape
    first = ctx.spec.first_position(t)
    flat = x[:, first:].reshape(-1, d).float()
    dirs: dict[str, Tensor] = {}
    for spec in ctx.shard_specs(shard_id) if specs is None else specs:
        gen = torch.Generator(device=flat.device).manual_seed(
            derive_seed(cfg.seed, ctx.batch_id(shard_id), spec.label)
        )
        dctx = DirectionContext(
            x=flat,
            stats=ctx.stats,
            pool=ctx.pool.to(flat.device),
            generator=gen,
            options=spec.generator_options,
            sae=ctx.sae,
            sequences=x,
            seq_of_row=torch.arange(b, device=flat.device).repeat_interleave(t - first),
            pos_of_row=torch.arange(first, t, device=flat.device).repeat(b),
        )
        source: str | DirectionFn = spec.name
        if spec.name in ctx.explicit:
            fixed = ctx.explicit[spec.name]
            fixed = fixed[sl, first:].reshape(-1, d) if fixed.ndim == 3 else fixed
            source = explicit_directions(fixed)
        out = torch.zeros(b, t, d, dtype=torch.float32, device=flat.device)
        out[:, first:] = scaled_directions(source, dctx, spec.scale).reshape(b, t - first, d)
        dirs[spec.label] = out
    return dirs


def fit_activation_stats(
    model: LensModel,
    tokens: Tensor,
    hook: str,
    *,
    jitter: float,
    pool_size: int,
    batch_seqs: int,
    seed: int,
    progress: bool = True,
) -> tuple[ActivationStats, Tensor]:
    """Mean/covariance/norms of non-BOS activations at ``hook`` and a seeded pool of them."""
    n, t = tokens.shape
    if t < 2:
        raise ValueError("Sequences need at least 2 tokens (BOS + text) to fit statistics.")
    n_tok = n * (t - 1)
    gen = torch.Generator().manual_seed(derive_seed(seed, "pool"))
    chosen = torch.randperm(n_tok, generator=gen)[: min(pool_size, n_tok)].sort().values
    acc = StatsAccumulator(model.spec.d_model, seed=seed)
    pool: list[Tensor] = []
    for s0 in tqdm(range(0, n, batch_seqs), desc="Activation statistics", disable=not progress):
        x = model.run_to_hook(tokens[s0 : s0 + batch_seqs].to(model.device), hook)
        acc.update(x, exclude_first_position=True)
        flat = x[:, 1:].reshape(-1, x.shape[-1])
        lo, hi = s0 * (t - 1), s0 * (t - 1) + flat.shape[0]
        idx = chosen[(chosen >= lo) & (chosen < hi)] - lo
        pool.append(flat[idx.to(flat.device)].float().cpu())
    return acc.finalize(hook=hook, frame=model.frame, jitter=jitter), torch.cat(pool)


def _cached_stats(
    cfg: ExperimentConfig,
    model: LensModel,
    tokens: Tensor,
    run_dir: Path,
    progress: bool,
) -> tuple[ActivationStats, Tensor, Path]:
    """Statistics, pool and the folder of their files: the run dir's if they match the sha256 its
    manifest recorded, else the shared cache (keyed by the model's weights, the tokens and the
    settings), else fitted into it. Damaged cache files are refitted."""
    n_stats = min(cfg.stats.n_seqs or tokens.shape[0], tokens.shape[0])
    key = derive_seed(
        model_fingerprint(model),
        model.frame,
        cfg.dtype,
        cfg.hook,
        token_source_hash(tokens[:n_stats]),
        cfg.stats.jitter,
        cfg.stats.pool_size,
        cfg.seed,
    )
    cache = cache_root() / "stats" / f"{key:016x}"
    if _run_stats_intact(run_dir):
        return *load_stats(run_dir), run_dir
    if (cache / STATS_FILE).is_file() or (cache / POOL_FILE).is_file():
        try:
            return *load_stats(cache), cache
        except (StatsFileError, FileNotFoundError) as e:
            log.warning("Ignoring unreadable statistics cache %s (%s); fitting again", cache, e)
    stats, pool = fit_activation_stats(
        model,
        tokens[:n_stats],
        cfg.hook,
        jitter=cfg.stats.jitter,
        pool_size=cfg.stats.pool_size,
        batch_seqs=cfg.stats.batch_seqs,
        seed=cfg.seed,
        progress=progress,
    )
    cache.mkdir(parents=True, exist_ok=True)
    save_stats(cache, stats, pool)
    return stats, pool, cache


def _run_stats_intact(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run whose statistics files are those its manifest recorded
    (if not, warn: they are refitted, and a resume refused unless they come out identical)."""
    if not (run_dir / MANIFEST).is_file():
        return False
    recorded = load_manifest(run_dir)["meta"]
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
        pool = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated or foreign pickles raise many kinds of errors
        raise StatsFileError(f"{path} is not a readable pool ({type(e).__name__}: {e})") from e
    if not (isinstance(pool, Tensor) and pool.ndim == 2 and pool.shape[1] == stats.d_model):
        raise StatsFileError(f"{path} does not hold a [n, {stats.d_model}] pool of activations")
    return stats, pool


def save_stats(folder: Path, stats: ActivationStats, pool: Tensor) -> None:
    """Statistics and the real-activation pool, saved (atomically) into ``folder``."""
    stats.save(folder / STATS_FILE)
    atomic_write(folder / POOL_FILE, lambda f: torch.save(pool.contiguous(), f))


def _copy_stats(src: Path, run_dir: Path) -> None:
    """The statistics files, byte for byte (their sha256 is in the manifest), into the run dir."""
    for name in (STATS_FILE, POOL_FILE):
        data = (src / name).read_bytes()
        atomic_write(run_dir / name, lambda f, data=data: f.write(data))


def load_tokens_for(cfg: ExperimentConfig, model: LensModel, progress: bool = True) -> Tensor:
    """Token rows [n_seqs, seq_len] for a config (BOS first, cached by content hash)."""
    source = default_text_source() if cfg.data.source == "default" else cfg.data.source
    tokens = tokenize_dataset(
        source,
        model.tokenizer,
        seq_len=cfg.data.seq_len,
        n_seqs=cfg.data.n_seqs,
        bos_id=model.bos_token_id,
        sep_id=getattr(model.tokenizer, "eos_token_id", None),
        text_field=cfg.data.text_field,
        split=cfg.data.split,
        show_progress=progress,
    )
    require_sequences(tokens, cfg.data.n_seqs, source)
    return tokens


def prepare(
    cfg: ExperimentConfig,
    run_dir: Path,
    *,
    model: LensModel | None = None,
    tokens: Tensor | None = None,
    explicit: Mapping[str, Tensor] | None = None,
    stats: tuple[ActivationStats, Tensor] | None = None,
    sae: Any = None,
    progress: bool = True,
) -> RunContext:
    """Load the model and tokens, fit (or reload) statistics; everything shards need.

    ``stats`` (statistics and pool, e.g. the driver's, on an executor's worker) skips fitting;
    ``sae`` (an SAE object) replaces loading ``cfg.sae``. The statistics of a run already in
    ``run_dir`` are reused only if they match its manifest.
    """
    from perturb_lens.models.load import load_model

    if model is None:
        model = load_model(
            cfg.model, frame=cfg.frame, dtype=cfg.dtype, device=cfg.device, precision=cfg.precision
        )
    model.parse_hook(cfg.hook)
    if cfg.read:
        model.parse_hook(cfg.read)
    for d in cfg.directions:
        if d.name not in (explicit or {}):
            get_direction(d.name)  # unknown names fail here, before any work, listing the known
        check_scale(d.scale)
    _check_context(tokens.shape[1] if tokens is not None else cfg.data.seq_len, model)
    sae = _load_sae(cfg, model, sae)  # a mismatched SAE fails here, before any work
    if tokens is None:
        tokens = load_tokens_for(cfg, model, progress)
    stats_files = None
    if stats is None:
        *stats, stats_files = _cached_stats(cfg, model, tokens, run_dir, progress)
    stats, pool = stats
    scale = stats.median_norm if cfg.relative_lengths else 1.0
    spec = SweepSpec(
        hook=cfg.hook,
        lengths=resolve_lengths(cfg.lengths, scale=scale),
        scope=cfg.scope,
        metrics=cfg.metrics,
        read=cfg.read,
        rows_per_pass=cfg.rows_per_pass,
        rows_per_logits=cfg.rows_per_logits,
        nonfinite=cfg.nonfinite,
    )
    if sae is not None and any(d.name == "sae-feature" for d in cfg.directions):
        from perturb_lens.saes.directions import cached_alive

        n_stats = min(cfg.stats.n_seqs or tokens.shape[0], tokens.shape[0])
        sae.alive = cached_alive(sae, model, tokens[:n_stats], run_dir, progress=progress)
    return RunContext(cfg, model, tokens, stats, pool, spec, dict(explicit or {}), sae, stats_files)


def _load_sae(cfg: ExperimentConfig, model: LensModel, sae: Any) -> Any:
    """The run's SAE (given, or loaded from ``cfg.sae``), checked against hook, width, frame."""
    if sae is None and cfg.sae is None:
        return None
    from perturb_lens.saes import load_sae

    sae = load_sae(sae if sae is not None else cfg.sae, hook=cfg.hook, model=cfg.model)
    sae.check_compatible(cfg.hook, model.spec.d_model, model.frame)
    return sae.to(model.device)


def _check_context(seq_len: int, model: LensModel) -> None:
    if seq_len > model.spec.n_ctx:
        raise ValueError(
            f"seq_len {seq_len} exceeds the model's context of {model.spec.n_ctx} tokens: set "
            f"data.seq_len to at most {model.spec.n_ctx} (e.g. data.seq_len={model.spec.n_ctx})."
        )


def _meta(ctx: RunContext, threads: int, cpu: str) -> dict[str, Any]:
    cfg = ctx.config
    return {
        "threads": threads,  # the torch threads every shard was computed with
        "cpu": cpu,
        "perturb_lens_version": perturb_lens.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "model": cfg.model,
        "model_source": ctx.model.source,
        "architecture": ctx.model.spec.architecture,
        "frame": ctx.model.frame,
        "dtype": cfg.dtype,
        "device": str(ctx.model.device),
        "hook": cfg.hook,
        "read": cfg.read or ctx.model.default_read,
        "scope": cfg.scope,
        "lengths": list(ctx.spec.lengths),
        "dataset_hash": token_source_hash(ctx.tokens),
        "n_seqs": int(ctx.tokens.shape[0]),
        "seq_len": int(ctx.tokens.shape[1]),
        "seed": cfg.seed,
        "median_norm": ctx.stats.median_norm,
        "include_bos": cfg.include_bos,
        "drop_last_position": cfg.drop_last_position,
        "explicit_directions": sorted(ctx.explicit),
        **_fingerprints(ctx),
    }


def _fingerprints(ctx: RunContext) -> dict[str, Any]:
    """What the rows depend on beyond the config: model weights, statistics files, explicit
    directions, SAE weights (a resume is refused when any differs)."""
    out: dict[str, Any] = {"weights_fingerprint": model_fingerprint(ctx.model)}
    if ctx.stats_files is not None:
        out["stats_sha256"] = file_sha256(ctx.stats_files / STATS_FILE)
        out["pool_sha256"] = file_sha256(ctx.stats_files / POOL_FILE)
    if ctx.explicit:
        out["explicit_sha256"] = {
            k: hashlib.sha256(v.detach().cpu().float().numpy().tobytes()).hexdigest()
            for k, v in sorted(ctx.explicit.items())
        }
    if ctx.sae is not None:
        from perturb_lens.saes.directions import sae_fingerprint

        out["sae_fingerprint"] = sae_fingerprint(ctx.sae)
    return out


def run_experiment(
    config: ExperimentConfig | Mapping[str, Any],
    out: str | Path | None = None,
    *,
    resume: bool = False,
    model: LensModel | None = None,
    tokens: Tensor | None = None,
    explicit: Mapping[str, Tensor] | None = None,
    progress: bool = True,
    on_shard: Callable[[str], None] | None = None,
    executor: str | Executor = "local",
    address: str | None = None,
    shard_fn: ShardFn | None = None,
    sae: Any = None,
    allow_cpu_change: bool = False,
) -> Path:
    """Run (or resume) a sweep; write Parquet shards and a manifest to ``out``; return it.

    ``model`` / ``tokens`` skip loading (notebooks, tests); ``explicit`` maps a direction name used
    in ``config.directions`` to fixed directions [N_seqs, T, d] or [d]. ``executor`` computes the
    shards: ``"local"`` (this process), ``"ray"`` (a Ray cluster at ``address``; None: a local
    one) or an :class:`~perturb_lens.executors.Executor`. ``shard_fn(ctx, shard_id)`` computes one
    shard's rows (default: the one of ``config.experiment``). ``sae``: an SAE object instead of
    loading ``config.sae``. Shards are computed with ``config.threads`` torch threads (None:
    torch's default here, or on resume the recorded count); a resume with another thread count
    or CPU kind is refused (``allow_cpu_change``: accept another CPU kind).
    """
    cfg = config if isinstance(config, ExperimentConfig) else validate_config(dict(config))
    cfg_dict = cfg.model_dump(mode="json")
    run_hash = config_hash(cfg_dict)
    run_dir = Path(out) if out is not None else Path("runs") / f"{cfg.name}-{run_hash[:8]}"
    check_new_or_resume(run_dir, resume, cfg_dict, run_hash)  # also checks the manifest's layout
    old_meta = _recorded_meta(run_dir) if resume else {}
    threads, cpu = resolve_threads(cfg.threads, old_meta.get("threads")), cpu_model()
    check_same_compute(run_dir, old_meta, threads, cpu, allow_cpu_change=allow_cpu_change)
    runner = get_executor(executor, address)
    # unwritable or locked: refused before any work
    with RunStore(run_dir).open() as store, torch_threads(threads):
        ctx = prepare(
            cfg, run_dir, model=model, tokens=tokens, explicit=explicit, sae=sae, progress=progress
        )
        # other inputs (tokens, weights, statistics, versions): refused on resume
        store.create(cfg_dict, run_hash, _meta(ctx, threads, cpu), resume=resume)
        if ctx.stats_files != run_dir:
            _copy_stats(ctx.stats_files, run_dir)
        n_dirs = len(cfg.directions) if cfg.shard_by_direction else 0
        ids = shard_ids(ctx.tokens.shape[0], cfg.shard_seqs, n_dirs)
        done = store.done_shards()
        todo = [s for s in ids if s not in done]
        if shard_fn is None:
            from perturb_lens.experiments import shard_function

            shard_fn = shard_function(cfg.experiment)
        job = ShardJob.from_context(
            ctx,
            run_dir,
            shard_fn,
            model=model,
            sae=sae,
            threads=threads,
            cpu=None if allow_cpu_change else cpu,
        )
        t0 = time.perf_counter()
        results = runner.map(job, todo, ctx)
        bar = f"Shards ({len(done)} done before, {runner.name})"
        for sid, rows in tqdm(results, desc=bar, total=len(todo), disable=not progress):
            sl = ctx.shard_slice(sid)
            info: dict[str, Any] = {"seqs": [sl.start, sl.stop]}
            if NONFINITE in rows.columns:
                info[NONFINITE] = int(rows[NONFINITE].sum())
            store.write_shard(sid, rows, info=info)
            if on_shard is not None:
                on_shard(sid)
        store.finish({"seconds": round(time.perf_counter() - t0, 3), "shards": len(ids)})
    return run_dir


def _recorded_meta(run_dir: Path) -> dict[str, Any]:
    """The ``meta`` of the run in ``run_dir`` ({} if it has none to read)."""
    if not (run_dir / MANIFEST).is_file():
        return {}
    manifest = load_manifest(run_dir)
    meta = manifest.get("meta") if isinstance(manifest, dict) else None
    return meta if isinstance(meta, dict) else {}


def summary_rows(run_dir: str | Path) -> pd.DataFrame:
    """The rows that enter the published mean: drop the last position (all-positions) / BOS if
    the run says so, and rows recorded as non-finite (``nonfinite=record``)."""
    meta = load_manifest(Path(run_dir))["meta"]
    df = load_results(run_dir, filters=summary_filters(meta))
    if NONFINITE in df.columns:
        df = df[~df[NONFINITE].astype(bool)].reset_index(drop=True)
    return df


def nonfinite_rows(run_dir: str | Path) -> int:
    """How many rows of a run were recorded as non-finite (NaN/inf; ``nonfinite=record``)."""
    shards = load_manifest(Path(run_dir))["shards"].values()
    return sum(int((e.get("info") or {}).get(NONFINITE, 0)) for e in shards)
