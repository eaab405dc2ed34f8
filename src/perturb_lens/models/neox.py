"""GPT-NeoX family (Pythia), native: LayerNorm, partial rotary, parallel attention and MLP.

Layout flags: ``use_parallel_residual`` (Pythia: True, both attention and MLP read the block
input; False is the sequential GPT-2 layout) and ``rotary_pct`` (Pythia: 0.25 of each head is
rotated). The unembedding ``embed_out`` is untied. Frames as for GPT-2: ``centered`` (default)
removes the mean over d_model from the weights writing to the residual stream.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from perturb_lens.models.base import ModelSpec
from perturb_lens.models.native import NativeLens, Weights


class GPTNeoXLens(NativeLens):
    """GPT-NeoX (Hugging Face ``GPTNeoXForCausalLM`` weights) on the native path."""

    family = "neox"

    def _read_spec(self, hf_model: Any) -> ModelSpec:
        config = hf_model.config
        d, n_heads = config.hidden_size, config.num_attention_heads
        d_head = d // n_heads
        rope = getattr(config, "rope_parameters", None) or {}
        return ModelSpec(
            family=self.family,
            architecture=type(hf_model).__name__,
            n_layers=config.num_hidden_layers,
            d_model=d,
            n_heads=n_heads,
            n_kv_heads=n_heads,
            d_head=d_head,
            d_mlp=config.intermediate_size,
            vocab_size=config.vocab_size,
            n_ctx=config.max_position_embeddings,
            norm="layernorm",
            n_params=hf_model.num_parameters(),
            parallel_attn_mlp=bool(config.use_parallel_residual),
            rotary_dim=int(d_head * rope.get("partial_rotary_factor", 1.0)),
            activation=config.hidden_act,
        )

    def _map_weights(self, w: Weights, config: Any) -> None:
        self.eps = config.layer_norm_eps
        w.prefix = "gpt_neox."
        self.w_te = w("embed_in.weight", writes=-1)
        self.layers = []
        n = config.num_attention_heads

        def by_kind(t: Tensor | None) -> Tensor | None:
            """HF fuses q, k, v per head (rows [H, 3, dh]); regroup as all q, all k, all v."""
            return None if t is None else t.reshape(n, 3, -1).transpose(0, 1).reshape(t.shape)

        for i in range(config.num_hidden_layers):
            p = f"layers.{i}."
            self.layers.append(
                {
                    "ln1_w": w(p + "input_layernorm.weight"),
                    "ln1_b": w(p + "input_layernorm.bias"),
                    "w_qkv": by_kind(w(p + "attention.query_key_value.weight")),
                    "b_qkv": by_kind(w.opt(p + "attention.query_key_value.bias")),
                    "w_o": w(p + "attention.dense.weight", writes=0),
                    "b_o": w.opt(p + "attention.dense.bias", writes=0),
                    "ln2_w": w(p + "post_attention_layernorm.weight"),
                    "ln2_b": w(p + "post_attention_layernorm.bias"),
                    "w_in": w(p + "mlp.dense_h_to_4h.weight"),
                    "b_in": w(p + "mlp.dense_h_to_4h.bias"),
                    "w_out": w(p + "mlp.dense_4h_to_h.weight", writes=0),
                    "b_out": w(p + "mlp.dense_4h_to_h.bias", writes=0),
                }
            )
        self.lnf_w, self.lnf_b = w("final_layer_norm.weight"), w("final_layer_norm.bias")
        w.prefix = ""
        self.w_unembed = w.float32("lm_head.weight")  # untied (Pythia's embed_out)
