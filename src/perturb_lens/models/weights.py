"""A native family's weight mapping: where its Hugging Face state dict keeps each weight.

A family declares one :class:`WeightMap`; :func:`read_weights` turns a state dict into the
model-wide tensors and the per-layer dicts the native block forward reads
(``models/native.py``), keyed ``{role}_w`` / ``{role}_b`` (bias None when absent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from perturb_lens.models.layers import centered

WRITERS = ("o", "out")  # roles whose output is added to the residual stream


@dataclass(frozen=True)
class WeightMap:
    """Names in a family's HF state dict.

    ``embed``: token embedding and learned position embedding (or None). ``block``: prefix of
    block ``i`` (``{}`` for i). Modules under the block: ``norms``, the norms in front of attention
    and of the MLP (roles ``ln1``, ``ln2``); ``modules``: role -> module for attention's ``qkv``
    (fused, rows q, k, v) or ``q``, ``k``, ``v``, and ``o``, and the MLP's ``in``, ``out`` and, if
    gated, ``gate``. ``final``: final norm module and unembedding weight (the token embedding when
    the state lacks it: tied). ``eps``: the config attribute of the norms' epsilon. ``conv1d``:
    linear weights stored [in, out] (GPT-2).
    """

    embed: tuple[str, str | None]
    block: str
    norms: tuple[str, str]
    modules: dict[str, str]
    final: tuple[str, str]
    eps: str
    conv1d: bool = False


class Weights:
    """A state dict read onto a device: block weights in ``dtype`` (transposed for ``conv1d``,
    centered when ``center``), the unembedding in float32 (float64 for float64)."""

    def __init__(
        self, state: dict[str, Tensor], device: torch.device, dtype: torch.dtype, center: bool
    ) -> None:
        self.state, self.device, self.dtype, self.center = state, device, dtype, center
        # centering is computed in float64 for float64 lenses, else in float32
        self.compute = torch.float64 if dtype == torch.float64 else torch.float32

    def has(self, name: str) -> bool:
        return name in self.state

    def unembedding(self, name: str) -> Tensor:
        """``name`` untouched, in float32 (float64 for a float64 lens): the unembedding."""
        wide = torch.promote_types(self.dtype, torch.float32)
        return self.state[name].to(self.device, wide).contiguous()

    def __call__(self, name: str, *, t: bool = False, writes: int | None = None) -> Tensor:
        """``name`` in the lens dtype; ``t``: transposed; ``writes``: the d_model axis of a weight
        that writes to the residual stream (its mean there is removed in the centered frame)."""
        w = self.state[name].to(self.device, self.compute)
        w = w.T if t else w
        if self.center and writes is not None:
            w = centered(w, writes)
        return w.to(self.dtype).contiguous()

    def opt(self, name: str, **kwargs: Any) -> Tensor | None:
        """``name`` if the state has it (optional biases), else None."""
        return self(name, **kwargs) if self.has(name) else None

    def layer(self, wmap: WeightMap, i: int) -> dict[str, Tensor | None]:
        """Block ``i``'s weights as ``{role}_w`` / ``{role}_b``."""
        out: dict[str, Tensor | None] = {}
        ln1, ln2 = wmap.norms
        for role, module in {"ln1": ln1, "ln2": ln2, **wmap.modules}.items():
            name = wmap.block.format(i) + module
            writes = 0 if role in WRITERS else None
            t = wmap.conv1d and self.state[name + ".weight"].ndim == 2
            out[f"{role}_w"] = self(name + ".weight", t=t, writes=writes)
            out[f"{role}_b"] = self.opt(name + ".bias", writes=writes)
        return out
