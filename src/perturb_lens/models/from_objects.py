"""Models handed over as objects: a transformers ``PreTrainedModel`` or a TransformerLens
``HookedTransformer`` already in the notebook, wrapped without a download or a copy to disk.

- ``PreTrainedModel``: the registered family of its class (native lens, its own weights), else
  the generic hook path (which keeps the module itself), exactly as a saved folder would load.
- ``HookedTransformer``: its own (processed) weights on the native path
  (:class:`~perturb_lens.models.hooked.HookedTransformerLens`) when its config is one the native
  block computes; any other goes through TransformerLens' own hook points
  (:class:`~perturb_lens.models.hooked.HookedGenericLens`). The frame follows from the weights:
  ``centered`` when every weight writing to the residual stream has zero mean over d_model
  (``center_writing_weights=True``), else ``raw``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from perturb_lens.models.base import LensModel
from perturb_lens.models.registry import family_for

log = logging.getLogger(__name__)


def is_hooked_transformer(obj: Any) -> bool:
    """Whether ``obj`` is a TransformerLens ``HookedTransformer`` (checked without importing
    transformer_lens)."""
    return any(
        c.__name__ == "HookedTransformer" and c.__module__.startswith("transformer_lens")
        for c in type(obj).__mro__
    )


def is_hf_model(obj: Any) -> bool:
    """Whether ``obj`` is a transformers ``PreTrainedModel``."""
    from transformers import PreTrainedModel

    return isinstance(obj, PreTrainedModel)


def wrap(
    hf_model: Any,
    tokenizer: Any,
    *,
    frame: str | None,
    dtype: torch.dtype,
    device: str | torch.device,
    source: str,
    native: bool = True,
) -> LensModel:
    """A loaded HF model as a LensModel: the registered family that handles its architecture
    (native lens), else, or with ``native=False``, the generic hook path."""
    lens_cls = family_for(type(hf_model).__name__, native=native).lens_class()
    return lens_cls.from_hf(
        hf_model, tokenizer, frame=frame, dtype=dtype, device=device, source=source
    )


def _hf_tokenizer(hf_model: Any) -> Any:
    """The tokenizer saved beside the model's folder (``name_or_path``), if it has one."""
    folder = Path(str(getattr(hf_model, "name_or_path", "") or ""))
    if not (folder.is_dir() and (folder / "tokenizer_config.json").is_file()):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def object_dtype_device(obj: Any) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of a model object's weights (its first parameter)."""
    p = next(obj.parameters(), None)
    if p is None:
        raise ValueError(f"{type(obj).__name__} has no parameters to run.")
    return p.dtype, p.device


def object_label(obj: Any) -> str:
    """A short name of a model object for a run's config (``model``)."""
    if is_hooked_transformer(obj):
        return f"HookedTransformer:{obj.cfg.model_name}"
    return str(getattr(obj, "name_or_path", "") or type(obj).__name__)


def lens_from_object(
    obj: Any,
    *,
    frame: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    native: bool = True,
    tokenizer: Any = None,
) -> LensModel:
    """A model object as a LensModel (a LensModel is returned as it is).

    ``dtype`` / ``device`` default to the object's own (no conversion of the caller's model).
    ``tokenizer``: for reading text (``data``); default the object's own (HookedTransformer),
    or the one saved in the HF model's folder; without one, runs need ``tokens=``.
    """
    if isinstance(obj, LensModel):
        return obj
    if is_hooked_transformer(obj):
        from perturb_lens.models.hooked import hooked_lens

        return hooked_lens(
            obj, frame=frame, dtype=dtype, device=device, native=native, tokenizer=tokenizer
        )
    if is_hf_model(obj):
        if not hasattr(obj, "get_output_embeddings") or obj.get_output_embeddings() is None:
            raise ValueError(
                f"{type(obj).__name__} has no language-model head; pass a causal LM "
                "(e.g. AutoModelForCausalLM), not a base model."
            )
        own_dtype, own_device = object_dtype_device(obj)
        tok = tokenizer if tokenizer is not None else _hf_tokenizer(obj)
        name = getattr(obj, "name_or_path", "") or "built in memory"
        return wrap(
            obj,
            tok,
            frame=frame,
            dtype=dtype or own_dtype,
            device=device or own_device,
            source=f"{type(obj).__name__} object ({name})",
            native=native,
        )
    raise TypeError(
        f"Cannot load a model from a {type(obj).__name__}: pass a name ('smollm2-135m'), a path "
        "(GGUF file, Hugging Face folder), a hub id, a transformers PreTrainedModel or a "
        "TransformerLens HookedTransformer."
    )
