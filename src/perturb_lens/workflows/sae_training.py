"""Train SAEs on cached activations: ReLU + L1 (``local``), ``topk``, ``e2e`` and ``e2e+ds``.

Objectives (Braun et al., "Identifying functionally important features with end-to-end sparse
dictionary learning"), with ``f = encode(x)`` and ``x_hat = SAE(x)``:

- ``local``: ``||x_hat - x||^2 + l1 * ||f||_1`` (decoder rows kept at unit norm);
- ``topk``: ``||x_hat - x||^2`` with the ``k`` largest latents per token;
- ``e2e``: ``KL(p_clean || p_SAE) + l1 * ||f||_1``, where ``p_SAE`` is the model's output with
  ``x_hat`` substituted at the hook (gradients flow through the rest of the model);
- ``e2e+ds``: ``e2e`` plus ``ds * mean_h ||h_SAE - h_clean||^2 / E||h_clean||^2`` over downstream
  hooks ``h`` (normalised per hook, since residual norms grow with depth).

Recipes (:mod:`perturb_lens.saes.recipes`): TopK adds the AuxK dead-latent loss (``aux_coef``,
1/32 by default; dead = not fired in the last ``dead_tokens`` training tokens); ReLU SAEs resample
dead latents at the ``resample_at`` fractions of training; decoder rows stay at unit norm
(gradient projection, then renormalisation); the learning rate warms up, then decays (linear or
cosine); the L1 coefficient warms up; ``b_dec`` starts at the geometric median (or the mean).

Activations are scaled by one dataset-wide factor ``c`` so that ``E||x|| = sqrt(d_in)`` while
training (SAELens' ``expected_average_only_in``); ``c`` is folded into the saved biases (the
latents come out divided by ``c``, the decoder rows stay unit), so the SAE reads raw activations.
Reconstruction MSE is summed over ``d_in`` and averaged over tokens.

local and topk SAEs stream their tokens from a chunked disk cache (``<out>/activations/<hook>``,
:mod:`perturb_lens.saes.cache`): computed through the model prefix only, BOS and outlier-norm
tokens stored apart (not trained on), read back in seeded shuffled buffers, so the token count is
bounded by disk. e2e objectives keep whole sequences (``<out>/activations/<hook>/e2e``) of the first
``e2e_seqs`` rows, plus their clean final hidden states and downstream activations. With
``eval_data`` set, each SAE is evaluated on that held-out text (``eval.json``: per token group
metrics, dead fraction, CE increase; :mod:`perturb_lens.saes.evaluate`). Each SAE writes
``<out>/<name>/checkpoint.pt`` every ``checkpoint_every`` steps (atomic) and, when done, a SAELens
folder ``<out>/<name>/`` (``cfg.json`` + ``sae_weights.safetensors``) and ``train_log.json``
(with tokens/s). The batch order is a function of (seed, SAE name, epoch), so a resumed SAE trains
exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor
from tqdm.auto import tqdm

from perturb_lens.common.files import UnreadableFileError, first_few, load_json, torch_load
from perturb_lens.common.locks import LOCK, acquire_lock, release_lock
from perturb_lens.common.names import check_folder_name
from perturb_lens.common.seeds import derive_seed
from perturb_lens.config.options import FRAMES
from perturb_lens.config.schema import (
    ConfigError,
    DataConfig,
    check_run_name,
    explain,
    read_config_file,
)
from perturb_lens.models.base import LensModel
from perturb_lens.results.store import atomic_write, atomic_write_json, diff_configs
from perturb_lens.saes.cache import (
    ActivationCache,
    ActivationSource,
    CacheDtype,
    MemoryActivations,
)
from perturb_lens.saes.e2e_cache import (
    cache_activations,
    cache_clean_outputs,
    clean_from_x,
    default_ds_hooks,
)
from perturb_lens.saes.quality import token_kl
from perturb_lens.saes.recipes import (
    Decay,
    aux_k_loss,
    geometric_median,
    lr_factor,
    normalize_decoder,
    project_decoder_grad,
    resample_dead,
    sparse_decode,
    topk_encode,
    warmup_factor,
)
from perturb_lens.saes.sae import SAE, SAEConfig

log = logging.getLogger(__name__)

KINDS = ("local", "topk", "e2e", "e2e+ds")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SAETrainEntry(_Strict):
    """One SAE to train; unset fields take the set's defaults."""

    name: str
    kind: Literal["local", "topk", "e2e", "e2e+ds"]
    l1: float = Field(0.0, ge=0, description="sparsity coefficient (local, e2e, e2e+ds)")
    k: int | None = Field(
        None,
        ge=1,
        description="latents per token (topk; with e2e/e2e+ds: a TopK e2e SAE, whose L0 is k, "
        "so it compares with a topk SAE of the same k at exactly matched L0)",
    )
    ds: float = Field(1.0, ge=0, description="downstream reconstruction coefficient (e2e+ds)")
    d_sae: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0, description="passes over the training tokens")
    init_from: str | None = Field(None, description="start from another SAE of this set")
    hook: str | None = Field(None, description="train at this hook instead of the set's")
    aux_coef: float = Field(1 / 32, ge=0, description="AuxK dead-latent loss coefficient (topk)")
    aux_k: int | None = Field(None, ge=1, description="dead latents in the AuxK loss; None = d/2")
    resample_at: list[float] = Field(
        default_factory=list,
        description="fractions of training at which dead latents are resampled (local)",
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return check_folder_name(v, "SAE name", "--out/NAME (its SAELens folder)")

    @model_validator(mode="after")
    def _check(self) -> SAETrainEntry:
        if self.kind == "topk" and self.k is None:
            raise ValueError(f"SAE {self.name!r}: kind topk needs k")
        if self.kind == "local" and self.k is not None:
            raise ValueError(f"SAE {self.name!r}: kind local is ReLU + L1; use kind topk for k")
        needs_l1 = self.kind == "local" or (self.kind != "topk" and self.k is None)
        if needs_l1 and self.l1 <= 0 and self.init_from is None:
            raise ValueError(f"SAE {self.name!r}: kind {self.kind} needs l1 > 0 (or k for TopK)")
        return self

    @property
    def activation(self) -> str:
        """The SAE's nonlinearity: TopK when ``k`` is set (topk, or a TopK e2e SAE), else ReLU."""
        return "topk" if self.k is not None else "relu"


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
    cache_batch_seqs: int = Field(16, ge=1, description="rows per forward pass and cache chunk")
    skip_bos: bool = Field(
        True,
        description="train without the BOS position (an outlier: its norm is ~25,000 against "
        "~160 elsewhere at SmolLM2's layer 15); the SAE then leaves BOS alone (SAEConfig.skip_bos)",
    )
    seed: int = 0
    lr_warmup: float = Field(0.01, ge=0, le=1, description="fraction of steps warming up the lr")
    lr_decay: Decay = Field("linear", description="shape of the lr decay to 0")
    lr_decay_fraction: float = Field(0.2, ge=0, le=1, description="fraction of steps decaying")
    l1_warmup: float = Field(0.05, ge=0, le=1, description="fraction of steps warming up l1")
    b_dec_init: Literal["geometric_median", "mean"] = "geometric_median"
    dead_tokens: int = Field(
        100_000, ge=1, description="a latent is dead after this many tokens without firing"
    )
    resample_tokens: int = Field(8192, ge=1, description="inputs resampling draws from")
    init_tokens: int = Field(65536, ge=1, description="tokens that set the scale and b_dec")
    cache_dtype: CacheDtype = Field("float32", description="dtype of the cached activations")
    buffer_chunks: int = Field(8, ge=1, description="cache chunks shuffled together")
    outlier_factor: float | None = Field(
        10.0, gt=0, description="tokens above this x the chunk's median norm are kept out"
    )
    eval_data: DataConfig | None = Field(None, description="held-out text for eval.json")
    eval_ce_seqs: int = Field(64, ge=0, description="held-out rows the CE increase runs on")
    saes: list[SAETrainEntry]

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return check_run_name(v)  # the default --out is runs/NAME

    @model_validator(mode="after")
    def _check(self) -> SAETrainConfig:
        ev, src = self.eval_data, self.data.source
        local = src in ("default",) or src.startswith("builtin:") or Path(src).expanduser().exists()
        if ev is not None and ev.source == src and (local or ev.split == self.data.split):
            raise ValueError(
                f"eval_data reads the training text ({ev.source}, split {ev.split}): held-out "
                "metrics need other text; point eval_data.source to another file or split."
            )
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

    from perturb_lens.config.schema import apply_overrides

    data = apply_overrides(read_config_file(path), overrides or [])
    try:
        return SAETrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            explain(err, SAETrainConfig, f"Invalid SAE training config {path}")
        ) from None


