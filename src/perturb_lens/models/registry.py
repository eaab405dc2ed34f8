"""Model families: which Hugging Face architectures run on which lens class.

One :func:`register_family` call per family, in the style of SAELens' ``register_sae_class``.
:func:`~perturb_lens.models.load.load_model` looks the loaded model's class name up here; an
architecture no family claims runs on the generic hook path. A new native family is one module
(a :class:`~perturb_lens.models.native.NativeLens` subclass: its spec and weight mapping) plus one
line at the end of this file.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

GENERIC = "generic"


@dataclass(frozen=True)
class Family:
    """A registered model family.

    ``architectures``: HF class names it handles (``type(hf_model).__name__``, e.g.
    ``"LlamaForCausalLM"``). ``lens``: its LensModel class, or ``"module:Class"`` (imported when
    first used). ``gguf``: llama.cpp architecture names it runs natively from a GGUF file.
    """

    name: str
    architectures: tuple[str, ...]
    lens: type | str
    gguf: tuple[str, ...] = ()
    native: bool = True

    @property
    def path(self) -> str:
        """How models of this family run, as ``perturb-lens info`` shows it."""
        return "native" if self.native else "generic (hooks)"

    def lens_class(self) -> Any:
        """The lens class (imported on first use when registered by name)."""
        if isinstance(self.lens, type):
            return self.lens
        module, _, attr = self.lens.partition(":")
        return getattr(importlib.import_module(module), attr)


_FAMILIES: dict[str, Family] = {}


def register_family(
    name: str,
    architectures: tuple[str, ...] | list[str],
    lens: type | str,
    *,
    gguf: tuple[str, ...] | list[str] = (),
    native: bool = True,
) -> Family:
    """Register (or replace) a family; its architectures must not belong to another family."""
    taken = {a: f.name for f in _FAMILIES.values() if f.name != name for a in f.architectures}
    clash = sorted(a for a in architectures if a in taken)
    if clash:
        raise ValueError(
            f"Architectures {clash} are already handled by family {taken[clash[0]]!r}; "
            "register each architecture with one family only."
        )
    family = Family(name, tuple(architectures), lens, tuple(gguf), native)
    _FAMILIES[name] = family
    return family


def families() -> list[Family]:
    """All registered families, in registration order."""
    return list(_FAMILIES.values())


def get_family(name: str) -> Family:
    """The family named ``name`` (the error lists the registered ones)."""
    if name not in _FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; registered: {', '.join(_FAMILIES)}.")
    return _FAMILIES[name]


def family_for(architecture: str, *, native: bool = True) -> Family:
    """The native family that handles ``architecture``, else (or with ``native=False``) the
    generic hook path."""
    if native:
        for family in _FAMILIES.values():
            if family.native and architecture in family.architectures:
                return family
    return _FAMILIES[GENERIC]


def native_families() -> list[str]:
    """Names of the families with a native (hand-written, differentiable) forward."""
    return [f.name for f in _FAMILIES.values() if f.native]


def native_gguf_archs() -> list[str]:
    """llama.cpp architecture names with a native family."""
    return [a for f in _FAMILIES.values() if f.native for a in f.gguf]


register_family(GENERIC, (), "perturb_lens.models.generic:GenericLens", native=False)
register_family("gpt2", ("GPT2LMHeadModel",), "perturb_lens.models.gpt2:GPT2Lens", gguf=("gpt2",))
register_family(
    "llama", ("LlamaForCausalLM",), "perturb_lens.models.llama:LlamaLens", gguf=("llama",)
)
register_family("neox", ("GPTNeoXForCausalLM",), "perturb_lens.models.neox:GPTNeoXLens")
register_family(
    "qwen2", ("Qwen2ForCausalLM",), "perturb_lens.models.qwen2:Qwen2Lens", gguf=("qwen2",)
)
register_family(
    "gemma3", ("Gemma3ForCausalLM",), "perturb_lens.models.gemma:Gemma3Lens", gguf=("gemma3",)
)
register_family(
    "gemma2", ("Gemma2ForCausalLM",), "perturb_lens.models.gemma:Gemma2Lens", gguf=("gemma2",)
)
