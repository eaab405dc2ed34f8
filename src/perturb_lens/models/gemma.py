"""Gemma 3 and Gemma 2 families, native: four norms per block, scaled embeddings, soft-capping.

A Gemma block (transformers' ``Gemma3DecoderLayer``), in TransformerLens' hook names::

    a = post_attn_norm(attn(input_norm(x)))         # hook_attn_out; x is hook_resid_pre
    m = post_ff_norm(mlp(pre_ff_norm(x + a)))       # hook_mlp_out
    x = x + a + m                                   # hook_resid_post

``hook_attn_out`` and ``hook_mlp_out`` are what is added to the residual stream, *after* the
post-norms (TransformerLens' ``ln1_post`` / ``ln2_post`` come before its ``hook_attn_out`` /
``hook_mlp_out`` too), so ``resid_post = resid_pre + attn_out + mlp_out`` holds; a perturbation
at ``hook_attn_out`` replaces the normed branch output.

The rest, as transformers computes it: token embeddings times sqrt(d_model) (the constant rounded
to float32, as transformers keeps it); RMSNorm scaling by ``1 + w``; queries scaled by
``query_pre_attn_scalar ** -0.5``; a gated tanh-GELU MLP; the tied unembedding; logits soft-capped
at ``final_logit_softcapping`` where the config sets it (``linear_unembedding`` is then None and
the engine takes KL from full distributions). Layers of type ``sliding_attention`` see the
``sliding_window`` keys ending at each position, the others every earlier key.

- Gemma 3: QK-norm (an RMSNorm over each head's query and key, before rotary) and rotary bases
  per layer type (local ``sliding_attention`` and global ``full_attention``). transformers'
  Gemma 3 does not apply ``attn_logit_softcapping`` (no Gemma 3 checkpoint sets it); neither does
  this lens, so the two agree.
- Gemma 2: no QK-norm, one rotary base, attention scores soft-capped at
  ``attn_logit_softcapping`` (``cap * tanh(s / cap)``, before the causal mask).

Only the ``raw`` frame exists (RMSNorm sees the mean over d_model).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from perturb_lens.models.layers import rms_norm_plus_one
from perturb_lens.models.native import NativeLens
from perturb_lens.models.registry import register_family
from perturb_lens.models.weights import WeightMap

log = logging.getLogger(__name__)

_BLOCK = {r: f"self_attn.{r}_proj" for r in "qkvo"} | {
    "gate": "mlp.gate_proj",
    "in": "mlp.up_proj",
    "out": "mlp.down_proj",
    "post_attn": "post_attention_layernorm",
    "post_mlp": "post_feedforward_layernorm",
}


def _gemma_map(modules: dict[str, str]) -> WeightMap:
    return WeightMap(
        embed=("model.embed_tokens.weight", None),
        block="model.layers.{}.",
        norms=("input_layernorm", "pre_feedforward_layernorm"),
        modules=modules,
        final=("model.norm", "lm_head.weight"),
        eps="rms_norm_eps",
    )


class Gemma3Lens(NativeLens):
    """Gemma 3 text models (Hugging Face ``Gemma3ForCausalLM`` weights) on the native path."""

    family = "gemma3"
    weight_map = _gemma_map(_BLOCK | {"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"})
    embed_scale: Tensor

    def _layout(self, config: Any, d_head: int) -> dict[str, Any]:
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError(
                "This Gemma config uses bidirectional attention (an encoder); the native path is "
                "causal. Load it with native=False (generic path)."
            )
        return {
            "norm": "rmsnorm",
            "rotary_dim": d_head,
            "activation": config.hidden_activation,
            "gated_mlp": True,
        }

    def _load(self, hf_model: Any) -> None:
        super()._load(hf_model)
        config = hf_model.config
        scale = torch.tensor(config.hidden_size**0.5, dtype=torch.float32)
        self.embed_scale = scale.to(self.device, self.dtype)
        self.attn_scale = float(config.query_pre_attn_scalar) ** -0.5
        self.attn_softcap = self._attn_softcap(config)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)

    def _attn_softcap(self, config: Any) -> float | None:
        if getattr(config, "attn_logit_softcapping", None) is not None:
            log.warning(
                "This Gemma 3 config sets attn_logit_softcapping=%s; transformers' Gemma 3 does "
                "not apply it, and neither does the native path.",
                config.attn_logit_softcapping,
            )
        return None

    # ---- the pieces of a Gemma block ---------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        """Token embedding times sqrt(d_model)."""
        return self.w_te[tokens] * self.embed_scale

    def _norm(self, x: Tensor, weight: Tensor | None) -> Tensor:
        return rms_norm_plus_one(x, weight, self.eps)  # type: ignore[arg-type]

    def norm1(self, layer: int, x: Tensor) -> Tensor:
        """``input_layernorm``."""
        return self._norm(x, self.layers[layer]["ln1_w"])

    def norm2(self, layer: int, x: Tensor) -> Tensor:
        """``pre_feedforward_layernorm``."""
        return self._norm(x, self.layers[layer]["ln2_w"])

    def norm_final(self, x: Tensor) -> Tensor:
        return self._norm(x, self.lnf_w)

    def qk_norm(self, layer: int, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """RMSNorm over each head's query and key (``q_norm``, ``k_norm``)."""
        p = self.layers[layer]
        return self._norm(q, p["q_norm_w"]), self._norm(k, p["k_norm_w"])

    def out_proj(self, layer: int, z: Tensor) -> Tensor:
        """``o_proj``, then ``post_attention_layernorm``: hook_attn_out."""
        return self._norm(super().out_proj(layer, z), self.layers[layer]["post_attn_w"])

    def mlp(self, layer: int, h: Tensor) -> Tensor:
        """The gated MLP, then ``post_feedforward_layernorm``: hook_mlp_out."""
        return self._norm(super().mlp(layer, h), self.layers[layer]["post_mlp_w"])


class Gemma2Lens(Gemma3Lens):
    """Gemma 2 (Hugging Face ``Gemma2ForCausalLM`` weights) on the native path: no QK-norm,
    attention scores soft-capped."""

    family = "gemma2"
    weight_map = _gemma_map(_BLOCK)

    def _attn_softcap(self, config: Any) -> float | None:
        cap = getattr(config, "attn_logit_softcapping", None)
        return None if cap is None else float(cap)

    def qk_norm(self, layer: int, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return q, k


register_family("gemma3", ("Gemma3ForCausalLM",), Gemma3Lens, gguf=("gemma3",))
register_family("gemma2", ("Gemma2ForCausalLM",), Gemma2Lens, gguf=("gemma2",))