# ---- training ------------------------------------------------------------------------------


def init_sae(cfg: SAEConfig, b_dec: Tensor, generator: torch.Generator) -> SAE:
    """Unit-norm random decoder rows, tied encoder, zero b_enc, ``b_dec`` as given."""
    sae = SAE(cfg)
    w = torch.randn(cfg.d_sae, cfg.d_in, generator=generator)
    w = w / w.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_dec.copy_(b_dec)
    return sae


def fold_scale(sae: SAE, scale: float) -> SAE:
    """Fold an input scale ``c`` (trained on ``c x``) into the weights: ``b_enc, b_dec /= c``, so
    the latents come out divided by ``c`` and the decoder rows keep unit norm (ReLU and TopK are
    positively homogeneous)."""
    with torch.no_grad():
        sae.b_enc.div_(scale)
        sae.b_dec.div_(scale)
    return sae


def _batches(n: int, size: int, seed: int) -> list[Tensor]:
    """Index batches of one e2e epoch (a seeded permutation; the last partial batch dropped)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [perm[i : i + size] for i in range(0, n - size + 1, size)] or [perm]


class _Step:
    """One SAE's loss on a batch: activations [B, d] (local, topk) or sequence indices (e2e).

    With ``first = 1`` (skip BOS) the BOS position is neither reconstructed nor substituted.
    ``dead`` (bool [d_sae], set by the training loop) selects the AuxK latents; ``fired`` holds
    the latents that fired on the last batch."""

    def __init__(
        self,
        spec: SAETrainEntry,
        model: LensModel | None,
        hook: str,
        x: Tensor | None,
        scale: float,
        tokens: Tensor | None,
        clean: dict[str, Tensor] | None,
        ds_hooks: list[str],
        first: int = 0,
    ) -> None:
        self.spec, self.model, self.hook, self.scale = spec, model, hook, scale
        self.clean, self.ds_hooks, self.first = clean, ds_hooks, first
        self.e2e = spec.kind in ("e2e", "e2e+ds")
        self.l1 = spec.l1
        self.dead: Tensor | None = None
        self.fired: Tensor | None = None
        if self.e2e:
            if clean is None or model is None or x is None or tokens is None:
                raise ValueError(f"SAE {spec.name!r} ({spec.kind}) needs the model's outputs.")
            n = clean["final"].shape[0]
            self.x, self.tokens = x[:n], tokens[:n]
            self.ds_norm = {
                h: float(clean[h][:, first:].pow(2).sum(-1).mean()) for h in clean if h in ds_hooks
            }

    def __call__(self, sae: SAE, batch: Tensor) -> tuple[Tensor, dict[str, float]]:
        if not self.e2e:
            return self._local(sae, batch)
        x = self.x[batch]
        xs = x[:, self.first :] * self.scale
        f, x_hat = sae.encode_decode(xs)
        l1 = f.abs().sum(-1).mean()
        self.fired = (f > 0).reshape(-1, f.shape[-1]).any(0)
        info = {"l0": float((f > 0).float().sum(-1).mean()), "l1": float(l1.detach())}
        assert self.clean is not None and self.model is not None
        m, first = self.model, self.first
        clean = clean_from_x(m, self.tokens[batch], x, self.hook)
        reads = self.ds_hooks if self.spec.kind == "e2e+ds" else []
        x_new = torch.cat([x[:, :first].to(x_hat.dtype), x_hat / self.scale], dim=1)
        final, got = m.continue_all_grad(clean, x_new.unsqueeze(1).to(m.dtype), reads=reads)
        clean_final = self.clean["final"][batch][:, first:].to(m.device)
        kl = token_kl(m.unembed(clean_final), m.unembed(final[:, 0, first:])).mean()
        loss = kl + self.l1 * l1
        info["kl"] = float(kl.detach())
        if reads:
            ds = sum(
                (got[h][:, 0, first:].float() - self.clean[h][batch][:, first:].to(m.device))
                .pow(2)
                .sum(-1)
                .mean()
                / self.ds_norm[h]
                for h in reads
            ) / len(reads)
            loss = loss + self.spec.ds * ds
            info["ds"] = float(ds.detach())
        return loss, info

    def _local(self, sae: SAE, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        """MSE (+ L1 for local, + AuxK for topk) on activations ``x`` [B, d]."""
        xs = x * self.scale
        if self.spec.kind == "topk":  # sparse forward/backward: only the k selected latents
            vals, idx = topk_encode(sae, xs)
            x_hat = sparse_decode(sae.W_dec, idx, vals) + sae.b_dec
            on = vals > 0
            self.fired = torch.zeros(sae.d_sae, dtype=torch.bool)
            self.fired[idx[on]] = True
            l0, l1 = on.float().sum(-1).mean(), vals.sum(-1).mean()
        else:
            f = sae.activation(sae.pre_activation(xs))
            x_hat = sae.decode(f)
            self.fired = (f > 0).any(0)
            l0, l1 = (f > 0).float().sum(-1).mean(), f.abs().sum(-1).mean()
        mse = (x_hat - xs).pow(2).sum(-1).mean()
        info = {"l0": float(l0), "l1": float(l1.detach()), "mse": float(mse.detach())}
        if self.spec.kind == "local":
            return mse + self.l1 * l1, info
        loss = mse
        if self.dead is not None and self.spec.aux_coef > 0:
            k_aux = self.spec.aux_k or sae.d_in // 2
            aux = aux_k_loss(sae, xs, (xs - x_hat).detach(), self.dead, k_aux)
            info["aux"] = float(aux.detach())
            loss = loss + self.spec.aux_coef * aux
        return loss, info


class _Schedule:
    """Steps of one SAE: total, per epoch, and the batch stream of an epoch from a step on."""

    def __init__(
        self, spec: SAETrainEntry, cfg: SAETrainConfig, step_fn: _Step, source: Any
    ) -> None:
        e2e = spec.kind in ("e2e", "e2e+ds")
        self.size = cfg.e2e_batch_seqs if e2e else cfg.batch_tokens
        epochs = spec.epochs or (cfg.e2e_epochs if e2e else cfg.epochs)
        self.seed, self.name, self.source, self.e2e = cfg.seed, spec.name, source, e2e
        if e2e:
            self.per_epoch = len(_batches(step_fn.x.shape[0], self.size, 0))
        else:
            self.per_epoch = math.ceil(source.n_tokens / self.size)
        self.total = max(1, math.ceil(epochs * self.per_epoch))

    def stream(self, step: int) -> Any:
        """Batches from ``step`` on (crossing epochs), each epoch in its own seeded order."""
        epoch, i = divmod(step, self.per_epoch)
        while True:
            seed = derive_seed(self.seed, self.name, epoch)
            if self.e2e:
                n = self.source.x.shape[0]
                yield from _batches(n, self.size, seed)[i:]
            else:
                yield from self.source.batches(self.size, seed, start=i)
            epoch, i = epoch + 1, 0


def train_one(
    spec: SAETrainEntry,
    cfg: SAETrainConfig,
    step_fn: _Step,
    sae: SAE,
    folder: Path,
    *,
    source: ActivationSource | None = None,
    progress: bool = True,
    max_seconds: float | None = None,
) -> tuple[SAE, dict[str, Any]]:
    """Train ``sae`` (in the scaled space) with Adam on ``source`` (local/topk) or the sequences
    of ``step_fn`` (e2e); checkpoint and resume in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = _Schedule(spec, cfg, step_fn, step_fn if source is None else source)
    total, lr = plan.total, spec.lr or cfg.lr
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    ckpt = folder / "checkpoint.pt"
    step, seconds, n_tokens, log_rows = 0, 0.0, 0, []
    since_fired = torch.zeros(sae.d_sae, dtype=torch.long)  # tokens since each latent fired
    last_resample = 0
    if ckpt.exists():
        state = _load_checkpoint(ckpt, sae, opt, spec.name)
        step, seconds, log_rows = state["step"], state["seconds"], state["log"]
        n_tokens, since_fired = state["tokens"], state["since_fired"]
        last_resample = state["last_resample"]
        log.info("Resuming %s at step %d/%d", spec.name, step, total)
    resample_steps = {max(1, round(f * total)) for f in spec.resample_at} if not plan.e2e else set()
    bar = tqdm(total=total, initial=step, desc=f"Train {spec.name}", disable=not progress)
    t0 = time.perf_counter() - seconds
    batches = plan.stream(step)
    while step < total:
        batch = next(batches)
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(
                step, total, cfg.lr_warmup, cfg.lr_decay, cfg.lr_decay_fraction
            )
        step_fn.l1 = spec.l1 * warmup_factor(step, total, cfg.l1_warmup)
        step_fn.dead = since_fired >= cfg.dead_tokens
        loss, info = step_fn(sae, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        project_decoder_grad(sae)
        opt.step()
        normalize_decoder(sae)
        n_batch = batch.shape[0] * (1 if not plan.e2e else step_fn.x.shape[1] - step_fn.first)
        n_tokens += n_batch
        since_fired += n_batch
        if step_fn.fired is not None:
            since_fired[step_fn.fired.cpu()] = 0
        step += 1
        if step in resample_steps and source is not None:
            window = min(cfg.dead_tokens, n_tokens - last_resample)
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, spec.name, "resample", step))
            xs = source.sample(cfg.resample_tokens, derive_seed(cfg.seed, spec.name, step))
            dead = since_fired >= window
            info["resampled"] = resample_dead(sae, opt, dead, xs * step_fn.scale, gen)
            since_fired[dead] = 0
            last_resample = n_tokens
        info = {"step": step, "loss": float(loss.detach()), **info}
        if not math.isfinite(info["loss"]):  # before a checkpoint keeps the diverged weights
            bar.close()
            raise FloatingPointError(
                f"SAE {spec.name!r} diverged at step {step}/{total}: its loss is {info['loss']} "
                f"(lr {lr:g}), and its weights are not saved. Lower its lr (saes: - name: "
                f"{spec.name}, lr: ...) and train it again into a new --out."
            )
        info["dead"] = float((since_fired >= cfg.dead_tokens).float().mean())
        bar.set_postfix({k: round(v, 4) for k, v in info.items() if k != "step"}, refresh=False)
        bar.update(1)
        if step % 10 == 0 or step == total or "resampled" in info:
            log_rows.append(info)
        out_of_time = max_seconds is not None and time.perf_counter() - t0 > max_seconds
        if step % cfg.checkpoint_every == 0 or step == total or out_of_time:
            state = {
                "sae": sae.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "seconds": time.perf_counter() - t0,
                "tokens": n_tokens,
                "since_fired": since_fired,
                "last_resample": last_resample,
                "log": log_rows,
            }
            atomic_write(ckpt, lambda f, state=state: torch.save(state, f))
        if out_of_time and step < total:
            bar.close()
            raise TimeoutError(f"{spec.name}: stopped at step {step}/{total}; resume to finish.")
    bar.close()
    secs = time.perf_counter() - t0
    info = {"steps": total, "tokens": n_tokens, "seconds": round(secs, 1)}
    info["tokens_per_s"] = round(n_tokens / max(secs, 1e-9), 1)
    return sae, {**info, "log": log_rows}


