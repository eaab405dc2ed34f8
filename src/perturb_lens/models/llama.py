"""Llama family, native: RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP.

Covers SmolLM2 and Llama 3.x (rotary frequencies, including Llama 3's scaled ones, are taken from
the Hugging Face model's own rotary module, so every rope variant it supports is matched). Only the
``raw`` frame exists: RMSNorm sees the mean over d_model, so subtracting it would change the model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from perturb_lens.models.base import ModelSpec
from perturb_lens.models.native import NativeLens, rms_norm, split_heads


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaLens(NativeLens):
    """Llama-architecture models (Hugging Face ``LlamaForCausalLM`` weights) on the native path."""

    def __init__(
        self,
        state: dict[str, Tensor],
        config: Any,
        tokenizer: Any,
        inv_freq: Tensor,
        *,
        attention_scaling: float = 1.0,
        frame: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        source: str = "",
        n_params: int = 0,
    ) -> None:
        d, n_heads = config.hidden_size, config.num_attention_heads
        n_kv = config.num_key_value_heads or n_heads
        d_head = getattr(config, "head_dim", None) or d // n_heads
        self.spec = ModelSpec(
            family="llama",
            architecture="LlamaForCausalLM",
            n_layers=config.num_hidden_layers,
            d_model=d,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            d_head=d_head,
            d_mlp=config.intermediate_size,
            vocab_size=config.vocab_size,
            n_ctx=config.max_position_embeddings,
            norm="rmsnorm",
            n_params=n_params,
        )
        if config.hidden_act != "silu":
            raise ValueError(f"Native Llama path expects a SiLU MLP, not {config.hidden_act!r}.")
        self.tokenizer = tokenizer
        self.frame = self.check_frame(frame or "raw")
        self.dtype, self.device, self.source = dtype, torch.device(device), source
        self.eps = config.rms_norm_eps
        self.inv_freq = inv_freq.to(self.device, torch.float32)
        self.attention_scaling = float(attention_scaling)

        def w(name: str) -> Tensor:
            return state[name].to(self.device, dtype).contiguous()

        def opt(name: str) -> Tensor | None:
            return w(name) if name in state else None

        self.w_te = w("model.embed_tokens.weight")
        head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
        wide = torch.promote_types(dtype, torch.float32)  # float64 for a float64 model
        self.w_unembed = head.to(self.device, wide).contiguous()
        self.layers: list[dict[str, Tensor | None]] = []
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            self.layers.append(
                {
                    "ln1": w(p + "input_layernorm.weight"),
                    "w_q": w(a + "q_proj.weight"),
                    "b_q": opt(a + "q_proj.bias"),
                    "w_k": w(a + "k_proj.weight"),
                    "b_k": opt(a + "k_proj.bias"),
                    "w_v": w(a + "v_proj.weight"),
                    "b_v": opt(a + "v_proj.bias"),
                    "w_o": w(a + "o_proj.weight"),
                    "b_o": opt(a + "o_proj.bias"),
                    "ln2": w(p + "post_attention_layernorm.weight"),
                    "w_gate": w(p + "mlp.gate_proj.weight"),
                    "w_up": w(p + "mlp.up_proj.weight"),
                    "w_down": w(p + "mlp.down_proj.weight"),
                }
            )
        self.lnf = w("model.norm.weight")

    @classmethod
    def from_hf(
        cls,
        hf_model: Any,
        tokenizer: Any,
        *,
        frame: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        source: str = "",
    ) -> LlamaLens:
        """Build from a loaded ``LlamaForCausalLM`` (weights copied, rotary taken from it)."""
        rotary = hf_model.model.rotary_emb
        return cls(
            dict(hf_model.state_dict()),
            hf_model.config,
            tokenizer,
            rotary.inv_freq,
            attention_scaling=getattr(rotary, "attention_scaling", 1.0),
            frame=frame,
            dtype=dtype,
            device=device,
            source=source,
            n_params=hf_model.num_parameters(),
        )

    # ---- family pieces -------------------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        return self.w_te[tokens]

    def norm1(self, layer: int, x: Tensor) -> Tensor:
        return rms_norm(x, self.layers[layer]["ln1"], self.eps)  # type: ignore[arg-type]

    def norm2(self, layer: int, x: Tensor) -> Tensor:
        return rms_norm(x, self.layers[layer]["ln2"], self.eps)  # type: ignore[arg-type]

    def norm_final(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.lnf, self.eps)

    def _rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin broadcastable to [B, H, S, dh] for positions [S] or [B, S]."""
        angles = positions.float().unsqueeze(-1) * self.inv_freq  # [..., S, dh/2]
        emb = torch.cat((angles, angles), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        if positions.ndim == 2:  # [B, S, dh] -> [B, 1, S, dh]
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return cos, sin

    def qkv(self, layer: int, h: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p = self.layers[layer]
        q = split_heads(F.linear(h, p["w_q"], p["b_q"]), self.spec.n_heads)
        k = split_heads(F.linear(h, p["w_k"], p["b_k"]), self.spec.n_kv_heads)
        v = split_heads(F.linear(h, p["w_v"], p["b_v"]), self.spec.n_kv_heads)
        cos, sin = self._rope(positions, q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def out_proj(self, layer: int, z: Tensor) -> Tensor:
        p = self.layers[layer]
        return F.linear(z, p["w_o"], p["b_o"])

    def mlp(self, layer: int, h: Tensor) -> Tensor:
        p = self.layers[layer]
        gated = F.silu(F.linear(h, p["w_gate"])) * F.linear(h, p["w_up"])  # type: ignore[arg-type]
        return F.linear(gated, p["w_down"])  # type: ignore[arg-type]
