"""Model families: which Hugging Face architectures run on which lens class.

One :func:`register_family` call per family, in the style of SAELens' ``register_sae_class``.
:func:`~perturb_lens.models.load.load_model` looks the loaded model's class name up here; an
architecture no family claims runs on the generic hook path. A new native family is one module
(a :class:`~perturb_lens.models.native.NativeLens` subclass: its spec and weight mapping, ending
with its ``register_family`` call) plus, for a built-in, one line in
:data:`perturb_lens.builtins.BUILTINS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from perturb_lens.common.registry import registry

GENERIC = "generic"


@dataclass(frozen=True)
class Family:
    """A registered model family.

    ``architectures``: HF class names it handles (``type(hf_model).__name__``, e.g.
    ``"LlamaForCausalLM"``). ``lens``: its LensModel class. ``gguf``: llama.cpp architecture names
    it runs natively from a GGUF file.
    """

    name: str
    architectures: tuple[str, ...]
    lens: type
    gguf: tuple[str, ...] = ()
    native: bool = True

    @property
    def path(self) -> str:
        """How models of this family run, as ``perturb-lens info`` shows it."""
        return "native" if self.native else "generic (hooks)"

    def lens_class(self) -> Any:
        """The lens class."""
        return self.lens


FAMILIES = registry("model family", "add one with perturb_lens.register_family")


def register_family(
    name: str,
    architectures: tuple[str, ...] | list[str],
    lens: type,
    *,
    gguf: tuple[str, ...] | list[str] = (),
    native: bool = True,
) -> Family:
    """Register (or replace) a family; its architectures must not belong to another family."""
    taken = {a: f.name for f in FAMILIES.values() if f.name != name for a in f.architectures}
    clash = sorted(a for a in architectures if a in taken)
    if clash:
        raise ValueError(
            f"Architectures {clash} are already handled by family {taken[clash[0]]!r}; "
            "register each architecture with one family only."
        )
    return FAMILIES.register(name, Family(name, tuple(architectures), lens, tuple(gguf), native))


def families() -> list[Family]:
    """All registered families: the generic path first, then by name (whatever order their
    modules were imported in)."""
    return sorted(FAMILIES.values(), key=lambda f: (f.name != GENERIC, f.name))


def get_family(name: str) -> Family:
    """The family named ``name`` (the error lists the registered ones)."""
    if name not in FAMILIES:
        names = ", ".join(f.name for f in families())
        raise ValueError(f"Unknown model family {name!r}; registered: {names}.")
    return FAMILIES.get(name)


def family_for(architecture: str, *, native: bool = True) -> Family:
    """The native family that handles ``architecture``, else (or with ``native=False``) the
    generic hook path."""
    if native:
        for family in FAMILIES.values():
            if family.native and architecture in family.architectures:
                return family
    return FAMILIES.get(GENERIC)


def native_families() -> list[str]:
    """Names of the families with a native (hand-written, differentiable) forward."""
    return [f.name for f in families() if f.native]


def native_gguf_archs() -> list[str]:
    """llama.cpp architecture names with a native family."""
    return [a for f in FAMILIES.values() if f.native for a in f.gguf]
