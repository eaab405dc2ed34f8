"""GPT-2 family, native: LayerNorm, learned positions, GELU (tanh), tied unembedding.

Frames: ``centered`` (default) subtracts the mean over d_model from every weight that writes to
the residual stream (token and position embeddings, attention and MLP output projections), as
TransformerLens' ``center_writing_weights`` does. The residual stream then equals the raw one
minus its mean over d_model, exactly; LayerNorm removes that mean anyway, so logits do not change.
The unembedding keeps the raw token embedding (centering it would change the logits).
"""

from __future__ import annotations

from typing import Any

from perturb_lens.models.native import NativeLens
from perturb_lens.models.registry import register_family
from perturb_lens.models.weights import WeightMap


class GPT2Lens(NativeLens):
    """GPT-2 (Hugging Face ``GPT2LMHeadModel`` weights) on the native path."""

    family = "gpt2"

    def _layout(self, config: Any, d_head: int) -> dict[str, Any]:
        if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(
            config, "reorder_and_upcast_attn", False
        ):
            raise ValueError(
                "This GPT-2 variant scales attention by layer index or reorders it; the native "
                "path does not implement that. Load it with native=False (generic path)."
            )
        return {"norm": "layernorm", "activation": config.activation_function}

    weight_map = WeightMap(
        embed=("transformer.wte.weight", "transformer.wpe.weight"),
        block="transformer.h.{}.",
        norms=("ln_1", "ln_2"),
        modules={"qkv": "attn.c_attn", "o": "attn.c_proj", "in": "mlp.c_fc", "out": "mlp.c_proj"},
        final=("transformer.ln_f", "lm_head.weight"),
        eps="layer_norm_epsilon",
        conv1d=True,  # HF Conv1D stores [in, out]
    )


register_family("gpt2", ("GPT2LMHeadModel",), GPT2Lens, gguf=("gpt2",))
