"""Run an experiment end to end: tokens, statistics, shards, result store. Resumable.

The runner composes the stages: it loads the model, the tokens and the SAE, fits (or reloads)
the activation statistics, builds the engine's :class:`~perturb_lens.engine.shard.ShardContext`, has
an executor compute the shards with the experiment's registered shard function, and writes them
through the result store. It is what the command line and the public API call.

A run is split into shards of ``shard_seqs`` sequences. Each shard is a pure function of the
config, the tokens, the fitted statistics and a seed derived from (run seed, shard id, direction),
so a resumed or re-executed shard gives identical rows, wherever and however often it runs.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from perturb_lens.common import version
from perturb_lens.common.hook_depths import depth_part
from perturb_lens.common.writes import config_hash
from perturb_lens.config.lengths import resolve_lengths
from perturb_lens.config.schema import ExperimentConfig, resolve_depths, validate_config
from perturb_lens.data.text import dataset_tokens, token_source_hash
from perturb_lens.directions.base import check_scale, get_direction
from perturb_lens.engine.shard import ShardContext, shard_ids
from perturb_lens.engine.sweep import SweepPlan
from perturb_lens.executors import Executor, ShardFn, ShardJob, get_executor
from perturb_lens.executors.compute import (
    check_same_compute,
    cpu_model,
    resolve_threads,
    torch_threads,
)
from perturb_lens.experiments.registry import get_experiment
from perturb_lens.metrics.builtin import NONFINITE
from perturb_lens.models.base import LensModel
from perturb_lens.models.fingerprint import model_fingerprint
from perturb_lens.results.aggregate import aggregate_rows
from perturb_lens.results.compaction import COMPACT_EVERY, compact, write_aggregate_shard
from perturb_lens.results.store import (
    MANIFEST,
    ResultStore,
    check_new_or_resume,
    file_sha256,
    load_manifest,
)
from perturb_lens.results.tokens import save_token_text
from perturb_lens.statistics.activations import (
    ActivationStats,
    fit_size_warning,
)
from perturb_lens.statistics.cache import (
    POOL_FILE,
    STATS_FILE,
    cached_stats,
    copy_stats,
    stats_tokens,
)
from perturb_lens.workflows.run_handle import Run

log = logging.getLogger(__name__)

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
) -> ShardContext:
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
    sae = _run_sae(cfg, model, sae)  # a mismatched SAE fails here, before any work
    given = tokens is not None
    if tokens is None and model.tokenizer is None:
        raise ValueError(
            "The model has no tokenizer to read config.data with: pass tokens= (a [N, T] tensor "
            "of token ids), or load the model with load_model(obj, tokenizer=...)."
        )
    if tokens is None:
        tokens = dataset_tokens(cfg.data, model, progress=progress)
    stats_files = None
    if stats is None:
        fit_tokens = stats_tokens(cfg, model, tokens, given=given, progress=progress)
        *stats, stats_files = cached_stats(
            cfg, model, fit_tokens, run_dir, progress, _recorded_meta(run_dir) or None
        )
        if warning := fit_size_warning(stats[0].n_tokens, stats[0].d_model):
            log.warning(warning)
    stats, pool = stats
    scale = stats.median_norm if cfg.relative_lengths else 1.0
    plan = SweepPlan(
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
        from perturb_lens.directions.sae import cached_alive

        # over the measured tokens, which workers are shipped too (the fit sample is the driver's)
        n_stats = min(cfg.stats.n_seqs or tokens.shape[0], tokens.shape[0])
        sae.alive = cached_alive(sae, model, tokens[:n_stats], run_dir, progress=progress)
    explicit = dict(explicit or {})
    return ShardContext(cfg, model, tokens, stats, pool, plan, explicit, sae, stats_files)


def _run_sae(cfg: ExperimentConfig, model: LensModel, sae: Any) -> Any:
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


def _meta(ctx: ShardContext, threads: int, cpu: str) -> dict[str, Any]:
    cfg = ctx.config
    return {
        "threads": threads,  # the torch threads every shard was computed with
        "cpu": cpu,
        "perturb_lens_version": version.__version__,
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
        "lengths": list(ctx.plan.lengths),
        "dataset_hash": token_source_hash(ctx.tokens),
        "n_seqs": int(ctx.tokens.shape[0]),
        "seq_len": int(ctx.tokens.shape[1]),
        "seed": cfg.seed,
        "median_norm": ctx.stats.median_norm,
        "stats": {
            "n_samples": ctx.stats.n_tokens,  # non-BOS activations the statistics were fitted on
            "d_model": ctx.stats.d_model,
            "source": cfg.stats.source or cfg.data.source,
        },
        "include_bos": cfg.include_bos,
        "drop_last_position": cfg.drop_last_position,
        "explicit_directions": sorted(ctx.explicit),
        **_fingerprints(ctx),
    }


def _fingerprints(ctx: ShardContext) -> dict[str, Any]:
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
        from perturb_lens.directions.sae import sae_fingerprint

        out["sae_fingerprint"] = sae_fingerprint(ctx.sae)
    return out


def run_experiment(
    config: ExperimentConfig | Mapping[str, Any],
    out: str | Path | None = None,
    *,
    resume: bool = False,
    model: Any = None,
    tokens: Tensor | None = None,
    explicit: Mapping[str, Tensor] | None = None,
    progress: bool = True,
    on_shard: Callable[[str], None] | None = None,
    executor: str | Executor = "local",
    address: str | None = None,
    shard_fn: ShardFn | None = None,
    sae: Any = None,
    allow_cpu_change: bool = False,
) -> Run:
    """Run (or resume) a sweep; write Parquet shards and a manifest to ``out``; return it as a
    :class:`~perturb_lens.workflows.run_handle.Run` (a ``Path``, with the results one call away).

    ``model`` / ``tokens`` skip loading (notebooks, tests): a LensModel, or a transformers
    ``PreTrainedModel`` / TransformerLens ``HookedTransformer`` object (see ``load_model``);
    ``explicit`` maps a direction name used in ``config.directions`` to fixed directions
    [N_seqs, T, d] or [d]. ``executor`` computes the
    shards: ``"local"`` (this process), ``"ray"`` (a Ray cluster at ``address``; None: a local
    one) or an :class:`~perturb_lens.executors.Executor`. ``shard_fn(ctx, shard_id)`` computes one
    shard's rows (default: the registered one of ``config.experiment``). ``sae``: an SAE object
    instead of loading ``config.sae``. Shards are computed with ``config.threads`` torch threads
    (None: torch's default here, or on resume the recorded count); a resume with another thread
    count or CPU kind is refused (``allow_cpu_change``: accept another CPU kind).
    """
    obj = model is not None and not isinstance(model, LensModel)  # HookedTransformer, HF model
    if obj and not isinstance(config, ExperimentConfig) and "model" not in config:
        from perturb_lens.models.from_objects import object_label

        config = {**config, "model": object_label(model)}  # not the default model's name
    cfg = config if isinstance(config, ExperimentConfig) else validate_config(dict(config))
    if obj:
        from perturb_lens.models.load import load_model

        model = load_model(
            model, frame=cfg.frame, dtype=cfg.dtype, device=cfg.device, precision=cfg.precision
        )
    cfg, loaded = _resolve_depths(cfg, model)  # the run's id and manifest hold layer indices
    cfg_dict = cfg.model_dump(mode="json")
    run_hash = config_hash(cfg_dict)
    run_dir = Path(out) if out is not None else Path("runs") / f"{cfg.name}-{run_hash[:8]}"
    check_new_or_resume(run_dir, resume, cfg_dict, run_hash)  # also checks the manifest's layout
    old_meta = _recorded_meta(run_dir) if resume else {}
    threads, cpu = resolve_threads(cfg.threads, old_meta.get("threads"), run_dir), cpu_model()
    check_same_compute(run_dir, old_meta, threads, cpu, allow_cpu_change=allow_cpu_change)
    runner = get_executor(executor, address)
    # unwritable or locked: refused before any work
    with ResultStore(run_dir).open() as store, torch_threads(threads):
        ctx = prepare(
            cfg, run_dir, model=loaded, tokens=tokens, explicit=explicit, sae=sae, progress=progress
        )
        # other inputs (tokens, weights, statistics, versions): refused on resume
        store.create(cfg_dict, run_hash, _meta(ctx, threads, cpu), resume=resume)
        save_token_text(store, ctx.tokens, ctx.model.tokenizer, results=cfg.results)
        if ctx.stats_files != run_dir:
            copy_stats(ctx.stats_files, run_dir)
        n_dirs = len(cfg.directions) if cfg.shard_by_direction else 0
        ids = shard_ids(ctx.tokens.shape[0], cfg.shard_seqs, n_dirs)
        done = store.done_shards()
        todo = [s for s in ids if s not in done]
        shard_fn = shard_fn or get_experiment(cfg.experiment).shard
        job = ShardJob.from_context(
            ctx,
            run_dir,
            shard_fn,
            prepare,
            model=model,
            sae=sae,
            threads=threads,
            cpu=None if allow_cpu_change else cpu,
        )
        t0 = time.perf_counter()
        results = runner.map(job, todo, ctx)
        bar = f"Shards ({len(done)} done before, {runner.name})"
        meta = store.manifest["meta"]
        for sid, rows in tqdm(results, desc=bar, total=len(todo), disable=not progress):
            sl = ctx.shard_slice(sid)
            info: dict[str, Any] = {"seqs": [sl.start, sl.stop]}
            if NONFINITE in rows.columns:
                info[NONFINITE] = int(rows[NONFINITE].sum())
            if cfg.results == "aggregate":  # in the driver: a pure function of the rows
                table = aggregate_rows(rows, cfg.metrics, meta)
                write_aggregate_shard(store, sid, table, info=info)
                compact(store, min_pending=COMPACT_EVERY)  # the shards' sketches into the run's
            else:
                store.write_shard(sid, rows, info=info)
            if on_shard is not None:
                on_shard(sid)
        compact(store)  # all sketch files merged before the run counts as complete
        store.finish({"seconds": round(time.perf_counter() - t0, 3), "shards": len(ids)})
    return Run(run_dir)


def _resolve_depths(
    cfg: ExperimentConfig, model: LensModel | None
) -> tuple[ExperimentConfig, LensModel | None]:
    """``cfg`` with its hook depths (``blocks.middle...``) resolved against the model, loading it
    (once: ``prepare`` takes it) when it was not given; the model, when one was needed."""
    if model is None and depth_part(cfg.hook) is None and depth_part(cfg.read) is None:
        return cfg, None
    if model is None:
        from perturb_lens.models.load import load_model

        model = load_model(
            cfg.model, frame=cfg.frame, dtype=cfg.dtype, device=cfg.device, precision=cfg.precision
        )
    return resolve_depths(cfg, model.spec.n_layers), model


def _recorded_meta(run_dir: Path) -> dict[str, Any]:
    """The ``meta`` of the run in ``run_dir`` ({} if it has none to read)."""
    if not (run_dir / MANIFEST).is_file():
        return {}
    manifest = load_manifest(run_dir)
    meta = manifest.get("meta") if isinstance(manifest, dict) else None
    return meta if isinstance(meta, dict) else {}
