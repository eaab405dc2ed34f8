"""Qwen 2 family (Qwen2, Qwen2.5), native: the Llama block with biases on q, k and v.

RMSNorm, rotary positions, grouped-query attention and a SwiGLU MLP as in ``llama.py``; the
q, k and v projections carry biases (read like any bias: present in the state dict, used), the
output projection none. The unembedding is ``lm_head`` when the checkpoint has its own (untied,
e.g. Qwen2.5-Coder-0.5B-Instruct's GGUF), else the token embedding. Layers of type
``sliding_attention`` (``use_sliding_window``; off in the released models) see the
``sliding_window`` keys ending at each position. ``hook_attn_out`` and ``hook_mlp_out`` are the
branch outputs added to the residual stream: ``resid_post = resid_pre + attn_out + mlp_out``.
Only the ``raw`` frame exists.
"""

from __future__ import annotations

from perturb_lens.models.llama import LlamaLens
from perturb_lens.models.registry import register_family


class Qwen2Lens(LlamaLens):
    """Qwen 2 models (Hugging Face ``Qwen2ForCausalLM`` weights) on the native path."""

    family = "qwen2"


register_family("qwen2", ("Qwen2ForCausalLM",), Qwen2Lens, gguf=("qwen2",))
