"""The native forward shared by the decoder families: stop at a hook, continue from it.

Written by hand on purpose: this is the fast path the whole tool exists for. Hugging Face models
cannot start in the middle of the network, nor run single rows against another pass's keys and
values. A family (``gpt2.py``, ``llama.py``) supplies only its pieces: embedding, norms, q/k/v
projection (with its positional scheme), output projection and MLP.

One block, in TransformerLens' names::

    resid_pre ─ norm1 ─ attn ─▶ attn_out;  resid_mid = resid_pre + attn_out
    resid_mid ─ norm2 ─ mlp  ─▶ mlp_out;   resid_post = resid_mid + mlp_out
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from perturb_lens.models.base import CleanRun, LensModel
from perturb_lens.models.hooks import HOOK_KINDS, Hook

RESID_PRE, ATTN_OUT, MLP_OUT, RESID_POST = range(4)
PRECISIONS = ("auto", "float32", "tf32", "bf16-matmul")

# attention(layer, normed input [B, S, d], positions [S] or [B, S]) -> attn_out [B, S, d]
AttnFn = Callable[[int, Tensor, Tensor], Tensor]


@dataclass
class NativeCache:
    """What continuing from a hook needs from the clean pass."""

    resid_pre: Tensor | None  # [B, T, d] at the hook's block (for attn_out hooks)
    resid_mid: Tensor | None  # [B, T, d] at the hook's block (for mlp_out hooks)
    kv: dict[int, tuple[Tensor, Tensor]]  # layer -> clean (K, V), each [B, H_kv, T, d_head]


class NativeLens(LensModel):
    """A decoder-only transformer with sequential blocks, computed by hand."""

    # ---- family pieces -------------------------------------------------------------------------
    @abstractmethod
    def embed(self, tokens: Tensor) -> Tensor:
        """Token (+ position) embedding: [B, T] -> residual [B, T, d]."""

    @abstractmethod
    def norm1(self, layer: int, x: Tensor) -> Tensor:
        """The norm in front of attention."""

    @abstractmethod
    def norm2(self, layer: int, x: Tensor) -> Tensor:
        """The norm in front of the MLP."""

    @abstractmethod
    def norm_final(self, x: Tensor) -> Tensor:
        """The final norm, in front of the unembedding."""

    @abstractmethod
    def qkv(self, layer: int, h: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, S, d] -> q [B, H, S, dh], k and v [B, H_kv, S, dh] (positional scheme applied)."""

    @abstractmethod
    def out_proj(self, layer: int, z: Tensor) -> Tensor:
        """Concatenated heads [B, S, H*dh] -> attn_out [B, S, d]."""

    @abstractmethod
    def mlp(self, layer: int, h: Tensor) -> Tensor:
        """[B, S, d] -> mlp_out [B, S, d]."""

    # ---- attention ---------------------------------------------------------------------------
    def _attn_causal(
        self, kv_store: dict[int, tuple[Tensor, Tensor]] | None, min_layer: int
    ) -> AttnFn:
        """Full causal self-attention; optionally keep K, V of layers >= min_layer."""

        def attn(layer: int, h: Tensor, positions: Tensor) -> Tensor:
            q, k, v = self.qkv(layer, h, positions)
            if kv_store is not None and layer >= min_layer:
                kv_store[layer] = (k, v)
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            b, _, s, _ = z.shape
            return self.out_proj(layer, z.transpose(1, 2).reshape(b, s, -1))

        return attn

    def _attn_rows(self, kv: dict[int, tuple[Tensor, Tensor]]) -> AttnFn:
        """Attention of n single rows per sequence against that sequence's clean K, V.

        Row (b, i) sits at position p = positions[b, i]: it attends to the clean keys of
        positions < p and to its own (perturbed) key, exactly what a full forward with only
        position p changed computes at p.
        """

        def attn(layer: int, h: Tensor, positions: Tensor) -> Tensor:
            q, k_self, v_self = self.qkv(layer, h, positions)  # q [B,H,n,dh]; k,v [B,Hk,n,dh]
            k_clean, v_clean = kv[layer]  # [B, Hk, T, dh]
            b, n_heads, n, dh = q.shape
            n_kv, t = k_clean.shape[1], k_clean.shape[2]
            g = n_heads // n_kv
            qg = q.reshape(b, n_kv, g * n, dh)  # heads of one KV group side by side
            scale = dh**-0.5
            s_clean = (qg @ k_clean.transpose(-1, -2)).reshape(b, n_kv, g, n, t) * scale
            earlier = torch.arange(t, device=q.device) < positions.reshape(b, 1, 1, n, 1)
            s_clean = s_clean.masked_fill(~earlier, float("-inf"))
            s_self = (q.reshape(b, n_kv, g, n, dh) * k_self.unsqueeze(2)).sum(-1) * scale
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
    def _walk(self, *args, **kwargs) -> tuple[Tensor | None, dict[str, Tensor]]:
        """:meth:`_walk_blocks` with the block matrix products in ``self.precision``."""
        with matmul_precision(getattr(self, "precision", "float32"), self.device):
            return self._walk_blocks(*args, **kwargs)

    def _walk_blocks(
        self,
        start: Hook,
        x: Tensor,
        positions: Tensor,
        attn: AttnFn,
        *,
        base: Tensor | None = None,
        reads: Sequence[Hook] = (),
        stop: Hook | None = None,
        keep_mid: Hook | None = None,
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Run from activation ``x`` at ``start`` to the end (or to ``stop``).

        ``base`` is the clean residual that an attn_out/mlp_out activation is added to.
        Returns the final normed hidden state (None if stopped) and the captured activations.
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
        for lay in range(layer, self.spec.n_layers):
            fresh = lay > layer
            if fresh and capture(lay, RESID_PRE, resid):
                return None, got
            if fresh or phase == RESID_PRE:
                a = attn(lay, self.norm1(lay, resid), positions).to(resid.dtype)
                if capture(lay, ATTN_OUT, a):
                    return None, got
                resid = resid + a
            if keep_mid is not None and lay == keep_mid.layer:
                got["_resid_mid"] = resid
            if fresh or phase <= ATTN_OUT:
                m = self.mlp(lay, self.norm2(lay, resid)).to(resid.dtype)
                if capture(lay, MLP_OUT, m):
                    return None, got
                resid = resid + m
                if capture(lay, RESID_POST, resid):
                    return None, got
        return self.norm_final(resid), got

    # ---- LensModel ---------------------------------------------------------------------------
    def _check_tokens(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq]; got shape {tuple(tokens.shape)}.")
        if tokens.shape[1] > self.spec.n_ctx:
            raise ValueError(
                f"Sequence length {tokens.shape[1]} exceeds the model's context of "
                f"{self.spec.n_ctx} tokens; use a shorter seq_len."
            )
        return tokens.to(self.device)

    @torch.inference_mode()
    def run_to_hook(self, tokens: Tensor, hook: str | Hook) -> Tensor:
        h = self.parse_hook(hook)
        tokens = self._check_tokens(tokens)
        pos = torch.arange(tokens.shape[1], device=self.device)
        start = Hook(0, RESID_PRE)
        _, got = self._walk(start, self.embed(tokens), pos, self._attn_causal(None, 0), stop=h)
        return got[h.name]

    @torch.inference_mode()
    def run_clean(
        self, tokens: Tensor, hook: str | Hook, *, reads: Sequence[str] = (), keep_kv: bool = False
    ) -> CleanRun:
        h = self.parse_hook(hook)
        read_hooks = self._check_reads(h, reads)
        tokens = self._check_tokens(tokens)
        pos = torch.arange(tokens.shape[1], device=self.device)
        kv: dict[int, tuple[Tensor, Tensor]] = {}
        want = [*read_hooks, h, Hook(h.layer, RESID_PRE)]
        attn = self._attn_causal(kv if keep_kv else None, h.layer)
        final, got = self._walk(
            Hook(0, RESID_PRE), self.embed(tokens), pos, attn, reads=want, keep_mid=h
        )
        assert final is not None
        cache = NativeCache(
            resid_pre=got[f"blocks.{h.layer}.hook_resid_pre"] if h.kind_index == ATTN_OUT else None,
            resid_mid=got["_resid_mid"] if h.kind_index == MLP_OUT else None,
            kv=kv,
        )
        return CleanRun(
            tokens=tokens,
            hook=h,
            x=got[h.name],
            final=final,
            reads={r.name: got[r.name] for r in read_hooks},
            cache=cache,
        )

    def _base(self, clean: CleanRun) -> Tensor | None:
        cache: NativeCache = clean.cache
        kind = clean.hook.kind_index
        return cache.resid_pre if kind == ATTN_OUT else cache.resid_mid if kind == MLP_OUT else None

    @torch.inference_mode()
    def continue_all(
        self, clean: CleanRun, x_new: Tensor, *, reads: Sequence[str] = ()
    ) -> tuple[Tensor, dict[str, Tensor]]:
        read_hooks = self._check_reads(clean.hook, reads)
        b, t, d = clean.x.shape
        k = self._check_continue(clean, x_new, None)
        flat = x_new.to(self.device, self.dtype).reshape(b * k, t, d)
        base = self._base(clean)
        if base is not None:
            base = base.unsqueeze(1).expand(b, k, t, d).reshape(b * k, t, d)
        pos = torch.arange(t, device=self.device)
        final, got = self._walk(
            clean.hook, flat, pos, self._attn_causal(None, 0), base=base, reads=read_hooks
        )
        assert final is not None
        return final.reshape(b, k, t, d), {n: v.reshape(b, k, t, d) for n, v in got.items()}

    @torch.inference_mode()
    def continue_at(
        self,
        clean: CleanRun,
        x_new: Tensor,
        positions: Tensor,
        *,
        reads: Sequence[str] = (),
    ) -> tuple[Tensor, dict[str, Tensor]]:
        read_hooks = self._check_reads(clean.hook, reads)
        b, _t, d = clean.x.shape
        positions = positions.to(self.device).long()
        n = self._check_continue(clean, x_new, positions)
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
            clean.hook, x_new, positions, self._attn_rows(cache.kv), base=base, reads=read_hooks
        )
        assert final is not None
        return final, got

    def unembed(self, final: Tensor) -> Tensor:
        return F.linear(final.to(self.w_unembed.dtype), self.w_unembed, self.b_unembed)

    def linear_unembedding(self) -> tuple[Tensor, Tensor | None]:
        return self.w_unembed, self.b_unembed

    w_unembed: Tensor  # [V, d] float32
    b_unembed: Tensor | None = None


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


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm as Llama computes it (in float32, or float64 for float64, scaled after casting
    back)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """[B, S, H*dh] -> [B, H, S, dh]."""
    b, s, _ = x.shape
    return x.reshape(b, s, n_heads, -1).transpose(1, 2)


def count_params(tensors: Sequence[Tensor]) -> int:
    """Number of distinct parameters (shared storages counted once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.numel()
    return total
