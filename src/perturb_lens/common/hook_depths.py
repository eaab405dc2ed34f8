"""Hook names with the layer given as a depth, resolved once the model's layer count is known.

A model-agnostic config names its layer by depth instead of by index, so that one preset fits
every model: ``blocks.LAYER.KIND`` where LAYER is

- ``N``: the layer index itself (0-based), as in every hook name;
- ``first``: layer 0; ``last``: layer ``n_layers - 1``;
- ``middle``: layer ``n_layers // 2`` (GPT-2 small: 6 of 12; SmolLM2-135M: 15 of 30);
- ``P%`` (0 <= P <= 100, decimals allowed): layer ``floor(P / 100 * n_layers)``, at most the
  last (``50%`` is ``middle``, ``100%`` is ``last``).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from perturb_lens.common.hooks import HOOK_KINDS

DEPTH_WORDS = ("first", "middle", "last")
_NAME = re.compile(r"blocks\.(.+)\.(\w+)")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)%")
SYNTAX = (
    "blocks.LAYER.KIND with LAYER a layer index (0, 1, ...), first, middle, last or a percentage "
    f"of the depth (e.g. 25%), and KIND one of {', '.join(HOOK_KINDS)}"
)


def depth_part(name: str | None) -> str | None:
    """The LAYER part of ``blocks.LAYER.KIND`` when it is a depth (not an index), else None."""
    m = _NAME.fullmatch(name or "")
    if m is None or m.group(1).isdigit():
        return None
    return m.group(1)


def check_hook_depth(name: str | None, key: str = "hook") -> str | None:
    """``name`` unchanged; a ValueError (naming ``key`` and giving the syntax) when its LAYER is
    neither an index nor a depth this module resolves (``blocks.midle.hook_resid_pre``,
    ``blocks.120%...``)."""
    part = depth_part(name)
    if part is not None:
        layer_of_depth(part, 1, name=name, key=key)  # the syntax does not depend on the layers
    return name


def layer_of_depth(
    part: str, n_layers: int, *, name: str | None = None, key: str = "hook"
) -> int:
    """The layer index that a depth (``first``, ``middle``, ``last``, ``P%``) or an index names in
    an ``n_layers`` model."""
    if part.isdigit():
        return int(part)
    if part in DEPTH_WORDS:
        return {"first": 0, "middle": n_layers // 2, "last": n_layers - 1}[part]
    m = _PERCENT.fullmatch(part)
    if m is not None and Fraction(m.group(1)) <= 100:
        return min(math.floor(Fraction(m.group(1)) * n_layers / 100), n_layers - 1)
    raise ValueError(
        f"{key} {name or part!r}: {part!r} is not a layer; use {SYNTAX} (e.g. "
        "blocks.middle.hook_resid_pre)"
    )


def resolve_hook(name: str, n_layers: int) -> str:
    """``name`` with a depth replaced by the layer index it names in an ``n_layers`` model
    (names without a depth are returned unchanged)."""
    part = depth_part(name)
    if part is None:
        return name
    kind = name.rsplit(".", 1)[1]
    return f"blocks.{layer_of_depth(part, n_layers, name=name)}.{kind}"
