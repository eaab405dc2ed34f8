"""The native forward shared by the decoder families: stop at a hook, continue from it.

Written by hand on purpose: this is the fast path the whole tool exists for. Hugging Face models
cannot start in the middle of the network, nor run single rows against another pass's keys and
values. A family (``gpt2.py``, ``llama.py``, ``neox.py``, ``qwen2.py``, ``gemma.py``) supplies its
spec (shapes and block layout flags) and maps its weights onto the names below; every piece of the
block is computed here (a family may override a piece, e.g. Gemma's norms). One block, in
TransformerLens' hook names (nanoGPT style)::

    a = attn(norm1(x))                     # hook_attn_out; x is hook_resid_pre
    if parallel_attn_mlp:  m = mlp(norm2(x))          # GPT-NeoX: both read the block input
    else:                  m = mlp(norm2(x + a))      # GPT-2, Llama
    x = x + a + m                          # hook_mlp_out is m; hook_resid_post is x

A family is a :class:`~perturb_lens.models.weights.WeightMap` (where each weight is) plus its
layout flags in the :class:`~perturb_lens.models.base.ModelSpec` it reads from the config.

Attention, for every family: causal; on a layer with a sliding window ``W`` (config
``layer_types`` / ``sliding_window``, as transformers reads them) a position attends to the ``W``
keys ending at itself; scores are scaled by ``attn_scale`` (default ``d_head ** -0.5``) and
soft-capped (``cap * tanh(s / cap)``) where ``attn_softcap`` is set. Rotary frequencies may differ
per layer (Gemma 3: local and global bases). The same rules hold for the single rows of
:meth:`LensModel.continue_at` against the clean keys.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from perturb_lens.common.hooks import HOOK_KINDS, Hook
from perturb_lens.config.options import PRECISIONS
from perturb_lens.models.base import CleanRun, LensModel, ModelSpec, config_shape
from perturb_lens.models.layers import ACTIVATIONS, apply_rotary, norm, rotary_cos_sin, split_heads
from perturb_lens.models.weights import WeightMap, Weights

RESID_PRE, ATTN_OUT, MLP_OUT, RESID_POST = range(4)

# attention(layer, normed input [B, S, d], positions [S] or [B, S]) -> attn_out [B, S, d]
AttnFn = Callable[[int, Tensor, Tensor], Tensor]


@dataclass
class NativeCache:
    """What continuing from a hook needs from the clean pass."""

    resid_pre: Tensor | None  # [B, T, d] at the hook's block (for attn_out hooks)
    resid_mid: Tensor | None  # [B, T, d] at the hook's block (for mlp_out hooks)
    kv: dict[int, tuple[Tensor, Tensor]]  # layer -> clean (K, V), each [B, H_kv, T, d_head]


LAYER_TYPES = ("full_attention", "sliding_attention")


def sliding_windows(config: Any) -> list[int | None]:
    """Per layer, the sliding window of a Hugging Face config (keys a position attends to, itself
    included: transformers' ``kv_idx > q_idx - sliding_window``), or None for full attention."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None) or ["full_attention"] * n
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(
            f"The native path has no attention of layer types {unknown} (it has "
            f"{', '.join(LAYER_TYPES)}); load this model with native=False (generic path)."
        )
    window = getattr(config, "sliding_window", None)
    return [int(window) if window and t == "sliding_attention" else None for t in types]


def rotary_tables(hf_model: Any, n_layers: int) -> list[tuple[Tensor, float]] | None:
    """Per layer, (inv_freq, attention scaling) from the model's own rotary module: one table, or
    one per layer type (``{layer_type}_inv_freq``, Gemma 3's local and global bases). None when
    the model has no ``rotary_emb`` module."""
    found = (mod for name, mod in hf_model.named_modules() if name.endswith("rotary_emb"))
    rotary = next(found, None)
    if rotary is None:
        return None
    types = getattr(hf_model.config, "layer_types", None) or [""] * n_layers
    tables = []
    for t in types:
        prefix = f"{t}_" if hasattr(rotary, f"{t}_inv_freq") else ""
        inv_freq = getattr(rotary, f"{prefix}inv_freq")
        scaling = float(getattr(rotary, f"{prefix}attention_scaling", 1.0))
        tables.append((inv_freq, scaling))
    return tables


class NativeLens(LensModel):
    """A decoder-only transformer computed by hand from its weights and block layout flags."""

    differentiable = True
    layers: list[dict[str, Tensor | None]]
    w_te: Tensor
    w_pe: Tensor | None = None
    lnf_w: Tensor
    lnf_b: Tensor | None = None
    eps: float
    rope: list[tuple[Tensor, float]] | None = None  # per layer: (inv_freq, attention scaling)
    windows: list[int | None] | None = None  # per layer: sliding window, None for full
    attn_scale: float | None = None  # query scale; None: d_head ** -0.5
    attn_softcap: float | None = None  # attention scores soft-capped at this value
    final_softcap: float | None = None  # logits soft-capped at this value (not linear then)
    w_unembed: Tensor  # [V, d] float32
    b_unembed: Tensor | None = None

    # ---- what a family supplies --------------------------------------------------------------
    weight_map: ClassVar[WeightMap]

    @abstractmethod
    def _layout(self, config: Any, d_head: int) -> dict[str, Any]:
        """The family's ModelSpec fields beyond the shapes: ``norm`` and the block layout flags
        (raise for a config this family's native path does not implement)."""

    def _read_spec(self, hf_model: Any) -> ModelSpec:
        config, shape = hf_model.config, config_shape(hf_model.config)
        return ModelSpec(
            family=self.family,
            architecture=type(hf_model).__name__,
            n_params=hf_model.num_parameters(),
            **shape,
            **self._layout(config, shape["d_head"]),
        )

    def _layer_weights(self, w: Weights, i: int) -> dict[str, Tensor | None]:
        """Block ``i``'s weights (a family may rearrange them, e.g. NeoX's fused q, k, v)."""
        return w.layer(self.weight_map, i)

    def _load(self, hf_model: Any) -> None:
        """Weights through the family's :class:`WeightMap`; rotary frequencies from the model's
        own rotary module, so every rope variant transformers supports is matched."""
        m = self.weight_map
        w = Weights(dict(hf_model.state_dict()), self.device, self.dtype, self.frame == "centered")
        self.eps = getattr(hf_model.config, m.eps)
        self.w_te = w(m.embed[0], writes=-1)
        self.w_pe = None if m.embed[1] is None else w(m.embed[1], writes=-1)
        self.layers = [self._layer_weights(w, i) for i in range(self.spec.n_layers)]
        self.lnf_w, self.lnf_b = w(m.final[0] + ".weight"), w.opt(m.final[0] + ".bias")
        # raw, float32 (float64 for float64): logits identical in both frames; tied models
        # reuse the token embedding
        self.w_unembed = w.unembedding(m.final[1] if w.has(m.final[1]) else m.embed[0])
        self.windows = sliding_windows(hf_model.config)
        if self.spec.rotary_dim:
            tables = rotary_tables(hf_model, self.spec.n_layers)
            if tables is None:
                raise ValueError(
                    f"{self.spec.architecture} has no rotary_emb module to take the rotary "
                    "frequencies from; load it with native=False (generic path)."
                )
            self.rope = [(f.to(self.device, torch.float32), s) for f, s in tables]
            n_freq = self.rope[0][0].numel()
            if 2 * n_freq != self.spec.rotary_dim:
                raise ValueError(
                    f"{self.spec.architecture}: the rotary module has {n_freq} "
                    f"frequencies, the config implies rotary_dim {self.spec.rotary_dim}; load it "
                    "with native=False (generic path)."
                )
        if self.spec.activation not in ACTIVATIONS:
            raise ValueError(
                f"The native path has no activation {self.spec.activation!r} (it has "
                f"{', '.join(ACTIVATIONS)}); load this model with native=False (generic path)."
            )

    # ---- the pieces of a block ---------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        """Token (+ learned position) embedding: [B, T] -> residual [B, T, d]."""
        x = self.w_te[tokens]
        return x if self.w_pe is None else x + self.w_pe[: tokens.shape[1]]

    def norm1(self, layer: int, x: Tensor) -> Tensor:
        """The norm in front of attention."""
        p = self.layers[layer]
        return norm(self.spec.norm, x, p["ln1_w"], p["ln1_b"], self.eps)  # type: ignore[arg-type]

    def norm2(self, layer: int, x: Tensor) -> Tensor:
        """The norm in front of the MLP."""
        p = self.layers[layer]
        return norm(self.spec.norm, x, p["ln2_w"], p["ln2_b"], self.eps)  # type: ignore[arg-type]

    def norm_final(self, x: Tensor) -> Tensor:
        """The final norm, in front of the unembedding."""
        return norm(self.spec.norm, x, self.lnf_w, self.lnf_b, self.eps)

    def qkv(self, layer: int, h: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, S, d] -> q [B, H, S, dh], k and v [B, H_kv, S, dh] (rotary applied)."""
        p, s = self.layers[layer], self.spec
        if "qkv_w" in p:
            q, k, v = F.linear(h, p["qkv_w"], p["qkv_b"]).split(  # type: ignore[arg-type]
                (s.n_heads * s.d_head, s.n_kv_heads * s.d_head, s.n_kv_heads * s.d_head), dim=-1
            )
        else:
            q = F.linear(h, p["q_w"], p["q_b"])  # type: ignore[arg-type]
            k = F.linear(h, p["k_w"], p["k_b"])  # type: ignore[arg-type]
            v = F.linear(h, p["v_w"], p["v_b"])  # type: ignore[arg-type]
        q, k, v = (
            split_heads(q, s.n_heads),
            split_heads(k, s.n_kv_heads),
            split_heads(v, s.n_kv_heads),
        )
        q, k = self.qk_norm(layer, q, k)
        if s.rotary_dim:
            cos, sin = self.rotary(layer, positions, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v

    def qk_norm(self, layer: int, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Norms of each head's query and key before rotary (none here; Gemma 3 has them)."""
        return q, k

    def rotary(self, layer: int, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin of ``positions`` for block ``layer`` (the model's rotary frequencies)."""
        inv_freq, scaling = self.rope[layer]  # type: ignore[index]
        return rotary_cos_sin(positions, inv_freq, scaling, dtype)

    def out_proj(self, layer: int, z: Tensor) -> Tensor:
        """Concatenated heads [B, S, H*dh] -> attn_out [B, S, d]."""
        p = self.layers[layer]
        return F.linear(z, p["o_w"], p["o_b"])  # type: ignore[arg-type]

    def mlp(self, layer: int, h: Tensor) -> Tensor:
        """[B, S, d] -> mlp_out [B, S, d]; gated: act(h W_gate) * (h W_in)."""
        p, act = self.layers[layer], ACTIVATIONS[self.spec.activation]
        up = F.linear(h, p["in_w"], p["in_b"])  # type: ignore[arg-type]
        hidden = act(F.linear(h, p["gate_w"], p["gate_b"])) * up if self.spec.gated_mlp else act(up)  # type: ignore[arg-type]
        return F.linear(hidden, p["out_w"], p["out_b"])  # type: ignore[arg-type]

    # ---- attention ---------------------------------------------------------------------------
    def window(self, layer: int) -> int | None:
        """Block ``layer``'s sliding window (keys a position attends to, itself included), or None
        for full causal attention."""
        return self.windows[layer] if self.windows else None

    def _softcap(self, scores: Tensor) -> Tensor:
        cap = self.attn_softcap
        return scores if cap is None else torch.tanh(scores / cap) * cap

    def _causal(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal attention of q [B, H, S, dh] over k, v [B, H_kv, S, dh] (grouped), within the
        layer's window, scores scaled and soft-capped; -> [B, H, S, dh]."""
        s = q.shape[2]
        window = self.window(layer)
        if self.attn_softcap is None and (window is None or window >= s):
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.attn_scale, enable_gqa=True
            )
        i = torch.arange(s, device=q.device)
        allowed = i[None, :] <= i[:, None]
        if window is not None:
            allowed = allowed & (i[None, :] > i[:, None] - window)
        if self.attn_softcap is None:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, scale=self.attn_scale, enable_gqa=True
            )
        b, n_heads, _, dh = q.shape
        n_kv = k.shape[1]
        qg = q.reshape(b, n_kv, n_heads // n_kv * s, dh)  # the heads of one KV group stacked
        scale = self.attn_scale or dh**-0.5
        scores = self._softcap((qg @ k.transpose(-1, -2)) * scale).reshape(b, n_heads, s, s)
        scores = scores.masked_fill(~allowed, float("-inf"))
        wide = torch.promote_types(scores.dtype, torch.float32)
        probs = torch.softmax(scores.to(wide), dim=-1).to(q.dtype)
        return (probs.reshape(b, n_kv, -1, s) @ v).reshape(b, n_heads, s, dh)

    def _attn_causal(
        self, kv_store: dict[int, tuple[Tensor, Tensor]] | None, min_layer: int
    ) -> AttnFn:
        """Full causal self-attention; optionally keep K, V of layers >= min_layer."""

        def attn(layer: int, h: Tensor, positions: Tensor) -> Tensor:
            q, k, v = self.qkv(layer, h, positions)
            if kv_store is not None and layer >= min_layer:
                kv_store[layer] = (k, v)
            z = self._causal(layer, q, k, v)
            b, _, s, _ = z.shape
            return self.out_proj(layer, z.transpose(1, 2).reshape(b, s, -1))

        return attn

    def _attn_rows(self, kv: dict[int, tuple[Tensor, Tensor]]) -> AttnFn:
        """Attention of n single rows per sequence against that sequence's clean K, V.

        Row (b, i) sits at position p = positions[b, i]: it attends to the clean keys of
        positions < p (within the layer's window: > p - W) and to its own (perturbed) key,
        exactly what a full forward with only position p changed computes at p.
        """

        def attn(layer: int, h: Tensor, positions: Tensor) -> Tensor:
            q, k_self, v_self = self.qkv(layer, h, positions)  # q [B,H,n,dh]; k,v [B,Hk,n,dh]
            k_clean, v_clean = kv[layer]  # [B, Hk, T, dh]
            b, n_heads, n, dh = q.shape
            n_kv, t = k_clean.shape[1], k_clean.shape[2]
            g = n_heads // n_kv
            qg = q.reshape(b, n_kv, g * n, dh)  # heads of one KV group side by side
            scale = self.attn_scale or dh**-0.5
            s_clean = (qg @ k_clean.transpose(-1, -2)).reshape(b, n_kv, g, n, t) * scale
            s_clean = self._softcap(s_clean)
            key, at = torch.arange(t, device=q.device), positions.reshape(b, 1, 1, n, 1)
            seen = key < at
            window = self.window(layer)
            if window is not None:
                seen = seen & (key > at - window)
            s_clean = s_clean.masked_fill(~seen, float("-inf"))
            s_self = (q.reshape(b, n_kv, g, n, dh) * k_self.unsqueeze(2)).sum(-1) * scale
            s_self = self._softcap(s_self)
            scores = torch.cat([s_clean, s_self.unsqueeze(-1)], dim=-1)
            wide = torch.promote_types(scores.dtype, torch.float32)  # float64 stays float64
            probs = torch.softmax(scores.to(wide), dim=-1).to(q.dtype)
            p_clean = probs[..., :t].reshape(b, n_kv, g * n, t)
            z = (p_clean @ v_clean).reshape(b, n_kv, g, n, dh)
            z = z + probs[..., t:] * v_self.unsqueeze(2)
            z = z.reshape(b, n_heads, n, dh).transpose(1, 2).reshape(b, n, n_heads * dh)
            return self.out_proj(layer, z)

        return attn

    # ---- the walk over hook points -------------------------------------------------------------
    def _walk(
        self,
        start: Hook,
        x: Tensor,
        positions: Tensor,
        attn: AttnFn,
        *,
        base: Tensor | None = None,
        reads: list[Hook] | tuple[()] = (),
        stop: Hook | None = None,
        keep_mid: Hook | None = None,
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Run the blocks (matrix products in ``self.precision``) from activation ``x`` at
        ``start`` to the end, or to ``stop``.

        ``base`` is the clean residual that an attn_out/mlp_out activation is added to (for a
        parallel block starting at attn_out, also the input its MLP reads). Returns the final
        normed hidden state (None if stopped) and the captured activations.
        """
        want = {r.name for r in reads}
        if stop is not None:
            want.add(stop.name)
        got: dict[str, Tensor] = {}

        def capture(layer: int, kind: int, value: Tensor) -> bool:
            name = f"blocks.{layer}.{HOOK_KINDS[kind]}"
            if name in want:
                got[name] = value
            return stop is not None and name == stop.name

        if capture(start.layer, start.kind_index, x):
            return None, got
        layer, phase = start.layer, start.kind_index
        resid = x if phase in (RESID_PRE, RESID_POST) else base + x  # type: ignore[operator]
        block_in = base  # what a parallel block's MLP reads
        with matmul_precision(self.precision, self.device):
            for lay in range(layer, self.spec.n_layers):
                fresh = lay > layer
                if fresh and capture(lay, RESID_PRE, resid):
                    return None, got
                if fresh or phase == RESID_PRE:
                    a = attn(lay, self.norm1(lay, resid), positions).to(resid.dtype)
                    if capture(lay, ATTN_OUT, a):
                        return None, got
                    block_in, resid = resid, resid + a
                if keep_mid is not None and lay == keep_mid.layer:
                    got["_resid_mid"] = resid
                if fresh or phase <= ATTN_OUT:
                    h = block_in if self.spec.parallel_attn_mlp else resid
                    m = self.mlp(lay, self.norm2(lay, h)).to(resid.dtype)  # type: ignore[arg-type]
                    if capture(lay, MLP_OUT, m):
                        return None, got
                    resid = resid + m
                    if capture(lay, RESID_POST, resid):
                        return None, got
            return self.norm_final(resid), got

    # ---- LensModel ---------------------------------------------------------------------------
    def _run_to_hook(self, tokens: Tensor, hook: Hook) -> Tensor:
        pos = torch.arange(tokens.shape[1], device=self.device)
        start = Hook(0, RESID_PRE)
        _, got = self._walk(start, self.embed(tokens), pos, self._attn_causal(None, 0), stop=hook)
        return got[hook.name]

    def _run_clean(self, tokens: Tensor, hook: Hook, reads: list[Hook], keep_kv: bool) -> CleanRun:
        pos = torch.arange(tokens.shape[1], device=self.device)
        kv: dict[int, tuple[Tensor, Tensor]] = {}
        want = [*reads, hook, Hook(hook.layer, RESID_PRE)]
        attn = self._attn_causal(kv if keep_kv else None, hook.layer)
        final, got = self._walk(
            Hook(0, RESID_PRE), self.embed(tokens), pos, attn, reads=want, keep_mid=hook
        )
        assert final is not None
        kind = hook.kind_index
        cache = NativeCache(
            resid_pre=got[f"blocks.{hook.layer}.hook_resid_pre"] if kind == ATTN_OUT else None,
            resid_mid=got["_resid_mid"] if kind == MLP_OUT else None,
            kv=kv,
        )
        return CleanRun(
            tokens=tokens,
            hook=hook,
            x=got[hook.name],
            final=final,
            reads={r.name: got[r.name] for r in reads},
            cache=cache,
        )

    def _base(self, clean: CleanRun) -> Tensor | None:
        cache: NativeCache = clean.cache
        kind = clean.hook.kind_index
        return cache.resid_pre if kind == ATTN_OUT else cache.resid_mid if kind == MLP_OUT else None

    def _continue_all(
        self, clean: CleanRun, x_new: Tensor, k: int, reads: list[Hook]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        b, t, d = clean.x.shape
        flat = x_new.to(self.device, self.dtype).reshape(b * k, t, d)
        base = self._base(clean)
        if base is not None:
            base = base.unsqueeze(1).expand(b, k, t, d).reshape(b * k, t, d)
        pos = torch.arange(t, device=self.device)
        final, got = self._walk(
            clean.hook, flat, pos, self._attn_causal(None, 0), base=base, reads=reads
        )
        assert final is not None
        return final.reshape(b, k, t, d), {n: v.reshape(b, k, t, d) for n, v in got.items()}

    def _continue_at(
        self, clean: CleanRun, x_new: Tensor, positions: Tensor, n: int, reads: list[Hook]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        b, _t, d = clean.x.shape
        cache: NativeCache = clean.cache
        first_attn = clean.hook.layer + (clean.hook.kind_index > RESID_PRE)
        missing = [lay for lay in range(first_attn, self.spec.n_layers) if lay not in cache.kv]
        if missing:
            raise ValueError("continue_at needs run_clean(..., keep_kv=True).")
        base = self._base(clean)
        if base is not None:
            base = torch.gather(base, 1, positions.unsqueeze(-1).expand(b, n, d))
        x_new = x_new.to(self.device, self.dtype)
        final, got = self._walk(
            clean.hook, x_new, positions, self._attn_rows(cache.kv), base=base, reads=reads
        )
        assert final is not None
        return final, got

    def unembed(self, final: Tensor) -> Tensor:
        logits = F.linear(final.to(self.w_unembed.dtype), self.w_unembed, self.b_unembed)
        cap = self.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def linear_unembedding(self) -> tuple[Tensor, Tensor | None] | None:
        """``(W, b)``, or None where the logits are soft-capped (then not linear)."""
        return None if self.final_softcap is not None else (self.w_unembed, self.b_unembed)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> ``tf32`` on CUDA, ``float32`` elsewhere; other names are checked."""
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}.")
    if precision == "auto":
        return "tf32" if torch.device(device).type == "cuda" else "float32"
    return precision


@contextmanager
def matmul_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Matrix products of the blocks in ``precision``: ``bf16-matmul`` (autocast: bf16 products,
    float32 norms, softmax and residual stream), ``tf32`` (CUDA TF32 products) or ``float32``.
    The unembedding and log-softmax run outside, in float32."""
    if precision == "bf16-matmul":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    elif precision == "tf32" and device.type == "cuda":
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    else:
        yield
