"""The model interface every experiment stands on: run to a hook, then continue from it.

A perturbation experiment runs the clean model once, takes the activation ``x`` at a hook, and
then runs *only the rest of the model* from that hook, many times, with ``x`` replaced. Two ways
of continuing exist:

- :meth:`LensModel.continue_all`: whole sequences with every position replaced (``k`` copies per
  sequence, e.g. one per perturbation length);
- :meth:`LensModel.continue_at`: ``n`` single positions per sequence, each replaced alone and
  measured at that position only. Earlier positions are unaffected by a later perturbation in a
  causal model, so each row attends to the *clean* keys/values of its sequence: one token's worth
  of compute per row instead of a whole forward pass.

Both return the final normed hidden state (the input of the unembedding) and any requested
downstream hook activations; :meth:`LensModel.unembed` turns the former into float32 logits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import torch
from torch import Tensor

from perturb_lens.common.hooks import Hook, hook_names, last_resid_post, parse_hook
from perturb_lens.config.options import FRAMES, default_frame
from perturb_lens.models.registry import native_families


@dataclass(frozen=True)
class ModelSpec:
    """Shape facts of a decoder-only transformer, and the layout of its blocks (native path)."""

    family: str  # a registered family (models/registry.py), e.g. "gpt2", "llama", "generic"
    architecture: str  # e.g. "GPT2LMHeadModel", "LlamaForCausalLM"
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    vocab_size: int
    n_ctx: int
    norm: str  # "layernorm" | "rmsnorm"
    n_params: int = 0
    # block layout, read by the native block forward (models/native.py)
    parallel_attn_mlp: bool = False  # the MLP reads the block input, as attention does (NeoX)
    rotary_dim: int = 0  # leading dims of each head rotated (0: none; < d_head: partial rotary)
    activation: str = ""  # MLP nonlinearity, Hugging Face name: gelu_new, gelu, silu, ...
    gated_mlp: bool = False  # act(h W_gate) * (h W_up), then W_down (SwiGLU)


def config_shape(cfg: Any) -> dict[str, int]:
    """The shape fields of a ModelSpec from a Hugging Face config (standard attribute names,
    which GPT-2's config maps too; fallbacks for the rest)."""
    d_model, n_heads = cfg.hidden_size, cfg.num_attention_heads
    return {
        "n_layers": cfg.num_hidden_layers,
        "d_model": d_model,
        "n_heads": n_heads,
        "n_kv_heads": getattr(cfg, "num_key_value_heads", None) or n_heads,
        "d_head": getattr(cfg, "head_dim", None) or d_model // n_heads,
        "d_mlp": getattr(cfg, "intermediate_size", None)
        or getattr(cfg, "n_inner", None)
        or getattr(cfg, "ffn_dim", None)
        or 4 * d_model,
        "vocab_size": cfg.vocab_size,
        "n_ctx": getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 0),
    }


@dataclass
class CleanRun:
    """The clean pass over a token batch, with what is needed to continue from ``hook``.

    ``x``: activation at the hook [B, T, d] in the model's frame. ``final``: final normed hidden
    state [B, T, d]. ``reads``: requested downstream activations, each [B, T, d]. ``cache``:
    model-specific state for continuing (clean keys/values of later layers, residuals at the hook's
    block); opaque to callers.
    """

    tokens: Tensor
    hook: Hook
    x: Tensor
    final: Tensor
    reads: dict[str, Tensor] = field(default_factory=dict)
    cache: Any = None


