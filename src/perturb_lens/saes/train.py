"""Train SAEs on cached activations: ReLU + L1 (``local``), ``topk``, ``e2e`` and ``e2e+ds``.

Objectives (Braun et al., "Identifying functionally important features with end-to-end sparse
dictionary learning"), with ``f = encode(x)`` and ``x_hat = SAE(x)``:

- ``local``: ``||x_hat - x||^2 + l1 * ||f||_1`` (decoder rows kept at unit norm);
- ``topk``: ``||x_hat - x||^2`` with the ``k`` largest latents per token;
- ``e2e``: ``KL(p_clean || p_SAE) + l1 * ||f||_1``, where ``p_SAE`` is the model's output with
  ``x_hat`` substituted at the hook (gradients flow through the rest of the model);
- ``e2e+ds``: ``e2e`` plus ``ds * mean_h ||h_SAE - h_clean||^2 / E||h_clean||^2`` over downstream
  hooks ``h`` (normalised per hook, since residual norms grow with depth).

Activations are scaled by one dataset-wide factor so that ``E||x|| = sqrt(d_in)`` while training
(SAELens' ``expected_average_only_in``); the factor is folded into the saved weights, so the SAE
reads raw activations. Reconstruction MSE is summed over ``d_in`` and averaged over tokens.

The activation cache (``<out>/activations``) holds ``x`` at the hook for every training sequence,
in chunks, plus (for e2e) the clean final hidden state and downstream activations of the first
``e2e_seqs`` sequences; chunks are written atomically, so an interrupted caching step resumes. Each
SAE writes ``<out>/<name>/checkpoint.pt`` every ``checkpoint_every`` steps (atomic) and, when done,
a SAELens folder ``<out>/<name>/`` (``cfg.json`` + ``sae_weights.safetensors``). The batch order
is a function of (seed, SAE name, epoch), so a resumed SAE trains exactly as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import Tensor
from tqdm.auto import tqdm

from perturb_lens.config import ConfigError, DataConfig, read_config_file
from perturb_lens.models.base import CleanRun, LensModel
from perturb_lens.models.options import FRAMES
from perturb_lens.results.store import atomic_write
from perturb_lens.saes.sae import SAE, SAEConfig
from perturb_lens.saes.stats import token_kl
from perturb_lens.seeds import derive_seed

log = logging.getLogger(__name__)

KINDS = ("local", "topk", "e2e", "e2e+ds")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SAESpec(_Strict):
    """One SAE to train; unset fields take the set's defaults."""

    name: str
    kind: Literal["local", "topk", "e2e", "e2e+ds"]
    l1: float = Field(0.0, ge=0, description="sparsity coefficient (local, e2e, e2e+ds)")
    k: int | None = Field(None, ge=1, description="latents per token (topk)")
    ds: float = Field(1.0, ge=0, description="downstream reconstruction coefficient (e2e+ds)")
    d_sae: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0, description="passes over the training tokens")
    init_from: str | None = Field(None, description="start from another SAE of this set")
    hook: str | None = Field(None, description="train at this hook instead of the set's")

    @model_validator(mode="after")
    def _check(self) -> SAESpec:
        if self.kind == "topk" and self.k is None:
            raise ValueError(f"SAE {self.name!r}: kind topk needs k")
        if self.kind in ("local", "e2e", "e2e+ds") and self.l1 <= 0 and self.init_from is None:
            raise ValueError(f"SAE {self.name!r}: kind {self.kind} needs l1 > 0")
        return self


