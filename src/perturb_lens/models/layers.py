"""Plain tensor functions shared by the native families: norms, heads, rotary, centering, MLPs."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

# Hugging Face activation names (``activation_function`` / ``hidden_act``) -> function.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm as Llama computes it (in float32, or float64 for float64, scaled after casting
    back)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm_plus_one(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm as Gemma computes it: scaled by ``1 + weight`` (weights stored around zero), in
    float32 (float64 for float64) before casting back."""
    wide = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(wide)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.to(wide))).to(x.dtype)


def norm(kind: str, x: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    """``layernorm`` or ``rmsnorm`` over the last axis."""
    if kind == "rmsnorm":
        return rms_norm(x, weight, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def centered(w: Tensor, dim: int) -> Tensor:
    """``w`` minus its mean along ``dim`` (the d_model axis of a weight writing to the residual),
    as TransformerLens' ``center_writing_weights``: LayerNorm cannot see the removed mean."""
    return w - w.mean(dim=dim, keepdim=True)


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """[B, S, H*dh] -> [B, H, S, dh]."""
    b, s, _ = x.shape
    return x.reshape(b, s, n_heads, -1).transpose(1, 2)


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1), the halves of the last axis (the rotary pairing of HF models)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_cos_sin(
    positions: Tensor, inv_freq: Tensor, scaling: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos, sin [..., S, rotary_dim] for positions [S] or [B, S] (angles in float32, as HF does),
    broadcastable to [B, H, S, rotary_dim]."""
    angles = positions.float().unsqueeze(-1) * inv_freq  # [..., S, rotary_dim/2]
    emb = torch.cat((angles, angles), dim=-1)
    cos = (emb.cos() * scaling).to(dtype)
    sin = (emb.sin() * scaling).to(dtype)
    if positions.ndim == 2:  # [B, S, r] -> [B, 1, S, r]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return cos, sin


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the leading ``cos.shape[-1]`` dims of each head of ``x`` [B, H, S, dh]; the rest
    pass through (partial rotary, e.g. GPT-NeoX's ``rotary_pct``)."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)