_CHECKPOINT_KEYS = ("sae", "opt", "step", "seconds", "tokens", "since_fired", "last_resample")


def _load_checkpoint(path: Path, sae: SAE, opt: torch.optim.Optimizer, name: str) -> dict:
    """A training checkpoint, read with ``weights_only=True`` (tensors and plain containers: a
    pickle that would run code is refused), loaded into ``sae`` and ``opt``; anything else raises
    an :class:`UnreadableFileError` saying to delete it."""
    fix = f"delete it to train SAE {name!r} from the start"
    try:
        state = torch_load(path, "training checkpoint")
    except UnreadableFileError as e:
        raise UnreadableFileError(f"{e}: {fix}.") from None
    keys = (*_CHECKPOINT_KEYS, "log")
    missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
    problem = f"it lacks {missing}" if missing else None
    if problem is None:
        try:
            sae.load_state_dict(state["sae"])
            opt.load_state_dict(state["opt"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:  # shapes, foreign layouts
            problem = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    if problem is not None:
        raise UnreadableFileError(
            f"{path} is not a checkpoint of SAE {name!r} as this config trains it ({problem}): "
            f"written by another training, or damaged; {fix}."
        )
    return state


def _init_stats(source: ActivationSource, cfg: SAETrainConfig) -> tuple[float, Tensor]:
    """The scale ``c`` (``E||c x|| = sqrt(d)``) and ``b_dec`` (in the scaled space), from up to
    ``init_tokens`` training tokens."""
    xs = source.sample(cfg.init_tokens, derive_seed(cfg.seed, "init-tokens")).float()
    scale = math.sqrt(xs.shape[-1]) / float(xs.norm(dim=-1).mean())
    center = geometric_median(xs) if cfg.b_dec_init == "geometric_median" else xs.mean(0)
    return scale, center * scale


def train_sae(
    cfg: SAETrainConfig,
    spec: SAETrainEntry,
    x: Tensor | ActivationSource,
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
    """Train one SAE and save it as a SAELens folder in ``folder`` (resuming its checkpoint).

    ``x``: an :class:`ActivationSource` (local/topk), or activations [N, T, d] (BOS first; e2e
    needs these) or [N, d]. e2e objectives need ``model``, ``tokens`` and the ``clean`` outputs;
    ``init`` is a SAELens folder to start from."""
    from perturb_lens.saes.io import load_saelens_folder

    folder = Path(folder)
    e2e = spec.kind in ("e2e", "e2e+ds")
    seqs = x if isinstance(x, Tensor) and x.ndim == 3 else None
    first = 1 if cfg.skip_bos and seqs is not None else 0
    if e2e and seqs is None:
        raise ValueError(f"SAE {spec.name!r} ({spec.kind}) trains on sequences [N, T, d].")
    if isinstance(x, Tensor):
        source: ActivationSource = MemoryActivations(
            (x[:, first:] if x.ndim == 3 else x).reshape(-1, x.shape[-1])
        )
    else:
        source = x
    scale, b_dec = _init_stats(source, cfg)
    d = b_dec.shape[0]
    skip_bos = bool(first) or (not isinstance(x, Tensor) and cfg.skip_bos)
    fingerprint = {}
    if model is not None:
        from perturb_lens.models.fingerprint import model_fingerprint

        fingerprint = {"model_fingerprint": model_fingerprint(model)}
    sae_cfg = SAEConfig(
        d_in=d,
        d_sae=spec.d_sae or cfg.d_sae,
        activation=spec.activation,
        k=spec.k,
        hook=hook,
        skip_bos=skip_bos,
        frame=(frame or (model.frame if model is not None else "raw")),  # type: ignore[arg-type]
        model=cfg.model,
        metadata={
            "trained_by": "perturb-lens",
            "objective": spec.kind,
            **spec.model_dump(),
            **fingerprint,
        },
    )
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, spec.name, "init"))
    sae = init_sae(sae_cfg, b_dec, gen)
    if init is not None:
        src = load_saelens_folder(init)
        fold_scale(src, 1.0 / scale)  # back to the scaled training space
        sae.load_state_dict(src.state_dict())
    step_fn = _Step(spec, model, hook, seqs, scale, tokens, clean, ds_hooks or [], first)
    sae, info = train_one(
        spec, cfg, step_fn, sae, folder, source=None if e2e else source, progress=progress
    )
    fold_scale(sae, scale).eval()
    sae.cfg.metadata.update({k: info[k] for k in ("seconds", "steps", "tokens", "tokens_per_s")})
    sae.save(folder)
    atomic_write_json(folder / "train_log.json", info)
    log.info(
        "%s: %d tokens in %.0f s (%.0f tokens/s)",
        spec.name,
        info["tokens"],
        info["seconds"],
        info["tokens_per_s"],
    )
    return sae


TRAIN_CONFIG = "train_config.json"


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
    there; return their folders. A finished SAE (its ``cfg.json`` exists) is skipped.

    ``out`` must be new, empty, or hold a training of this config; it is locked while training
    (a second training there is refused). The model, the text and the hooks are checked before
    ``train_config.json`` is written, and what a failed check made (the folder, its lock) is
    removed again, so the corrected command starts afresh."""
    from perturb_lens.data.text import dataset_tokens
    from perturb_lens.models.load import load_model

    out = Path(out)
    names = [s.name for s in cfg.saes]
    unknown = [n for n in only or [] if n not in names]
    if unknown:
        raise ValueError(f"--only {unknown[0]!r} names no SAE of the config; its SAEs: {names}.")
    _check_training_folder(out)
    made = [p for p in (out, out / LOCK) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(out, "SAE training")
    started = False
    try:
        cfg_json = cfg.model_dump(mode="json", exclude_defaults=True)
        _check_same_training(out, cfg_json)
        todo = [s for s in cfg.saes if only is None or s.name in only]
        folders = {s.name: out / s.name for s in cfg.saes}
        pending = [s for s in todo if not (folders[s.name] / "cfg.json").is_file()]
        hooks = list(dict.fromkeys(s.hook or cfg.hook for s in pending))
        if pending:
            if model is None:
                model = load_model(cfg.model, frame=cfg.frame)
            for h in hooks:
                model.parse_hook(h)  # hooks name folders (activations/HOOK): checked first
            if tokens is None:
                tokens = dataset_tokens(cfg.data, model, progress=progress)
        eval_tokens = None
        if pending and cfg.eval_data is not None:
            eval_tokens = dataset_tokens(cfg.eval_data, model, progress=progress)
        atomic_write_json(out / TRAIN_CONFIG, cfg_json)
        started = True
        timings: dict[str, float] = {}
        for hook in hooks:
            assert model is not None and tokens is not None
            group = [s for s in pending if (s.hook or cfg.hook) == hook]
            run = _HookRun(cfg, hook, model, tokens, out, progress)
            timings.update(run.train(group, eval_tokens))
        if pending:
            with open(out / "timings.jsonl", "a") as fh:
                fh.write(json.dumps(timings) + "\n")
    finally:
        release_lock(lock)
        if not started:  # a failed check: leave no trace that would block the corrected command
            for path in reversed(made):
                with contextlib.suppress(OSError):
                    if path.name == LOCK:
                        path.unlink()
                    else:
                        path.rmdir()  # only if empty: a folder that holds anything stays
    return {s.name: folders[s.name] for s in todo}


def _check_training_folder(out: Path) -> None:
    """Refuse an existing ``out`` that holds anything but a training (or a lock): SAE folders are
    not written among someone's files."""
    if not out.is_dir() or (out / TRAIN_CONFIG).exists():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    if foreign:
        raise FileExistsError(
            f"{out} is not empty and holds no SAE training ({first_few(foreign)}): a training "
            f"gets a folder of its own. Choose a new or empty --out (e.g. --out {out / 'saes'})."
        )


def _check_same_training(out: Path, cfg_json: dict[str, Any]) -> None:
    """Refuse to add to ``out`` when its ``train_config.json`` records another config (naming
    the keys that differ)."""
    path = out / TRAIN_CONFIG
    if not path.exists():
        return
    old = load_json(path, "an SAE training config")
    if old == cfg_json:
        return
    diffs = diff_configs(old, cfg_json) if isinstance(old, dict) else [("(whole file)", old, "")]
    lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in diffs)
    raise ValueError(
        f"{out} holds SAEs trained with another config ({path}). Differing keys (recorded -> "
        f"now):\n{lines}\nTrain with the recorded config to resume, or choose another --out (or "
        f"delete {out} to discard that training)."
    )


