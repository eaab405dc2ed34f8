"""Llama family, native: RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP.

Covers SmolLM2 and Llama 3.x (rotary frequencies, including Llama 3's scaled ones, are taken from
the Hugging Face model's own rotary module, so every rope variant it supports is matched). Only the
``raw`` frame exists: RMSNorm sees the mean over d_model, so subtracting it would change the model.
"""

from __future__ import annotations

from typing import Any

from perturb_lens.models.base import ModelSpec
from perturb_lens.models.native import NativeLens, Weights


class LlamaLens(NativeLens):
    """Llama-architecture models (Hugging Face ``LlamaForCausalLM`` weights) on the native path."""

    family = "llama"

    def _read_spec(self, hf_model: Any) -> ModelSpec:
        config = hf_model.config
        if config.hidden_act != "silu":
            raise ValueError(f"Native Llama path expects a SiLU MLP, not {config.hidden_act!r}.")
        d, n_heads = config.hidden_size, config.num_attention_heads
        d_head = getattr(config, "head_dim", None) or d // n_heads
        return ModelSpec(
            family=self.family,
            architecture=type(hf_model).__name__,
            n_layers=config.num_hidden_layers,
            d_model=d,
            n_heads=n_heads,
            n_kv_heads=config.num_key_value_heads or n_heads,
            d_head=d_head,
            d_mlp=config.intermediate_size,
            vocab_size=config.vocab_size,
            n_ctx=config.max_position_embeddings,
            norm="rmsnorm",
            n_params=hf_model.num_parameters(),
            rotary_dim=d_head,
            activation="silu",
            gated_mlp=True,
        )

    def _map_weights(self, w: Weights, config: Any) -> None:
        self.eps = config.rms_norm_eps
        self.w_te = w("model.embed_tokens.weight")
        head = "lm_head.weight" if w.has("lm_head.weight") else "model.embed_tokens.weight"
        self.w_unembed = w.float32(head)
        self.layers = []
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            self.layers.append(
                {
                    "ln1_w": w(p + "input_layernorm.weight"),
                    "ln1_b": None,
                    "w_q": w(a + "q_proj.weight"),
                    "b_q": w.opt(a + "q_proj.bias"),
                    "w_k": w(a + "k_proj.weight"),
                    "b_k": w.opt(a + "k_proj.bias"),
                    "w_v": w(a + "v_proj.weight"),
                    "b_v": w.opt(a + "v_proj.bias"),
                    "w_o": w(a + "o_proj.weight"),
                    "b_o": w.opt(a + "o_proj.bias"),
                    "ln2_w": w(p + "post_attention_layernorm.weight"),
                    "ln2_b": None,
                    "w_gate": w(p + "mlp.gate_proj.weight"),
                    "w_in": w(p + "mlp.up_proj.weight"),
                    "b_in": None,
                    "w_out": w(p + "mlp.down_proj.weight"),
                    "b_out": None,
                }
            )
        self.lnf_w = w("model.norm.weight")
