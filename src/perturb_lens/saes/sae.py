"""The sparse autoencoder type: weights, activations, encode/decode, compatibility checks.

Conventions follow SAELens: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]``, ``b_dec [d_in]``; encode ``act((x - b_dec) @ W_enc + b_enc)`` (the
``- b_dec`` only when ``apply_b_dec_to_input``), decode ``f @ W_dec + b_dec``. Activations:

- ``relu``: ``relu(h)``;
- ``topk``: the ``k`` largest pre-activations per token, then ``relu`` (zeros elsewhere);
- ``jumprelu``: ``relu(h) * (h > threshold)``.

``normalize_activations`` has SAELens' run-time meaning: ``none`` and ``expected_average_only_in``
(a dataset-wide scale folded into the weights when saved) change nothing at inference;
``constant_norm_rescale`` scales each input to norm ``sqrt(d_in)`` and the output back;
``layer_norm`` centres and standardises each input over ``d_in`` and undoes it on the output.

An SAE records the hook it was trained at and the activation frame (``centered`` residuals of
TransformerLens' processed LayerNorm models, or ``raw``); :meth:`SAE.check_compatible` refuses any
other hook, width or frame.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from perturb_lens.config.options import FRAMES

Activation = Literal["relu", "topk", "jumprelu"]
Normalization = Literal["none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)
LAYER_NORM_EPS = 1e-5  # SAELens' epsilon for normalize_activations="layer_norm"


class SAEMismatchError(ValueError):
    """An SAE used at a hook, width or frame other than the one it was trained for."""


@dataclass
class SAEConfig:
    """What defines an SAE besides its weights (SAELens' names where SAELens has them)."""

    d_in: int
    d_sae: int
    activation: Activation = "relu"
    k: int | None = None  # topk only
    apply_b_dec_to_input: bool = True
    normalize_activations: Normalization = "none"
    hook: str = ""  # TransformerLens hook name, e.g. blocks.6.hook_resid_pre
    frame: Literal[FRAMES] = "raw"
    model: str = ""  # the model it was trained on
    skip_bos: bool = False  # trained without BOS: SAE directions leave the BOS position alone
    metadata: dict[str, Any] = field(default_factory=dict)  # anything else (training info...)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"Unknown SAE activation {self.activation!r}; use one of {ACTIVATIONS}"
            )
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(
                f"Unknown normalize_activations {self.normalize_activations!r}; "
                f"use one of {NORMALIZATIONS}"
            )
        if self.activation == "topk" and (self.k is None or not 0 < self.k <= self.d_sae):
            raise ValueError(f"A topk SAE needs 0 < k <= d_sae={self.d_sae}; got k={self.k}")
        if self.frame not in FRAMES:
            raise ValueError(f"Unknown frame {self.frame!r}; use 'centered' or 'raw'")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _cfg_field(name: str) -> property:
    """A read-only property that forwards to ``self.cfg.<name>``."""
    return property(lambda self: getattr(self.cfg, name), doc=f"``cfg.{name}``.")


class SAE(nn.Module):
    """A sparse autoencoder over activations [..., d_in] (see the module docstring)."""

    def __init__(self, cfg: SAEConfig, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype))
        self.threshold: nn.Parameter | None = None
        self.alive: Tensor | None = None  # bool [d_sae] over a dataset, set by the engine
        if cfg.activation == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae, dtype=dtype))

    # ---- shape and identity ------------------------------------------------------------------
    d_in = _cfg_field("d_in")
    d_sae = _cfg_field("d_sae")
    hook = _cfg_field("hook")
    frame = _cfg_field("frame")

    def __repr__(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.activation == "topk" else ""
        return (
            f"SAE(d_in={c.d_in}, d_sae={c.d_sae}, {c.activation}{k}, hook={c.hook!r}, "
            f"frame={c.frame!r}, model={c.model!r})"
        )

    def check_compatible(self, hook: str, d_model: int, frame: str) -> None:
        """Raise :class:`SAEMismatchError` unless this SAE fits ``hook``, ``d_model``, ``frame``."""
        problems = []
        if self.cfg.d_in != d_model:
            problems.append(f"its width d_in={self.cfg.d_in} differs from d_model={d_model}")
        if self.cfg.hook and self.cfg.hook != hook:
            problems.append(f"it was trained at {self.cfg.hook!r}, not at {hook!r}")
        if self.cfg.frame != frame:
            problems.append(f"it reads {self.cfg.frame!r} activations, the run uses {frame!r}")
        if problems:
            raise SAEMismatchError(
                f"{self!r} does not fit this experiment: {'; '.join(problems)}. Use an SAE "
                f"trained at {hook} of this model (perturb-lens sae train), or set the "
                f"experiment's hook/frame to the SAE's ({self.cfg.hook or '?'}, {self.cfg.frame})."
            )

    # ---- compute -----------------------------------------------------------------------------
    def _normalize_in(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Run-time input normalisation; returns the input and what undoes it (scale, shift)."""
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            coeff = self.cfg.d_in**0.5 / x.norm(dim=-1, keepdim=True)
            return x * coeff, (1.0 / coeff, torch.zeros_like(coeff))
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            xc = x - mu
            std = xc.std(dim=-1, keepdim=True)
            return xc / (std + LAYER_NORM_EPS), (std, mu)
        return x, None

    def pre_activation(self, x: Tensor) -> Tensor:
        """``h = (x - b_dec) @ W_enc + b_enc`` [..., d_sae] (input already normalised)."""
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activation(self, h: Tensor) -> Tensor:
        """The nonlinearity applied to pre-activations ``h`` [..., d_sae]."""
        if self.cfg.activation == "topk":
            top = torch.topk(h, int(self.cfg.k or 0), dim=-1)
            return torch.zeros_like(h).scatter(-1, top.indices, torch.relu(top.values))
        if self.cfg.activation == "jumprelu":
            assert self.threshold is not None
            return torch.relu(h) * (h > self.threshold).to(h.dtype)
        return torch.relu(h)

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations ``f`` [..., d_sae] of activations ``x`` [..., d_in]."""
        return self.activation(self.pre_activation(self._normalize_in(x)[0]))

    def decode(self, f: Tensor) -> Tensor:
        """``f @ W_dec + b_dec`` [..., d_in] (in the normalised space if the SAE normalises)."""
        return f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction ``SAE(x)`` [..., d_in], in ``x``'s dtype."""
        return self.encode_decode(x)[1]

    def encode_decode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(f, SAE(x))`` in one pass (training and statistics need both)."""
        xn, undo = self._normalize_in(x.to(self.W_enc.dtype))
        f = self.activation(self.pre_activation(xn))
        out = self.decode(f)
        if undo is not None:
            out = out * undo[0] + undo[1]
        return f, out.to(x.dtype)

    def error(self, x: Tensor) -> Tensor:
        """The reconstruction error ``SAE(x) - x`` [..., d_in]."""
        return self.forward(x) - x

    def decoder_directions(self) -> Tensor:
        """Unit decoder rows [d_sae, d_in] (float32): the direction each latent writes."""
        w = self.W_dec.detach().double()
        return (w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)).float()

    # ---- io ----------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` (SAELens' folder format)."""
        from perturb_lens.saes.format import save_saelens_folder

        return save_saelens_folder(self, folder)
