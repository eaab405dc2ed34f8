"""TransformerLens ``HookedTransformer`` objects as lens models, with their own weights.

Native path (:class:`HookedTransformerLens`): the processed weights (folded LayerNorm, centered
writing weights, folded value biases, centered unembedding: whatever the object holds) go into the
native block forward as they are, so hook activations are the object's own. TransformerLens'
layouts map as ``W_Q [H, d, dh] -> q_w [H*dh, d]``, ``W_O [H, dh, d] -> o_w [d, H*dh]``,
``W_in [d, m] -> in_w [m, d]``; a folded norm (``LNPre``/``RMSPre``) has unit weight; rotary
angles come from each attention module's own tables. Configs the native block does not compute
(:func:`native_blockers`) run on :class:`HookedGenericLens`: the object's forward, with PyTorch
hooks on its hook points. Either way the lens is checked against the object's forward at load.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from perturb_lens.common.hooks import Hook
from perturb_lens.models.base import ModelSpec
from perturb_lens.models.generic import GenericLens
from perturb_lens.models.layers import ACTIVATIONS
from perturb_lens.models.native import NativeLens

log = logging.getLogger(__name__)

FAMILY = "transformer-lens"
# config flags (attribute, value that the native block computes)
_PLAIN_FLAGS = {
    "attn_only": False,
    "use_qk_norm": False,
    "clip_qkv": None,
    "use_logn_attn": False,
    "use_local_attn": False,
    "use_dynamic_ntk_rope": False,
    "rotary_adjacent_pairs": False,
    "scale_attn_by_inverse_layer_idx": False,
    "final_rms": False,
    "post_embedding_ln": False,
    "use_normalization_before_and_after": False,
    "use_attention_sinks": False,
    "num_experts": None,
    "attention_dir": "causal",
    "n_devices": 1,
}
_PROBE_LEN = 8  # tokens of the load-time check against the object's forward


def native_blockers(cfg: Any) -> list[str]:
    """Why the native block cannot compute this HookedTransformerConfig ([] when it can)."""
    out = [
        f"{k}={getattr(cfg, k)!r}"
        for k, want in _PLAIN_FLAGS.items()
        if getattr(cfg, k, want) != want
    ]
    if cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre"):
        out.append(f"normalization_type={cfg.normalization_type!r}")
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        out.append(f"positional_embedding_type={cfg.positional_embedding_type!r}")
    if cfg.act_fn not in ACTIVATIONS:
        out.append(f"act_fn={cfg.act_fn!r}")
    if cfg.use_attn_scale and not math.isclose(cfg.attn_scale, math.sqrt(cfg.d_head)):
        out.append(f"attn_scale={cfg.attn_scale} (not sqrt(d_head))")
    if not cfg.use_attn_scale:
        out.append("use_attn_scale=False")
    if getattr(cfg, "attn_types", None) and any(t != "global" for t in cfg.attn_types):
        out.append("local attention layers")
    for cap in ("attn_scores_soft_cap", "output_logits_soft_cap"):
        if getattr(cfg, cap, -1.0) > 0:
            out.append(f"{cap}={getattr(cfg, cap)}")
    return out


def _writers(ht: Any) -> list[Tensor]:
    """The weights that write to the residual stream, d_model on the last axis."""
    out = [ht.embed.W_E]
    if ht.cfg.positional_embedding_type == "standard":
        out.append(ht.pos_embed.W_pos)
    for block in ht.blocks:
        out += [block.attn.W_O, block.attn.b_O]
        if not ht.cfg.attn_only:
            out += [block.mlp.W_out, block.mlp.b_out]
    return out


def _zero_mean(ws: list[Tensor], dim: int = -1) -> bool:
    """Whether every tensor has zero mean along ``dim`` up to rounding: the mean of a centered
    weight is a sum of d roundings of at most eps * max|w| each, divided by d, so <= eps * max|w|
    (eps of float32 at least: TransformerLens processes float64 weights to float32 accuracy, as
    measured); 64 eps leaves room for the centering's own subtraction. A raw weight's mean is
    ~max|w| / sqrt(d), far above."""
    for w in ws:
        w = w.detach()
        eps = max(torch.finfo(w.dtype).eps, torch.finfo(torch.float32).eps)
        if w.mean(dim).abs().max() > 64 * eps * w.abs().max().clamp_min(1e-30):
            return False
    return True


def detect_frame(ht: Any) -> tuple[str, dict[str, bool]]:
    """The residual frame of a HookedTransformer's weights and the processing they show."""
    cfg = ht.cfg
    centered = cfg.normalization_type in ("LN", "LNPre") and _zero_mean(_writers(ht))
    processing = {
        "fold_ln": cfg.normalization_type in ("LNPre", "RMSPre"),
        "center_writing_weights": centered,
        "center_unembed": _zero_mean([ht.unembed.W_U]),
        "fold_value_biases": all(
            float(b.b_V.detach().abs().max()) == 0.0 for b in (blk.attn for blk in ht.blocks)
        ),
    }
    return ("centered" if centered else "raw"), processing


