"""GPT-2 family, native: LayerNorm, learned positions, GELU (tanh), tied unembedding.

Frames: ``centered`` (default) subtracts the mean over d_model from every weight that writes to
the residual stream (token and position embeddings, attention and MLP output projections), as
TransformerLens' ``center_writing_weights`` does. The residual stream then equals the raw one
minus its mean over d_model, exactly; LayerNorm removes that mean anyway, so logits do not change.
The unembedding keeps the raw token embedding (centering it would change the logits).
"""

from __future__ import annotations

from typing import Any

from perturb_lens.models.base import ModelSpec
from perturb_lens.models.native import NativeLens, Weights


class GPT2Lens(NativeLens):
    """GPT-2 (Hugging Face ``GPT2LMHeadModel`` weights) on the native path."""

    family = "gpt2"

    def _read_spec(self, hf_model: Any) -> ModelSpec:
        config = hf_model.config
        if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(
            config, "reorder_and_upcast_attn", False
        ):
            raise ValueError(
                "This GPT-2 variant scales attention by layer index or reorders it; the native "
                "path does not implement that. Load it with native=False (generic path)."
            )
        d, n_heads = config.n_embd, config.n_head
        return ModelSpec(
            family=self.family,
            architecture=type(hf_model).__name__,
            n_layers=config.n_layer,
            d_model=d,
            n_heads=n_heads,
            n_kv_heads=n_heads,
            d_head=d // n_heads,
            d_mlp=config.n_inner or 4 * d,
            vocab_size=config.vocab_size,
            n_ctx=config.n_positions,
            norm="layernorm",
            n_params=hf_model.num_parameters(),
            activation=config.activation_function,
        )

    def _map_weights(self, w: Weights, config: Any) -> None:
        w.prefix = "transformer." if w.has("transformer.wte.weight") else ""
        self.eps = config.layer_norm_epsilon
        self.w_unembed = w.float32("wte.weight")  # tied; raw: logits identical in both frames
        self.w_te, self.w_pe = w("wte.weight", writes=-1), w("wpe.weight", writes=-1)
        self.layers = []
        for i in range(config.n_layer):
            h = f"h.{i}."
            # HF Conv1D stores [in, out]; F.linear wants [out, in].
            self.layers.append(
                {
                    "ln1_w": w(h + "ln_1.weight"),
                    "ln1_b": w(h + "ln_1.bias"),
                    "w_qkv": w(h + "attn.c_attn.weight", t=True),
                    "b_qkv": w(h + "attn.c_attn.bias"),
                    "w_o": w(h + "attn.c_proj.weight", t=True, writes=0),
                    "b_o": w(h + "attn.c_proj.bias", writes=0),
                    "ln2_w": w(h + "ln_2.weight"),
                    "ln2_b": w(h + "ln_2.bias"),
                    "w_in": w(h + "mlp.c_fc.weight", t=True),
                    "b_in": w(h + "mlp.c_fc.bias"),
                    "w_out": w(h + "mlp.c_proj.weight", t=True, writes=0),
                    "b_out": w(h + "mlp.c_proj.bias", writes=0),
                }
            )
        self.lnf_w, self.lnf_b = w("ln_f.weight"), w("ln_f.bias")