class _HookRun:
    """The caches at one hook (streamed tokens, e2e sequences, held-out) and its SAEs' training."""

    def __init__(
        self,
        cfg: SAETrainConfig,
        hook: str,
        model: LensModel,
        tokens: Tensor,
        out: Path,
        progress: bool,
    ) -> None:
        self.cfg, self.hook, self.model, self.tokens, self.out = cfg, hook, model, tokens, out
        self.progress = progress
        self.dir = out / "activations" / hook

    def _cache(self, tokens: Tensor, folder: Path) -> ActivationCache:
        c = self.cfg
        return ActivationCache.build(
            self.model,
            tokens,
            self.hook,
            folder,
            batch_seqs=c.cache_batch_seqs,
            dtype=c.cache_dtype,
            skip_bos=c.skip_bos,
            outlier_factor=c.outlier_factor,
            progress=self.progress,
            buffer_chunks=c.buffer_chunks,
        )

    def train(self, specs: list[SAETrainEntry], eval_tokens: Tensor | None) -> dict[str, float]:
        """Cache what ``specs`` need, train them, evaluate them; return seconds per stage."""
        cfg, model, hook = self.cfg, self.model, self.hook
        t0 = time.perf_counter()
        kinds = {s.kind for s in specs}
        source = self._cache(self.tokens, self.dir) if kinds & {"local", "topk"} else None
        ds_hooks = cfg.ds_hooks or default_ds_hooks(hook, model.spec.n_layers)
        seqs = clean = None
        if kinds & {"e2e", "e2e+ds"}:
            n = min(cfg.e2e_seqs, self.tokens.shape[0])
            e2e_dir = self.dir / "e2e"
            seqs = cache_activations(
                model,
                self.tokens[:n],
                {hook: e2e_dir},
                batch_seqs=cfg.cache_batch_seqs,
                progress=self.progress,
            )[hook]
            reads = ds_hooks if "e2e+ds" in kinds else []
            clean = cache_clean_outputs(
                model,
                self.tokens[:n],
                seqs,
                hook,
                reads,
                e2e_dir,
                batch_seqs=cfg.cache_batch_seqs,
                progress=self.progress,
            )
        timings = {f"cache {hook}": round(time.perf_counter() - t0, 1)}
        heldout = None
        for spec in specs:
            t0 = time.perf_counter()
            e2e = spec.kind in ("e2e", "e2e+ds")
            sae = train_sae(
                cfg,
                spec,
                seqs if e2e else source,  # type: ignore[arg-type]
                self.out / spec.name,
                hook=hook,
                model=model,
                tokens=self.tokens,
                clean=clean,
                ds_hooks=ds_hooks,
                init=self.out / spec.init_from if spec.init_from else None,
                progress=self.progress,
            )
            timings[spec.name] = round(time.perf_counter() - t0, 1)
            if eval_tokens is not None:
                from perturb_lens.saes.evaluate import heldout_eval

                heldout = heldout or self._cache(eval_tokens, self.out / "heldout" / hook)
                result = heldout_eval(
                    sae, heldout, model, eval_tokens[: cfg.eval_ce_seqs], progress=self.progress
                )
                atomic_write_json(self.out / spec.name / "eval.json", result)
        return timings