def _spec(ht: Any, layout: dict[str, Any]) -> ModelSpec:
    cfg = ht.cfg
    return ModelSpec(
        family=FAMILY,
        architecture=f"HookedTransformer ({cfg.original_architecture or cfg.model_name})",
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        n_kv_heads=getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
        d_head=cfg.d_head,
        d_mlp=cfg.d_mlp or 0,
        vocab_size=cfg.d_vocab_out,
        n_ctx=cfg.n_ctx,
        n_params=sum(p.numel() for p in ht.parameters()),
        **layout,
    )


class _FrameFromWeights:
    """Frames of a HookedTransformer: the one its weights are in (set before ``__init__``)."""

    weights_frame: str = "raw"

    def default_frame(self) -> str:
        return self.weights_frame

    def check_frame(self, frame: str) -> str:
        if frame != self.weights_frame:
            fix = (
                "center_writing_weights=False"
                if self.weights_frame == "centered"
                else "center_writing_weights=True (LayerNorm models only)"
            )
            raise ValueError(
                f"This HookedTransformer's weights are in the {self.weights_frame!r} frame, not "
                f"{frame!r}: its hook activations are what they are. Leave frame unset, or "
                f"process the model with {fix}."
            )
        return frame


class HookedTransformerLens(_FrameFromWeights, NativeLens):
    """A HookedTransformer on the native path, with its own (processed) weights."""

    family = FAMILY

    def _layout(self, config: Any, d_head: int) -> dict[str, Any]:
        rotary = config.positional_embedding_type == "rotary"
        return {
            "norm": "layernorm" if config.normalization_type.startswith("LN") else "rmsnorm",
            "parallel_attn_mlp": bool(config.parallel_attn_mlp),
            "rotary_dim": int(config.rotary_dim or d_head) if rotary else 0,
            "activation": config.act_fn,
            "gated_mlp": bool(config.gated_mlp),
        }

    def _read_spec(self, hf_model: Any) -> ModelSpec:
        return _spec(hf_model, self._layout(hf_model.cfg, hf_model.cfg.d_head))

    def _load(self, hf_model: Any) -> None:
        ht, cfg, d = hf_model, hf_model.cfg, hf_model.cfg.d_model

        def w(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to(self.device, self.dtype).contiguous()

        def norm_w(mod: Any) -> tuple[Tensor | None, Tensor | None]:
            ones = torch.ones(d, device=self.device, dtype=self.dtype)  # folded: unit weight
            return w(getattr(mod, "w", ones)), w(getattr(mod, "b", None))

        self.eps = cfg.eps
        self.w_te = w(ht.embed.W_E)  # type: ignore[assignment]
        standard = cfg.positional_embedding_type == "standard"
        self.w_pe = w(ht.pos_embed.W_pos) if standard else None
        self.layers, self.rotary_tables = [], []
        for block in ht.blocks:
            a, m = block.attn, block.mlp
            wk, wv = getattr(a, "_W_K", a.W_K), getattr(a, "_W_V", a.W_V)
            bk, bv = getattr(a, "_b_K", a.b_K), getattr(a, "_b_V", a.b_V)
            if cfg.gated_mlp and float(m.b_in.detach().abs().max()) != 0.0:
                raise _NotNative("a gated MLP with b_in (added after the gate product)")
            ln1_w, ln1_b = norm_w(block.ln1)
            ln2_w, ln2_b = norm_w(block.ln2)
            p: dict[str, Tensor | None] = {
                "ln1_w": ln1_w,
                "ln1_b": ln1_b,
                "ln2_w": ln2_w,
                "ln2_b": ln2_b,
                "q_w": w(a.W_Q.permute(0, 2, 1).reshape(-1, d)),
                "q_b": w(a.b_Q.reshape(-1)),
                "k_w": w(wk.permute(0, 2, 1).reshape(-1, d)),
                "k_b": w(bk.reshape(-1)),
                "v_w": w(wv.permute(0, 2, 1).reshape(-1, d)),
                "v_b": w(bv.reshape(-1)),
                "o_w": w(a.W_O.reshape(-1, d).T),
                "o_b": w(a.b_O),
                "in_w": w(m.W_in.T),
                "in_b": None if cfg.gated_mlp else w(m.b_in),
                "out_w": w(m.W_out.T),
                "out_b": w(m.b_out),
            }
            if cfg.gated_mlp:
                p["gate_w"], p["gate_b"] = w(m.W_gate.T), None
            self.layers.append(p)
            if self.spec.rotary_dim:
                if a.rotary_cos.shape[0] < cfg.n_ctx:
                    a._extend_rotary_embeddings(cfg.n_ctx)
                self.rotary_tables.append((w(a.rotary_cos), w(a.rotary_sin)))
        self.lnf_w, self.lnf_b = norm_w(ht.ln_final)  # type: ignore[assignment]
        wide = torch.promote_types(self.dtype, torch.float32)
        self.w_unembed = ht.unembed.W_U.detach().T.to(self.device, wide).contiguous()
        self.b_unembed = ht.unembed.b_U.detach().to(self.device, wide)

    def rotary(self, layer: int, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The object's own rotary tables at ``positions`` ([S] or [B, S])."""
        cos, sin = self.rotary_tables[layer]
        cos, sin = cos[positions].to(dtype), sin[positions].to(dtype)
        if positions.ndim == 2:  # [B, S, r] -> [B, 1, S, r]
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return cos, sin


class _NotNative(Exception):
    """A HookedTransformer the native block does not compute (the reason is the message)."""


class HookedGenericLens(_FrameFromWeights, GenericLens):
    """Any HookedTransformer through its own forward and hook points (PyTorch hooks on the
    ``HookPoint`` modules, so a replacement is exactly what ``run_with_hooks`` would feed on)."""

    family = FAMILY
    pre_hook_kinds = ()  # every hook point is an identity module: edit its output

    def _read_spec(self, hf_model: Any) -> ModelSpec:
        cfg = hf_model.cfg
        self.blocks = list(hf_model.blocks)
        self.head = hf_model.unembed
        norm = "layernorm" if str(cfg.normalization_type).startswith("LN") else "rmsnorm"
        return _spec(hf_model, {"norm": norm})

    def _load(self, hf_model: Any) -> None:
        own = hf_model.cfg.dtype
        if own != self.dtype:
            raise ValueError(
                f"This HookedTransformer runs in {own}, not {self.dtype}, on the TransformerLens "
                f"path: load it with dtype={str(own).removeprefix('torch.')!r}."
            )
        self.model = hf_model.eval()
        cap = getattr(hf_model.cfg, "output_logits_soft_cap", -1.0)
        self.softcap = cap if cap and cap > 0 else None

    def _module_for(self, hook: Hook) -> torch.nn.Module:
        return getattr(self.blocks[hook.layer], hook.kind)

    def _call(self, tokens: Tensor) -> None:
        self.model(tokens.to(self.model.cfg.device), return_type="logits")

    def unembed(self, final: Tensor) -> Tensor:
        """Logits in float32 (float64 for a float64 model), soft-capped as the object does."""
        wide = torch.promote_types(self.dtype, torch.float32)
        with torch.inference_mode():
            logits = self.head(final.to(self.device, self.dtype)).to(wide)
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


def _check_against_object(lens: Any, ht: Any) -> tuple[float, float]:
    """Largest |log-prob difference| between the lens and the object's forward on a fixed probe
    (token ids 0..n-1), and the largest |logit|: what catches a config option the native block
    would silently miss."""
    n = min(_PROBE_LEN, ht.cfg.n_ctx)
    tokens = (torch.arange(n) % ht.cfg.d_vocab).unsqueeze(0)
    with torch.inference_mode():
        ref = ht(tokens.to(ht.cfg.device), return_type="logits").double()
        got = lens.logits(tokens).double().to(ref.device)
    err = (ref.log_softmax(-1) - got.log_softmax(-1)).abs().max()
    return float(err), float(ref.abs().max())


def _probe_tolerance(ht: Any, dtype: torch.dtype, max_logit: float) -> float:
    """Rounding through the model: a logit errs by ~sqrt(n_layers d_model) eps max|logit| (a
    random walk of roundings per block, as in the engine tests), a log-prob by twice that; 8x
    slack. A config option the native block misses errs by O(1)."""
    eps = max(torch.finfo(dtype).eps, torch.finfo(ht.cfg.dtype).eps)
    return 16 * math.sqrt(ht.cfg.n_layers * ht.cfg.d_model) * eps * max(max_logit, 1.0)


def hooked_lens(
    ht: Any,
    *,
    frame: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    native: bool = True,
    tokenizer: Any = None,
) -> Any:
    """A HookedTransformer as a lens: native when its config allows (and it agrees with the
    object's forward), else the TransformerLens hook path."""
    weights_frame, processing = detect_frame(ht)
    done = ", ".join(f"{k}={v}" for k, v in processing.items())
    source = f"TransformerLens HookedTransformer {ht.cfg.model_name!r} (in memory; {done})"
    options = {
        "frame": frame,
        "dtype": dtype or ht.cfg.dtype,
        "device": device or ht.cfg.device,
        "source": source,
    }
    tok = tokenizer if tokenizer is not None else getattr(ht, "tokenizer", None)
    blockers = native_blockers(ht.cfg) if native else ["native=False"]
    if not blockers:
        try:
            lens = _with_frame(HookedTransformerLens, weights_frame, ht, tok, options)
        except _NotNative as e:
            blockers = [str(e)]
        else:
            err, max_logit = _check_against_object(lens, ht)
            if err <= _probe_tolerance(ht, options["dtype"], max_logit):
                return lens
            blockers = [f"its forward differs from the native one by {err:.2g} in log-prob"]
    log.info("HookedTransformer on the TransformerLens hook path: %s", "; ".join(blockers))
    return _with_frame(HookedGenericLens, weights_frame, ht, tok, options)


def _with_frame(cls: type, weights_frame: str, ht: Any, tok: Any, options: dict) -> Any:
    """``cls`` built on ``ht`` with the frame its weights are in."""
    lens = cls.__new__(cls)
    lens.weights_frame = weights_frame
    lens.__init__(ht, tok, **options)
    return lens