class LensModel(ABC):
    """A causal LM that can stop at a hook and continue from it. Subclasses: native and generic.

    The public methods validate their arguments and call the subclass's ``_``-prefixed ones.
    """

    family: ClassVar[str]  # the name it is registered under (models/registry.py)
    differentiable: ClassVar[bool] = False  # _continue_all can run under autograd
    spec: ModelSpec
    tokenizer: Any
    frame: str
    source: str
    dtype: torch.dtype
    device: torch.device
    precision: str = "float32"  # block matmuls: float32 | tf32 | bf16-matmul (native models)

    def __init__(
        self,
        hf_model: Any,
        tokenizer: Any,
        *,
        frame: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        source: str = "",
    ) -> None:
        """The preamble of every lens: spec, frame (default by norm) and placement; then
        :meth:`_load` takes what it needs from the Hugging Face model."""
        self.spec = self._read_spec(hf_model)
        self.frame = self.check_frame(frame or self.default_frame())
        self.tokenizer = tokenizer
        self.dtype, self.device, self.source = dtype, torch.device(device), source
        self._load(hf_model)

    @classmethod
    def from_hf(cls, hf_model: Any, tokenizer: Any, **options: Any) -> Self:
        """Wrap a loaded Hugging Face causal LM; ``options``: frame, dtype, device, source."""
        return cls(hf_model, tokenizer, **options)

    @abstractmethod
    def _read_spec(self, hf_model: Any) -> ModelSpec:
        """The spec of ``hf_model`` (its config and class; errors for what this lens lacks)."""

    @abstractmethod
    def _load(self, hf_model: Any) -> None:
        """Take the weights (or the module itself) from ``hf_model``."""

    # ---- names -------------------------------------------------------------------------------
    def hook_names(self) -> list[str]:
        """Every hook point of this model, in forward order."""
        return hook_names(self.spec.n_layers)

    def parse_hook(self, name: str | Hook) -> Hook:
        """Validate a hook name (the error lists valid names)."""
        return parse_hook(name, self.spec.n_layers)

    @property
    def default_read(self) -> str:
        """The default downstream hook for L2: the last block's ``hook_resid_post``."""
        return last_resid_post(self.spec.n_layers)

    def _check_reads(self, hook: Hook, reads: Sequence[str]) -> list[Hook]:
        parsed = [self.parse_hook(r) for r in reads]
        for r in parsed:
            if r < hook:
                raise ValueError(
                    f"Cannot read {r.name} when continuing from {hook.name}: a downstream read "
                    "must be at or after the perturbed hook."
                )
        return parsed

    @staticmethod
    def _check_continue(clean: CleanRun, x_new: Tensor, positions: Tensor | None) -> int:
        """Validate continue_all ([B, k, T, d]) / continue_at ([B, n, d] + positions [B, n])
        arguments; return k or n."""
        b, t, d = clean.x.shape
        if positions is None:
            if x_new.ndim != 4 or x_new.shape[0] != b or tuple(x_new.shape[2:]) != (t, d):
                raise ValueError(
                    f"x_new must be [B={b}, k, T={t}, d={d}]; got {tuple(x_new.shape)}."
                )
            return int(x_new.shape[1])
        if x_new.ndim != 3 or x_new.shape[0] != b or x_new.shape[2] != d:
            raise ValueError(f"x_new must be [B={b}, n, d={d}]; got {tuple(x_new.shape)}.")
        n = int(x_new.shape[1])
        if tuple(positions.shape) != (b, n) or positions.min() < 0 or positions.max() >= t:
            raise ValueError(f"positions must be [B={b}, n={n}] with values in [0, {t}).")
        return n

    def _check_tokens(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq]; got shape {tuple(tokens.shape)}.")
        if self.spec.n_ctx and tokens.shape[1] > self.spec.n_ctx:
            raise ValueError(
                f"Sequence length {tokens.shape[1]} exceeds the model's context of "
                f"{self.spec.n_ctx} tokens; use a shorter seq_len."
            )
        return tokens.to(self.device)

    # ---- tokens ------------------------------------------------------------------------------
    @property
    def bos_token_id(self) -> int:
        """The id prepended to every row (BOS; GPT-2 uses <|endoftext|>)."""
        tok = self.tokenizer
        bos = getattr(tok, "bos_token_id", None)
        if bos is None:
            bos = getattr(tok, "eos_token_id", None)
        if bos is None:
            raise ValueError("The tokenizer has neither a BOS nor an EOS token to prepend.")
        return int(bos)

    def to_tokens(self, text: str | Sequence[str], *, prepend_bos: bool = True) -> Tensor:
        """Tokenize one text or a list of equally long texts to a [B, T] LongTensor."""
        texts = [text] if isinstance(text, str) else list(text)
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        if prepend_bos:
            ids = [[self.bos_token_id, *row] for row in ids]
        if len({len(row) for row in ids}) != 1:
            raise ValueError(
                "to_tokens needs texts of equal token length; tokenize them one by one."
            )
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    # ---- compute ---------------------------------------------------------------------------
    @torch.inference_mode()
    def run_to_hook(self, tokens: Tensor, hook: str | Hook) -> Tensor:
        """Run only the prefix up to ``hook``; return the activation [B, T, d] in the frame."""
        return self._run_to_hook(self._check_tokens(tokens), self.parse_hook(hook))

    @torch.inference_mode()
    def run_clean(
        self, tokens: Tensor, hook: str | Hook, *, reads: Sequence[str] = (), keep_kv: bool = False
    ) -> CleanRun:
        """Full clean pass; keep what continuing from ``hook`` needs (``keep_kv`` for
        :meth:`continue_at`)."""
        h = self.parse_hook(hook)
        read_hooks = self._check_reads(h, reads)
        return self._run_clean(self._check_tokens(tokens), h, read_hooks, keep_kv)

    @torch.inference_mode()
    def continue_all(
        self, clean: CleanRun, x_new: Tensor, *, reads: Sequence[str] = ()
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Continue whole sequences from the hook with ``x_new`` [B, k, T, d] (k copies per
        sequence). Returns final hidden [B, k, T, d] and reads, each [B, k, T, d]."""
        read_hooks = self._check_reads(clean.hook, reads)
        return self._continue_all(
            clean, x_new, self._check_continue(clean, x_new, None), read_hooks
        )

    @torch.inference_mode()
    def continue_at(
        self,
        clean: CleanRun,
        x_new: Tensor,
        positions: Tensor,
        *,
        reads: Sequence[str] = (),
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Continue ``n`` single positions per sequence: ``x_new`` [B, n, d] replaces the hook
        activation at ``positions`` [B, n] alone (every other position stays clean). Returns final
        hidden [B, n, d] and reads, each [B, n, d], at those positions."""
        read_hooks = self._check_reads(clean.hook, reads)
        positions = positions.to(self.device).long()
        n = self._check_continue(clean, x_new, positions)
        return self._continue_at(clean, x_new, positions, n, read_hooks)

    @abstractmethod
    def _run_to_hook(self, tokens: Tensor, hook: Hook) -> Tensor: ...

    @abstractmethod
    def _run_clean(
        self, tokens: Tensor, hook: Hook, reads: list[Hook], keep_kv: bool
    ) -> CleanRun: ...

    @abstractmethod
    def _continue_all(
        self, clean: CleanRun, x_new: Tensor, k: int, reads: list[Hook]
    ) -> tuple[Tensor, dict[str, Tensor]]: ...

    @abstractmethod
    def _continue_at(
        self, clean: CleanRun, x_new: Tensor, positions: Tensor, n: int, reads: list[Hook]
    ) -> tuple[Tensor, dict[str, Tensor]]: ...

    @abstractmethod
    def unembed(self, final: Tensor) -> Tensor:
        """Float32 logits [..., V] from the final normed hidden state [..., d]."""

    def linear_unembedding(self) -> tuple[Tensor, Tensor | None] | None:
        """``(W [V, d], b)`` float32 if logits = ``final @ W.T + b`` exactly, else None (the
        engine then computes KL from full distributions)."""
        return None

    def continue_all_grad(
        self, clean: CleanRun, x_new: Tensor, *, reads: Sequence[str] = ()
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`continue_all` with autograd on, so gradients reach ``x_new`` (end-to-end SAE
        training); the model's weights stay frozen. Native models only."""
        if not self.differentiable:
            raise NotImplementedError(
                f"{type(self).__name__} has no differentiable continue_all; end-to-end SAE "
                f"training needs a native model (families: {', '.join(native_families())})."
            )
        read_hooks = self._check_reads(clean.hook, reads)
        k = self._check_continue(clean, x_new, None)
        with torch.enable_grad():
            return self._continue_all(clean, x_new, k, read_hooks)

    def logits(self, tokens: Tensor) -> Tensor:
        """Plain full forward: float32 logits [B, T, V]."""
        clean = self.run_clean(tokens, f"blocks.{self.spec.n_layers - 1}.hook_resid_post")
        return self.unembed(clean.final)

    def default_frame(self) -> str:
        """The frame used when none is asked for: ``centered`` for LayerNorm models."""
        return default_frame(self.spec.norm)

    def check_frame(self, frame: str) -> str:
        """Validate a frame name for this model."""
        if frame not in FRAMES:
            raise ValueError(f"Unknown frame {frame!r}; use one of {FRAMES}.")
        if frame == "centered" and self.spec.norm != "layernorm":
            raise ValueError(
                "frame='centered' needs a LayerNorm model (the mean over d_model is then invisible "
                f"to the model); {self.spec.architecture} uses {self.spec.norm}. "
                "Use frame='raw'."
            )
        return frame
