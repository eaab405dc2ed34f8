"""Llama family, native: RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP.

Covers SmolLM2 and Llama 3.x (rotary frequencies, including Llama 3's scaled ones, are taken from
the Hugging Face model's own rotary module, so every rope variant it supports is matched). Only the
``raw`` frame exists: RMSNorm sees the mean over d_model, so subtracting it would change the model.
"""

from __future__ import annotations

from typing import Any

from perturb_lens.models.native import NativeLens
from perturb_lens.models.registry import register_family
from perturb_lens.models.weights import WeightMap


class LlamaLens(NativeLens):
    """Llama-architecture models (Hugging Face ``LlamaForCausalLM`` weights) on the native path."""

    family = "llama"

    def _layout(self, config: Any, d_head: int) -> dict[str, Any]:
        if config.hidden_act != "silu":
            raise ValueError(f"Native Llama path expects a SiLU MLP, not {config.hidden_act!r}.")
        return {"norm": "rmsnorm", "rotary_dim": d_head, "activation": "silu", "gated_mlp": True}

    weight_map = WeightMap(
        embed=("model.embed_tokens.weight", None),
        block="model.layers.{}.",
        norms=("input_layernorm", "post_attention_layernorm"),
        modules={r: f"self_attn.{r}_proj" for r in "qkvo"}
        | {"gate": "mlp.gate_proj", "in": "mlp.up_proj", "out": "mlp.down_proj"},
        final=("model.norm", "lm_head.weight"),
        eps="rms_norm_eps",
    )


register_family("llama", ("LlamaForCausalLM",), LlamaLens, gguf=("llama",))