class SAETrainConfig(_Strict):
    """A set of SAEs trained on one model and token set (at ``hook``, or each at its own)."""

    name: str = "saes"
    model: str = "smollm2-135m"
    frame: Literal[FRAMES] | None = None
    hook: str = "blocks.15.hook_resid_pre"
    data: DataConfig = Field(default_factory=lambda: DataConfig(n_seqs=512, seq_len=64))
    d_sae: int = Field(1152, ge=1)
    lr: float = Field(1e-3, gt=0)
    epochs: float = Field(2.0, gt=0, description="passes over the training tokens (local/topk)")
    batch_tokens: int = Field(1024, ge=1, description="tokens per step (local, topk)")
    e2e_seqs: int = Field(128, ge=1, description="sequences the e2e objectives train on")
    e2e_batch_seqs: int = Field(4, ge=1, description="sequences per step (e2e, e2e+ds)")
    e2e_epochs: float = Field(1.0, gt=0)
    ds_hooks: list[str] | None = Field(
        None, description="downstream hooks of e2e+ds; None = resid_post of every 4th later layer"
    )
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints")
    cache_batch_seqs: int = Field(16, ge=1)
    skip_bos: bool = Field(
        True,
        description="train without the BOS position (an outlier: its norm is ~25,000 against "
        "~160 elsewhere at SmolLM2's layer 15); the SAE then leaves BOS alone (SAEConfig.skip_bos)",
    )
    seed: int = 0
    saes: list[SAESpec]

    @model_validator(mode="after")
    def _check(self) -> SAETrainConfig:
        names = [s.name for s in self.saes]
        if len(set(names)) != len(names):
            raise ValueError(f"SAE names must be unique; got {names}")
        for s in self.saes:
            if s.init_from is not None and s.init_from not in names[: names.index(s.name)]:
                raise ValueError(f"SAE {s.name!r}: init_from must name an earlier SAE of the set")
            src = next((o for o in self.saes if o.name == s.init_from), None)
            if src is not None and (src.hook or self.hook) != (s.hook or self.hook):
                raise ValueError(f"SAE {s.name!r}: init_from must name an SAE at the same hook")
        return self


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> SAETrainConfig:
    """Read and validate a training config (YAML/TOML, ``key=value`` overrides)."""
    from pydantic import ValidationError

    from perturb_lens.config import apply_overrides

    data = apply_overrides(read_config_file(path), overrides or [])
    try:
        return SAETrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"Invalid SAE training config {path}:\n{err}") from None


# ---- activation cache ----------------------------------------------------------------------


def _atomic_save(tensors: dict[str, Tensor], path: Path) -> None:
    data = save_safetensors({k: v.contiguous() for k, v in tensors.items()})
    atomic_write(path, lambda f: f.write(data))


def cache_activations(
    model: LensModel,
    tokens: Tensor,
    hooks: dict[str, Path],
    *,
    batch_seqs: int,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Activations [N, T, d] (float32) at each hook, cached in chunks under ``hooks[hook]``; all
    hooks come from one pass per chunk (to the last hook)."""
    from perturb_lens.data import token_source_hash

    for hook, folder in hooks.items():
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"hook": hook, "tokens": token_source_hash(tokens), "source": model.source}
        meta_file = folder / "meta.json"
        if meta_file.is_file() and json.loads(meta_file.read_text()) != meta:
            raise ValueError(f"{folder} caches other activations ({meta_file}); use another --out.")
        meta_file.write_text(json.dumps(meta))
    order = sorted(hooks, key=model.parse_hook)
    parts: dict[str, list[Tensor]] = {h: [] for h in order}
    starts = range(0, tokens.shape[0], batch_seqs)
    for i, s0 in enumerate(tqdm(starts, desc="Caching activations", disable=not progress)):
        paths = {h: hooks[h] / f"x_{i:05d}.safetensors" for h in order}
        missing = [h for h in order if not paths[h].is_file()]
        if missing:
            tok = tokens[s0 : s0 + batch_seqs]
            if len(missing) == 1:
                got = {missing[0]: model.run_to_hook(tok, missing[0])}
            else:
                clean = model.run_clean(tok, missing[0], reads=missing[1:])
                got = {missing[0]: clean.x, **clean.reads}
            for h in missing:
                _atomic_save({"x": got[h].float().cpu()}, paths[h])
        for h in order:
            parts[h].append(load_file(str(paths[h]))["x"])
    return {h: torch.cat(v) for h, v in parts.items()}


def cache_clean_outputs(
    model: LensModel,
    tokens: Tensor,
    x: Tensor,
    hook: str,
    reads: list[str],
    folder: Path,
    *,
    batch_seqs: int,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Clean final hidden states and downstream ``reads`` [n, T, d], computed from the cached
    ``x`` (cached under ``folder``, keyed by the number of sequences and the reads)."""
    tag = f"clean{x.shape[0]}" + "".join("_" + r.replace(".", "-") for r in reads)
    out: dict[str, list[Tensor]] = {}
    starts = range(0, x.shape[0], batch_seqs)
    for i, s0 in enumerate(tqdm(starts, desc="Clean outputs", disable=not progress)):
        path = folder / f"{tag}_{i:05d}.safetensors"
        if not path.is_file():
            clean = _clean_from_x(
                model, tokens[s0 : s0 + batch_seqs], x[s0 : s0 + batch_seqs], hook
            )
            final, got = model.continue_all(clean, clean.x.unsqueeze(1), reads=reads)
            part = {"final": final[:, 0].float().cpu()}
            part.update({r: got[r][:, 0].float().cpu() for r in reads})
            _atomic_save(part, path)
        for k, v in load_file(str(path)).items():
            out.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in out.items()}


