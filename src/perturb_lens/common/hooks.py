"""TransformerLens-style hook names: parsing, validation and ordering.

We compute differently from TransformerLens, but we speak its vocabulary:
``blocks.{l}.hook_resid_pre``, ``blocks.{l}.hook_attn_out``, ``blocks.{l}.hook_mlp_out`` and
``blocks.{l}.hook_resid_post``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Order of the hook kinds inside one block (a sequential block: attention, then MLP).
HOOK_KINDS: tuple[str, ...] = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
_HOOK_RE = re.compile(
    r"^blocks\.(\d+)\.(hook_resid_pre|hook_attn_out|hook_mlp_out|hook_resid_post)$"
)


class UnknownHookError(ValueError):
    """A hook name that the model does not have."""


@dataclass(frozen=True, order=True)
class Hook:
    """A hook point: block index and kind, ordered by where it sits in the forward pass."""

    layer: int
    kind_index: int

    @property
    def kind(self) -> str:
        return HOOK_KINDS[self.kind_index]

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.kind}"

    def __str__(self) -> str:
        return self.name


def read_hook(name: object) -> Hook | None:
    """The hook a well-formed name denotes, whatever the model (None if ``name`` is not
    ``blocks.LAYER.KIND`` with a known kind): the one parser of hook names; :func:`parse_hook`
    also checks the layer against a model."""
    match = _HOOK_RE.match(str(name)) if name is not None else None
    return None if match is None else Hook(int(match.group(1)), HOOK_KINDS.index(match.group(2)))


def hook_names(n_layers: int) -> list[str]:
    """All hook names of an ``n_layers`` model, in forward order."""
    return [f"blocks.{layer}.{kind}" for layer in range(n_layers) for kind in HOOK_KINDS]


def parse_hook(name: str | Hook, n_layers: int) -> Hook:
    """Parse and validate a hook name; the error lists the valid names."""
    if isinstance(name, Hook):
        if name.layer < n_layers:
            return name
        name = name.name
    hook = read_hook(name)
    if hook is None or hook.layer >= n_layers:
        valid = hook_names(n_layers)
        shown = ", ".join(valid[:4]) + ", ..., " + ", ".join(valid[-4:])
        raise UnknownHookError(
            f"Unknown hook {name!r} for a {n_layers}-layer model. Valid hook names are "
            f"blocks.{{0..{n_layers - 1}}}.{{{', '.join(HOOK_KINDS)}}}: {shown}."
        )
    return hook


def last_resid_post(n_layers: int) -> str:
    """The default downstream read: the last block's ``hook_resid_post``."""
    return f"blocks.{n_layers - 1}.hook_resid_post"
