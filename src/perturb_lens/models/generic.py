"""Any Hugging Face causal LM through PyTorch forward hooks: the generic path and the reference.

Every pass is a whole ``hf_model`` forward; a hook on the perturbed submodule captures or replaces
its activation, and a pre-hook on the LM head captures the final normed hidden state (and stops
the pass there: the logits themselves are computed by :meth:`GenericLens.unembed`). Slower than
the native path, and deliberately plain: tests pin the native path against it.

Hook points, per decoder layer ``l``:

- ``hook_resid_pre``: the layer's input hidden state (forward pre-hook on the layer);
- ``hook_attn_out``: the attention submodule's output (first element);
- ``hook_mlp_out``: the MLP submodule's output;
- ``hook_resid_post``: the layer's output hidden state (first element).

For parallel-attention blocks (GPT-NeoX) ``attn_out``/``mlp_out`` are still the submodules'
outputs, and replacing one replaces what that submodule adds to the residual. Blocks with norms
after their branches (Gemma's ``post_attention_layernorm`` and ``post_feedforward_layernorm``)
read those norms' outputs instead: what is added to the residual, as on the native path and in
TransformerLens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import Tensor, nn

from perturb_lens.common.hooks import Hook
from perturb_lens.models.base import CleanRun, LensModel, ModelSpec, config_shape
from perturb_lens.models.registry import GENERIC, register_family

ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
# norms after the attention and MLP branches (Gemma): their outputs are attn_out and mlp_out
POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")
CHUNK_ROWS = 64  # sequences per forward in continue_at / continue_all

# edit(activation [R, T, d]) -> replacement [R, T, d]
Edit = Callable[[Tensor], Tensor]


class _StopForward(Exception):
    """Raised inside a hook once everything wanted is captured: ends the forward early."""


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list: the ModuleList of ``num_hidden_layers`` blocks, else the largest."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of decoder layers.")
    n_layers = getattr(model.config, "num_hidden_layers", None)
    exact = [m for m in lists if len(m) == n_layers]
    return (exact or sorted(lists, key=len, reverse=True))[0]


def _child(layer: nn.Module, names: Sequence[str], what: str) -> nn.Module:
    for name in names:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    children = ", ".join(name for name, _ in layer.named_children())
    raise ValueError(
        f"Cannot find the {what} submodule of {type(layer).__name__} (looked for "
        f"{', '.join(names)}; it has {children}). This architecture is not supported by the "
        "generic path."
    )


def _final_norm_kind(model: nn.Module, layers: nn.ModuleList) -> str:
    """'layernorm' if the last norm module outside the blocks is a LayerNorm, else 'rmsnorm'."""
    inside = {id(m) for m in layers.modules()}
    norms = [
        m for m in model.modules() if "norm" in type(m).__name__.lower() and id(m) not in inside
    ]
    if not norms:
        raise ValueError(f"Cannot find the final norm of {type(model).__name__}.")
    name = type(norms[-1]).__name__
    return "layernorm" if "LayerNorm" in name and "RMS" not in name else "rmsnorm"


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_first(output: Any, new: Tensor) -> Any:
    return (new, *output[1:]) if isinstance(output, tuple) else new


def spec_from_hf(model: nn.Module, layers: nn.ModuleList) -> ModelSpec:
    """Shape facts from a Hugging Face config (names differ by family; fall back sensibly)."""
    return ModelSpec(
        family="generic",
        architecture=type(model).__name__,
        **{**config_shape(model.config), "n_layers": len(layers)},
        norm=_final_norm_kind(model, layers),
        n_params=model.num_parameters(),
    )


class GenericLens(LensModel):
    """A Hugging Face causal LM wrapped with forward hooks (frame ``raw`` only)."""

    family = "generic"
    # kinds read at a module's input (forward pre-hook); the others at its output
    pre_hook_kinds: tuple[str, ...] = ("hook_resid_pre",)

    def _read_spec(self, hf_model: nn.Module) -> ModelSpec:
        self.layers = find_layers(hf_model)
        self.attn = [_child(layer, ATTN_NAMES, "attention") for layer in self.layers]
        self.mlp = [_child(layer, MLP_NAMES, "MLP") for layer in self.layers]
        for i, layer in enumerate(self.layers):
            if all(isinstance(getattr(layer, n, None), nn.Module) for n in POST_NORMS):
                self.attn[i], self.mlp[i] = (getattr(layer, n) for n in POST_NORMS)
        self.head = hf_model.get_output_embeddings()
        if self.head is None:
            raise ValueError(f"{type(hf_model).__name__} has no output embeddings (LM head).")
        return spec_from_hf(hf_model, self.layers)

    def default_frame(self) -> str:
        return "raw"

    def check_frame(self, frame: str) -> str:
        super().check_frame(frame)
        if frame != "raw":
            raise ValueError(
                f"The generic (hook-based) path has only frame='raw', not {frame!r}. Use the "
                "native path (load_model(..., native=True), for GPT-2) or frame='raw'."
            )
        return frame

    def _load(self, hf_model: nn.Module) -> None:
        """Keep the module itself (eager attention, on the lens's device and dtype, eval mode)."""
        if getattr(hf_model.config, "_attn_implementation", "eager") != "eager" and hasattr(
            hf_model, "set_attn_implementation"
        ):
            hf_model.set_attn_implementation("eager")
        self.model = hf_model.to(device=self.device, dtype=self.dtype).eval()
        self.softcap = getattr(hf_model.config, "final_logit_softcapping", None)

    # ---- one hooked forward ------------------------------------------------------------------
    def _module_for(self, hook: Hook) -> nn.Module:
        layer = hook.layer
        return {
            "hook_resid_pre": self.layers[layer],
            "hook_attn_out": self.attn[layer],
            "hook_mlp_out": self.mlp[layer],
            "hook_resid_post": self.layers[layer],
        }[hook.kind]

    @contextmanager
    def _hooked(
        self, points: dict[Hook, Edit | None], store: dict[str, Tensor], *, stop_at: Hook | None
    ) -> Iterator[None]:
        """Register hooks that capture (into ``store``, by hook name) and optionally replace each
        activation in ``points``; capture ``final`` at the LM head's input and stop there, or stop
        right after capturing ``stop_at``."""

        def process(hook: Hook, value: Tensor) -> Tensor | None:
            edit = points[hook]
            new = None if edit is None else edit(value).to(value.dtype)
            store[hook.name] = value if new is None else new
            if hook == stop_at:
                raise _StopForward
            return new

        def pre_hook(hook: Hook) -> Callable[..., Any]:
            def fn(module: nn.Module, args: tuple, kwargs: dict) -> Any:
                in_args = len(args) > 0
                new = process(hook, args[0] if in_args else kwargs["hidden_states"])
                if new is None:
                    return None
                if in_args:
                    return (new, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": new}

            return fn

        def post_hook(hook: Hook) -> Callable[..., Any]:
            def fn(module: nn.Module, args: tuple, output: Any) -> Any:
                new = process(hook, _first(output))
                return None if new is None else _with_first(output, new)

            return fn

        def head_hook(module: nn.Module, args: tuple) -> None:
            store["final"] = args[0]
            raise _StopForward

        handles = [self.head.register_forward_pre_hook(head_hook)]
        try:
            for hook in points:
                module = self._module_for(hook)
                if hook.kind in self.pre_hook_kinds:
                    handles.append(
                        module.register_forward_pre_hook(pre_hook(hook), with_kwargs=True)
                    )
                else:
                    handles.append(module.register_forward_hook(post_hook(hook)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _forward(
        self,
        tokens: Tensor,
        points: dict[Hook, Edit | None],
        *,
        stop_at: Hook | None = None,
    ) -> dict[str, Tensor]:
        """One hooked forward over ``tokens`` [R, T]; returns the captured activations."""
        store: dict[str, Tensor] = {}
        hooked = self._hooked(points, store, stop_at=stop_at)
        with torch.inference_mode(), hooked, suppress(_StopForward):
            self._call(tokens)
        return store

    def _call(self, tokens: Tensor) -> None:
        """The wrapped model's forward over ``tokens`` (hooks capture what is wanted)."""
        self.model(input_ids=tokens, use_cache=False)

    # ---- the LensModel interface -------------------------------------------------------------
    def _run_to_hook(self, tokens: Tensor, hook: Hook) -> Tensor:
        return self._forward(tokens, {hook: None}, stop_at=hook)[hook.name]

    def _run_clean(self, tokens: Tensor, hook: Hook, reads: list[Hook], keep_kv: bool) -> CleanRun:
        store = self._forward(tokens, {h: None for h in [hook, *reads]})
        return CleanRun(
            tokens=tokens,
            hook=hook,
            x=store[hook.name],
            final=store["final"],
            reads={r.name: store[r.name] for r in reads},
        )

    def _continue(
        self, clean: CleanRun, rows: Tensor, edit: Callable[[slice], Edit], reads: list[Hook]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Forward ``clean.tokens[rows]`` in chunks, the hook activation of chunk ``s`` replaced by
        ``edit(s)``; returns final and reads, each [R, T, d]."""
        finals, got = [], {r.name: [] for r in reads}
        for start in range(0, len(rows), CHUNK_ROWS):
            s = slice(start, start + CHUNK_ROWS)
            points: dict[Hook, Edit | None] = {r: None for r in reads}
            points[clean.hook] = edit(s)  # a read at the hook itself sees the replacement
            store = self._forward(clean.tokens[rows[s]], points)
            finals.append(store["final"])
            for r in reads:
                got[r.name].append(store[r.name])
        return torch.cat(finals), {name: torch.cat(parts) for name, parts in got.items()}

    def _continue_all(
        self, clean: CleanRun, x_new: Tensor, k: int, reads: list[Hook]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        B, T, d = clean.x.shape
        rows = torch.arange(B, device=self.device).repeat_interleave(k)  # [B*k]
        x_rows = x_new.reshape(B * k, T, d).to(self.device)
        final, got = self._continue(clean, rows, lambda s: lambda _x: x_rows[s], reads)
        return final.reshape(B, k, T, -1), {n: v.reshape(B, k, T, -1) for n, v in got.items()}

    def _continue_at(
        self, clean: CleanRun, x_new: Tensor, positions: Tensor, n: int, reads: list[Hook]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        B, _T, d = clean.x.shape
        rows = torch.arange(B, device=self.device).repeat_interleave(n)  # [B*n]: one copy per row
        pos = positions.reshape(B * n).to(self.device).long()
        x_rows = x_new.reshape(B * n, d).to(self.device)

        def edit(s: slice) -> Edit:
            def replace_one(x: Tensor) -> Tensor:  # x [R, T, d]: only one position per copy
                x = x.clone()
                x[torch.arange(len(x), device=x.device), pos[s]] = x_rows[s].to(x.dtype)
                return x

            return replace_one

        final, got = self._continue(clean, rows, edit, reads)
        at = torch.arange(B * n, device=self.device), pos

        def pick(t: Tensor) -> Tensor:
            return t[at].reshape(B, n, -1)

        return pick(final), {name: pick(v) for name, v in got.items()}

    def unembed(self, final: Tensor) -> Tensor:
        with torch.inference_mode():
            logits = self.head(final.to(self.device, self.dtype)).float()
        if self.softcap:  # Gemma 2 style final-logit soft-capping, applied after the LM head
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


register_family(GENERIC, (), GenericLens, native=False)
