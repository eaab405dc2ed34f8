"""The naive reference, written plainly: one full Hugging Face forward per length and per copy.

This is how the published code measures (TransformerLens hooks, one forward pass per perturbation
length); tests and benchmarks compare the engine against it. Only transformers and torch are used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def blocks(hf) -> torch.nn.ModuleList:
    """The decoder blocks of a GPT-2, Llama, GPT-NeoX, Qwen 2 or Gemma HF model."""
    if hasattr(hf, "transformer"):
        return hf.transformer.h
    return hf.gpt_neox.layers if hasattr(hf, "gpt_neox") else hf.model.layers


def submodule(hf, layer: int, kind: str) -> torch.nn.Module:
    """The module whose output (attn_out, mlp_out) or block whose input/output is ``kind``; for
    Gemma's blocks the norms after the branches (their outputs are added to the residual)."""
    block = blocks(hf)[layer]
    if hasattr(block, "post_feedforward_layernorm") and kind in ("hook_attn_out", "hook_mlp_out"):
        post = (
            "post_attention_layernorm" if kind == "hook_attn_out" else "post_feedforward_layernorm"
        )
        return getattr(block, post)
    if kind == "hook_attn_out":
        return next(
            getattr(block, n) for n in ("attn", "self_attn", "attention") if hasattr(block, n)
        )
    if kind == "hook_mlp_out":
        return block.mlp
    return block


def hooked_forward(
    hf, tokens: Tensor, layer: int, kind: str, edit: Callable[[Tensor], Tensor] | None
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """One HF forward with ``edit`` applied at (layer, kind). Returns the activation there (after
    the edit), the last hidden state (final-normed) and all hidden states."""
    seen: dict[str, Tensor] = {}

    def change(h: Tensor) -> Tensor:
        new = h if edit is None else edit(h.clone())
        seen["x"] = new
        return new

    module = submodule(hf, layer, kind)
    if kind == "hook_resid_pre":

        def pre(mod, args, kwargs):
            if args:
                return (change(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": change(kwargs["hidden_states"])}

        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    else:

        def post(mod, args, output):
            if isinstance(output, tuple):
                return (change(output[0]), *output[1:])
            return change(output)

        handle = module.register_forward_hook(post)
    try:
        with torch.no_grad():
            out = hf(tokens, output_hidden_states=True)
    finally:
        handle.remove()
    return seen["x"], out.hidden_states[-1], out.hidden_states


def forward_with_edit(
    hf, tokens: Tensor, layer: int, edit, read_layer: int
) -> tuple[Tensor, Tensor]:
    """Logits (float64) and block ``read_layer``'s output, with ``edit(hidden)`` applied in place
    to the input of block ``layer`` (= hook_resid_pre)."""
    captured: dict[str, Tensor] = {}

    def pre_hook(module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).clone()
        edit(hidden)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def read_hook(module, args, output):
        captured["read"] = (output[0] if isinstance(output, tuple) else output).detach()

    h1 = blocks(hf)[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    h2 = blocks(hf)[read_layer].register_forward_hook(read_hook)
    try:
        with torch.no_grad():
            logits = hf(tokens).logits.double()
    finally:
        h1.remove()
        h2.remove()
    return logits, captured["read"].double()


def kl(logits_clean: Tensor, logits_pert: Tensor) -> Tensor:
    """KL(p_clean || p_pert) in nats, float64."""
    lp, lq = torch.log_softmax(logits_clean, -1), torch.log_softmax(logits_pert, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def naive_sweep(
    hf, tokens: Tensor, layer: int, dirs: Tensor, lengths: list[float], scope: str, read_layer: int
) -> dict[tuple[int, int, float], tuple[float, float]]:
    """{(seq, pos, length): (kl, l2)} for one direction tensor [B, T, d]."""
    b, t, _ = dirs.shape
    clean_logits, clean_read = forward_with_edit(hf, tokens, layer, lambda h: None, read_layer)
    out: dict[tuple[int, int, float], tuple[float, float]] = {}
    for alpha in lengths:
        if scope == "all-positions":

            def add_all(h: Tensor, alpha: float = alpha) -> None:
                h += alpha * dirs.to(h.dtype)

            logits, read = forward_with_edit(hf, tokens, layer, add_all, read_layer)
            k = kl(clean_logits, logits)
            l2 = (clean_read - read).norm(dim=-1)
            for s in range(b):
                for p in range(t):
                    out[(s, p, alpha)] = (float(k[s, p]), float(l2[s, p]))
            continue
        positions = range(t) if scope == "single-position" else [t - 1]
        for s in range(b):
            for p in positions:

                def add_one(h: Tensor, s: int = s, p: int = p, alpha: float = alpha) -> None:
                    h[s, p] += alpha * dirs[s, p].to(h.dtype)

                logits, read = forward_with_edit(hf, tokens, layer, add_one, read_layer)
                k = kl(clean_logits[s, p], logits[s, p])
                out[(s, p, alpha)] = (float(k), float((clean_read[s, p] - read[s, p]).norm()))
    return out