def _clean_from_x(model: LensModel, tokens: Tensor, x: Tensor, hook: str) -> CleanRun:
    """A CleanRun to continue from cached ``x`` (resid hooks need no other state)."""
    h = model.parse_hook(hook)
    if h.kind not in ("hook_resid_pre", "hook_resid_post"):
        return model.run_clean(tokens.to(model.device), h)
    x = x.to(model.device, model.dtype)
    return CleanRun(tokens=tokens.to(model.device), hook=h, x=x, final=x)


# ---- losses --------------------------------------------------------------------------------


def default_ds_hooks(hook: str, n_layers: int, every: int = 4) -> list[str]:
    """resid_post of every ``every``-th layer from the hook's layer on, and the last layer."""
    layer = int(hook.split(".")[1])
    layers = sorted({*range(layer + every - 1, n_layers, every), n_layers - 1})
    return [f"blocks.{lay}.hook_resid_post" for lay in layers if lay >= layer]


# ---- training ------------------------------------------------------------------------------


def init_sae(cfg: SAEConfig, x_mean: Tensor, generator: torch.Generator) -> SAE:
    """Unit-norm random decoder rows, tied encoder, zero b_enc, b_dec at the data mean."""
    sae = SAE(cfg)
    w = torch.randn(cfg.d_sae, cfg.d_in, generator=generator)
    w = w / w.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_dec.copy_(x_mean)
    return sae


def normalize_decoder(sae: SAE) -> None:
    """Project decoder rows back to unit norm (after each step)."""
    with torch.no_grad():
        sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))


def fold_scale(sae: SAE, scale: float) -> SAE:
    """Fold an input scale ``c`` (trained on ``c x``) into the weights, as SAELens does."""
    with torch.no_grad():
        sae.W_enc.mul_(scale)
        sae.W_dec.div_(scale)
        sae.b_dec.div_(scale)
    return sae


