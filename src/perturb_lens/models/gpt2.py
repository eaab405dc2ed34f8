"""GPT-2 family, native: LayerNorm, learned positions, GELU (tanh), tied unembedding.

Frames: ``centered`` (default) subtracts the mean over d_model from every weight that writes to
the residual stream (token and position embeddings, attention and MLP output projections), as
TransformerLens' ``center_writing_weights`` does. The residual stream then equals the raw one
minus its mean over d_model, exactly; LayerNorm removes that mean anyway, so logits do not change.
The unembedding keeps the raw token embedding (centering it would change the logits).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from perturb_lens.models.base import ModelSpec
from perturb_lens.models.native import NativeLens, split_heads


def _centered(w: Tensor, dim: int) -> Tensor:
    return w - w.mean(dim=dim, keepdim=True)


class GPT2Lens(NativeLens):
    """GPT-2 (Hugging Face ``GPT2LMHeadModel`` weights) on the native path."""

    def __init__(
        self,
        state: dict[str, Tensor],
        config: Any,
        tokenizer: Any,
        *,
        frame: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        source: str = "",
        n_params: int = 0,
    ) -> None:
        d, n_heads = config.n_embd, config.n_head
        self.spec = ModelSpec(
            family="gpt2",
            architecture="GPT2LMHeadModel",
            n_layers=config.n_layer,
            d_model=d,
            n_heads=n_heads,
            n_kv_heads=n_heads,
            d_head=d // n_heads,
            d_mlp=config.n_inner or 4 * d,
            vocab_size=config.vocab_size,
            n_ctx=config.n_positions,
            norm="layernorm",
            n_params=n_params,
        )
        if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(
            config, "reorder_and_upcast_attn", False
        ):
            raise ValueError(
                "This GPT-2 variant scales attention by layer index or reorders it; the native "
                "path does not implement that. Load it with native=False (generic path)."
            )
        self.tokenizer = tokenizer
        self.frame = self.check_frame(frame or "centered")
        self.dtype, self.device, self.source = dtype, torch.device(device), source
        self.eps = config.layer_norm_epsilon
        center = self.frame == "centered"
        p = "transformer." if "transformer.wte.weight" in state else ""

        def get(name: str) -> Tensor:
            return state[p + name].to(self.device, torch.promote_types(dtype, torch.float32))

        def w(name: str) -> Tensor:
            return get(name).to(dtype).contiguous()

        wte = get("wte.weight")
        self.w_unembed = wte.contiguous()  # raw, float32: logits identical in both frames
        self.w_te = (_centered(wte, -1) if center else wte).to(dtype)
        self.w_pe = (_centered(get("wpe.weight"), -1) if center else get("wpe.weight")).to(dtype)
        self.layers: list[dict[str, Tensor]] = []
        for i in range(config.n_layer):
            h = f"h.{i}."
            # HF Conv1D stores [in, out]; F.linear wants [out, in].
            w_o, b_o = get(h + "attn.c_proj.weight").T, get(h + "attn.c_proj.bias")
            w_out, b_out = get(h + "mlp.c_proj.weight").T, get(h + "mlp.c_proj.bias")
            if center:
                w_o, b_o = _centered(w_o, 0), _centered(b_o, 0)
                w_out, b_out = _centered(w_out, 0), _centered(b_out, 0)
            self.layers.append(
                {
                    "ln1_w": w(h + "ln_1.weight"),
                    "ln1_b": w(h + "ln_1.bias"),
                    "w_qkv": get(h + "attn.c_attn.weight").T.to(dtype).contiguous(),
                    "b_qkv": w(h + "attn.c_attn.bias"),
                    "w_o": w_o.to(dtype).contiguous(),
                    "b_o": b_o.to(dtype),
                    "ln2_w": w(h + "ln_2.weight"),
                    "ln2_b": w(h + "ln_2.bias"),
                    "w_in": get(h + "mlp.c_fc.weight").T.to(dtype).contiguous(),
                    "b_in": w(h + "mlp.c_fc.bias"),
                    "w_out": w_out.to(dtype).contiguous(),
                    "b_out": b_out.to(dtype),
                }
            )
        self.lnf_w, self.lnf_b = w("ln_f.weight"), w("ln_f.bias")

    @classmethod
    def from_hf(
        cls,
        hf_model: Any,
        tokenizer: Any,
        *,
        frame: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        source: str = "",
    ) -> GPT2Lens:
        """Build from a loaded ``GPT2LMHeadModel`` (its weights are copied, the model dropped)."""
        return cls(
            dict(hf_model.state_dict()),
            hf_model.config,
            tokenizer,
            frame=frame,
            dtype=dtype,
            device=device,
            source=source,
            n_params=hf_model.num_parameters(),
        )

    # ---- family pieces -------------------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        return self.w_te[tokens] + self.w_pe[: tokens.shape[1]]

    def _ln(self, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return F.layer_norm(x, (x.shape[-1],), w, b, self.eps)

    def norm1(self, layer: int, x: Tensor) -> Tensor:
        p = self.layers[layer]
        return self._ln(x, p["ln1_w"], p["ln1_b"])

    def norm2(self, layer: int, x: Tensor) -> Tensor:
        p = self.layers[layer]
        return self._ln(x, p["ln2_w"], p["ln2_b"])

    def norm_final(self, x: Tensor) -> Tensor:
        return self._ln(x, self.lnf_w, self.lnf_b)

    def qkv(self, layer: int, h: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p = self.layers[layer]
        q, k, v = F.linear(h, p["w_qkv"], p["b_qkv"]).split(self.spec.d_model, dim=-1)
        n = self.spec.n_heads
        return split_heads(q, n), split_heads(k, n), split_heads(v, n)

    def out_proj(self, layer: int, z: Tensor) -> Tensor:
        p = self.layers[layer]
        return F.linear(z, p["w_o"], p["b_o"])

    def mlp(self, layer: int, h: Tensor) -> Tensor:
        p = self.layers[layer]
        return F.linear(
            F.gelu(F.linear(h, p["w_in"], p["b_in"]), approximate="tanh"), p["w_out"], p["b_out"]
        )
