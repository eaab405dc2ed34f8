"""GPT-NeoX family (Pythia), native: LayerNorm, partial rotary, parallel attention and MLP.

Layout flags: ``use_parallel_residual`` (Pythia: True, attention and MLP both read the block
input; False is the sequential GPT-2 layout) and ``rotary_pct`` (Pythia: 0.25 of each head is
rotated). The unembedding (Pythia's ``embed_out``) is untied. Frames as for GPT-2: ``centered``
(default) removes the mean over d_model from the weights writing to the residual stream.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from perturb_lens.models.native import NativeLens
from perturb_lens.models.registry import register_family
from perturb_lens.models.weights import WeightMap, Weights


class GPTNeoXLens(NativeLens):
    """GPT-NeoX (Hugging Face ``GPTNeoXForCausalLM`` weights) on the native path."""

    family = "neox"

    def _layout(self, config: Any, d_head: int) -> dict[str, Any]:
        rope = getattr(config, "rope_parameters", None) or {}
        return {
            "norm": "layernorm",
            "parallel_attn_mlp": bool(config.use_parallel_residual),
            "rotary_dim": int(d_head * rope.get("partial_rotary_factor", 1.0)),
            "activation": config.hidden_act,
        }

    weight_map = WeightMap(
        embed=("gpt_neox.embed_in.weight", None),
        block="gpt_neox.layers.{}.",
        norms=("input_layernorm", "post_attention_layernorm"),
        modules={
            "qkv": "attention.query_key_value",
            "o": "attention.dense",
            "in": "mlp.dense_h_to_4h",
            "out": "mlp.dense_4h_to_h",
        },
        final=("gpt_neox.final_layer_norm", "lm_head.weight"),
        eps="layer_norm_eps",
    )

    def _layer_weights(self, w: Weights, i: int) -> dict[str, Tensor | None]:
        """HF fuses q, k, v per head (rows [H, 3, dh]); regroup them as all q, all k, all v."""
        p = super()._layer_weights(w, i)
        for key in ("qkv_w", "qkv_b"):
            t = p[key]
            if t is not None:
                p[key] = t.reshape(self.spec.n_heads, 3, -1).transpose(0, 1).reshape(t.shape)
        return p


register_family("neox", ("GPTNeoXForCausalLM",), GPTNeoXLens)