def _lr_at(step: int, total: int, lr: float) -> float:
    """Constant, then linear decay to 0 over the last 20% of steps."""
    tail = max(1, total // 5)
    return lr * min(1.0, (total - step) / tail)


def _batches(n: int, size: int, seed: int, name: str, epoch: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(derive_seed(seed, name, epoch))
    perm = torch.randperm(n, generator=g)
    return [perm[i : i + size] for i in range(0, n - size + 1, size)] or [perm]


class _Step:
    """One SAE's loss on a batch of indices (tokens for local/topk, sequences for e2e).

    With ``first = 1`` (skip BOS) the BOS position is neither reconstructed nor substituted."""

    def __init__(
        self,
        spec: SAESpec,
        model: LensModel | None,
        hook: str,
        x: Tensor,
        scale: float,
        tokens: Tensor,
        clean: dict[str, Tensor] | None,
        ds_hooks: list[str],
        first: int = 0,
    ) -> None:
        self.spec, self.model, self.hook, self.scale = spec, model, hook, scale
        self.clean, self.ds_hooks, self.first = clean, ds_hooks, first
        self.e2e = spec.kind in ("e2e", "e2e+ds")
        if self.e2e:
            if clean is None or model is None:
                raise ValueError(f"SAE {spec.name!r} ({spec.kind}) needs the model's outputs.")
            n = clean["final"].shape[0]
            self.x, self.tokens = x[:n], tokens[:n]
            self.ds_norm = {
                h: float(clean[h][:, first:].pow(2).sum(-1).mean()) for h in clean if h in ds_hooks
            }
        else:
            self.x, self.tokens = x[:, first:].reshape(-1, x.shape[-1]), tokens

    @property
    def n(self) -> int:
        return self.x.shape[0]

    def __call__(self, sae: SAE, idx: Tensor) -> tuple[Tensor, dict[str, float]]:
        x = self.x[idx]
        xs = (x if not self.e2e else x[:, self.first :]) * self.scale
        f, x_hat = sae.encode_decode(xs)
        l1 = f.abs().sum(-1).mean()
        info = {"l0": float((f > 0).float().sum(-1).mean()), "l1": float(l1.detach())}
        if not self.e2e:
            mse = (x_hat - xs).pow(2).sum(-1).mean()
            info["mse"] = float(mse.detach())
            loss = mse + self.spec.l1 * l1 if self.spec.kind == "local" else mse
            return loss, info
        assert self.clean is not None and self.model is not None
        m, first = self.model, self.first
        clean = _clean_from_x(m, self.tokens[idx], x, self.hook)
        reads = self.ds_hooks if self.spec.kind == "e2e+ds" else []
        x_new = torch.cat([x[:, :first].to(x_hat.dtype), x_hat / self.scale], dim=1)
        final, got = m.continue_all_grad(clean, x_new.unsqueeze(1).to(m.dtype), reads=reads)
        clean_final = self.clean["final"][idx][:, first:].to(m.device)
        kl = token_kl(m.unembed(clean_final), m.unembed(final[:, 0, first:])).mean()
        loss = kl + self.spec.l1 * l1
        info["kl"] = float(kl.detach())
        if reads:
            ds = sum(
                (got[h][:, 0, first:].float() - self.clean[h][idx][:, first:].to(m.device))
                .pow(2)
                .sum(-1)
                .mean()
                / self.ds_norm[h]
                for h in reads
            ) / len(reads)
            loss = loss + self.spec.ds * ds
            info["ds"] = float(ds.detach())
        return loss, info


def train_one(
    spec: SAESpec,
    cfg: SAETrainConfig,
    step_fn: _Step,
    sae: SAE,
    folder: Path,
    *,
    progress: bool = True,
    max_seconds: float | None = None,
) -> tuple[SAE, dict[str, Any]]:
    """Train ``sae`` (in the scaled space) with Adam; checkpoint and resume in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    e2e = spec.kind in ("e2e", "e2e+ds")
    size = cfg.e2e_batch_seqs if e2e else cfg.batch_tokens
    epochs = spec.epochs or (cfg.e2e_epochs if e2e else cfg.epochs)
    per_epoch = len(_batches(step_fn.n, size, cfg.seed, spec.name, 0))
    total = max(1, math.ceil(epochs * per_epoch))
    lr = spec.lr or cfg.lr
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    ckpt = folder / "checkpoint.pt"
    step, seconds, log_rows = 0, 0.0, []
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["opt"])
        step, seconds, log_rows = state["step"], state["seconds"], state["log"]
        log.info("Resuming %s at step %d/%d", spec.name, step, total)
    bar = tqdm(total=total, initial=step, desc=f"Train {spec.name}", disable=not progress)
    t0 = time.perf_counter() - seconds
    epoch_batches: dict[int, list[Tensor]] = {}
    while step < total:
        epoch, i = divmod(step, per_epoch)
        if epoch not in epoch_batches:
            epoch_batches = {epoch: _batches(step_fn.n, size, cfg.seed, spec.name, epoch)}
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, total, lr)
        loss, info = step_fn(sae, epoch_batches[epoch][i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        normalize_decoder(sae)
        step += 1
        info = {"step": step, "loss": float(loss.detach()), **info}
        bar.set_postfix({k: round(v, 4) for k, v in info.items() if k != "step"}, refresh=False)
        bar.update(1)
        if step % 10 == 0 or step == total:
            log_rows.append(info)
        out_of_time = max_seconds is not None and time.perf_counter() - t0 > max_seconds
        if step % cfg.checkpoint_every == 0 or step == total or out_of_time:
            state = {
                "sae": sae.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "seconds": time.perf_counter() - t0,
                "log": log_rows,
            }
            atomic_write(ckpt, lambda f, state=state: torch.save(state, f))
        if out_of_time and step < total:
            bar.close()
            raise TimeoutError(f"{spec.name}: stopped at step {step}/{total}; resume to finish.")
    bar.close()
    return sae, {"steps": total, "seconds": round(time.perf_counter() - t0, 1), "log": log_rows}


def train_sae(
    cfg: SAETrainConfig,
    spec: SAESpec,
    x: Tensor,
    folder: str | Path,
    *,
    hook: str = "",
    model: LensModel | None = None,
    tokens: Tensor | None = None,
    clean: dict[str, Tensor] | None = None,
    ds_hooks: list[str] | None = None,
    init: str | Path | None = None,
    frame: str | None = None,
    progress: bool = True,
) -> SAE:
    """Train one SAE on activations ``x`` ([N, T, d]; [N, d] for local/topk) and save it as a
    SAELens folder in ``folder`` (resuming its checkpoint). e2e objectives need ``model``,
    ``tokens`` and the ``clean`` outputs; ``init`` is a SAELens folder to start from."""
    from perturb_lens.saes.io import load_saelens_folder

    folder = Path(folder)
    d = x.shape[-1]
    first = 1 if cfg.skip_bos and x.ndim == 3 else 0
    flat = (x[:, first:] if x.ndim == 3 else x).reshape(-1, d).float()
    scale = math.sqrt(d) / float(flat.norm(dim=-1).mean())
    sae_cfg = SAEConfig(
        d_in=d,
        d_sae=spec.d_sae or cfg.d_sae,
        activation="topk" if spec.kind == "topk" else "relu",
        k=spec.k,
        hook=hook,
        skip_bos=bool(first),
        frame=(frame or (model.frame if model is not None else "raw")),  # type: ignore[arg-type]
        model=cfg.model,
        metadata={"trained_by": "perturb-lens", "objective": spec.kind, **spec.model_dump()},
    )
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, spec.name, "init"))
    sae = init_sae(sae_cfg, flat.mean(0) * scale, gen)
    if init is not None:
        src = load_saelens_folder(init)
        fold_scale(src, 1.0 / scale)  # back to the scaled training space
        sae.load_state_dict(src.state_dict())
    if tokens is None:
        tokens = torch.zeros(x.shape[0], dtype=torch.long)
    step_fn = _Step(spec, model, hook, x, scale, tokens, clean, ds_hooks or [], first)
    sae, info = train_one(spec, cfg, step_fn, sae, folder, progress=progress)
    fold_scale(sae, scale).eval()
    sae.cfg.metadata.update({"train_seconds": info["seconds"], "steps": info["steps"]})
    sae.save(folder)
    (folder / "train_log.json").write_text(json.dumps(info, indent=1))
    return sae


def train_saes(
    cfg: SAETrainConfig,
    out: str | Path,
    *,
    model: LensModel | None = None,
    tokens: Tensor | None = None,
    progress: bool = True,
    only: list[str] | None = None,
) -> dict[str, Path]:
    """Train every SAE of ``cfg`` (or those named in ``only``) into ``out``, resuming whatever is
    there; return their folders. A finished SAE (its ``cfg.json`` exists) is skipped."""
    from perturb_lens.data import dataset_tokens
    from perturb_lens.models.load import load_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_json = cfg.model_dump(mode="json", exclude_defaults=True)
    cfg_file = out / "train_config.json"
    if cfg_file.is_file() and json.loads(cfg_file.read_text()) != cfg_json:
        raise ValueError(f"{out} holds SAEs of another training config; use another --out.")
    cfg_file.write_text(json.dumps(cfg_json, indent=1))
    todo = [s for s in cfg.saes if only is None or s.name in only]
    folders = {s.name: out / s.name for s in cfg.saes}
    pending = [s for s in todo if not (folders[s.name] / "cfg.json").is_file()]
    if pending:
        if model is None:
            model = load_model(cfg.model, frame=cfg.frame)
        if tokens is None:
            tokens = dataset_tokens(cfg.data, model, progress=progress)
        timings: dict[str, float] = {}
        hooks = list(dict.fromkeys(s.hook or cfg.hook for s in pending))
        for h in hooks:
            model.parse_hook(h)
        if len(hooks) > 1:  # one pass for all hooks; each group below then reads its cache
            t0 = time.perf_counter()
            dirs = {h: _cache_dir(cfg, h, out) for h in hooks}
            cache_activations(
                model, tokens, dirs, batch_seqs=cfg.cache_batch_seqs, progress=progress
            )
            timings["cache all hooks"] = round(time.perf_counter() - t0, 1)
        for hook in hooks:
            group = [s for s in pending if (s.hook or cfg.hook) == hook]
            timings.update(_train_at_hook(cfg, hook, group, model, tokens, out, progress))
        with open(out / "timings.jsonl", "a") as fh:
            fh.write(json.dumps(timings) + "\n")
    return {s.name: folders[s.name] for s in todo}


def _cache_dir(cfg: SAETrainConfig, hook: str, out: Path) -> Path:
    return out / "activations" / hook if hook != cfg.hook else out / "activations"


def _train_at_hook(
    cfg: SAETrainConfig,
    hook: str,
    specs: list[SAESpec],
    model: LensModel,
    tokens: Tensor,
    out: Path,
    progress: bool,
) -> dict[str, float]:
    """Cache the activations at ``hook`` and train ``specs`` there; return seconds per step."""
    t_cache = time.perf_counter()
    cache_dir = _cache_dir(cfg, hook, out)
    x = cache_activations(
        model, tokens, {hook: cache_dir}, batch_seqs=cfg.cache_batch_seqs, progress=progress
    )[hook]
    kinds = {s.kind for s in specs}
    ds_hooks = cfg.ds_hooks or default_ds_hooks(hook, model.spec.n_layers)
    clean = None
    if kinds & {"e2e", "e2e+ds"}:
        n = min(cfg.e2e_seqs, x.shape[0])
        clean = cache_clean_outputs(
            model,
            tokens[:n],
            x[:n],
            hook,
            ds_hooks if "e2e+ds" in kinds else [],
            cache_dir,
            batch_seqs=cfg.cache_batch_seqs,
            progress=progress,
        )
    timings = {f"cache {hook}": round(time.perf_counter() - t_cache, 1)}
    for spec in specs:
        t0 = time.perf_counter()
        train_sae(
            cfg,
            spec,
            x,
            out / spec.name,
            hook=hook,
            model=model,
            tokens=tokens,
            clean=clean,
            ds_hooks=ds_hooks,
            init=out / spec.init_from if spec.init_from else None,
            progress=progress,
        )
        timings[spec.name] = round(time.perf_counter() - t0, 1)
    return timings
