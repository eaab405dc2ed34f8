"""A model's weights fingerprint: what caches and resumed runs key on instead of the model's path.

A model loaded from files is fingerprinted by the sha256 of its weight files (and config.json),
each hashed once and remembered by (path, size, mtime) on disk, so loading costs a ``stat``. A
model built in memory, or changed in place after loading, is fingerprinted by its tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from perturb_lens.common.paths import cache_root

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_ATTR = "_weights_fingerprint"  # (digest, tensor stamp) kept on the model object


def file_digest(path: Path) -> str:
    """sha256 of a file, remembered on disk by (resolved path, size, mtime) (a damaged
    remembered entry is ignored and rewritten)."""
    path = Path(path).resolve()
    st = path.stat()
    ident = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    memo = cache_root() / "fingerprints" / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}"
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(memo.read_text())
        if saved.get("file") == ident and len(saved.get("sha256", "")) == 64:
            return saved["sha256"]
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    digest = h.hexdigest()
    with contextlib.suppress(OSError):  # a read-only cache only costs rehashing next time
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.tmp")
        tmp.write_text(json.dumps({"file": ident, "sha256": digest}))
        tmp.replace(memo)
    return digest


def files_fingerprint(folder_or_file: str | Path) -> str | None:
    """Fingerprint of a model on disk: its config.json and weight files (None: not local)."""
    path = Path(folder_or_file)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES
        )
    else:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{file_digest(f)}\n".encode())
    return h.hexdigest()[:32]


def _tensors(obj: Any, prefix: str = "", seen: set[int] | None = None) -> Iterator[tuple[str, Any]]:
    """(name, tensor) of every tensor reachable from ``obj``'s attributes, dicts, lists and
    modules, in a stable order."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, torch.nn.Module):
        for name, t in sorted(obj.state_dict(keep_vars=True).items()):
            yield from _tensors(t, f"{prefix}.{name}", seen)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f"{prefix}.{k}", seen)
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}", seen)
    elif prefix == "" and hasattr(obj, "__dict__"):
        yield from _tensors({k: v for k, v in vars(obj).items() if k != _ATTR}, "", seen)


def _stamp(model: Any) -> tuple:
    """Which tensors the model holds and their in-place version counters (cheap)."""
    return tuple((n, id(t), _version(t)) for n, t in _tensors(model))


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot change in place)
        return -1


def tensors_fingerprint(model: Any) -> str:
    """sha256 of the names, dtypes, shapes and bytes of every tensor the model holds."""
    h = hashlib.sha256()
    for name, t in _tensors(model):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def record_files(model: Any, folder_or_file: str | Path | None) -> None:
    """Remember the fingerprint of the files ``model`` was loaded from (the hook of load_model)."""
    digest = files_fingerprint(folder_or_file) if folder_or_file else None
    if digest is not None:
        setattr(model, _ATTR, (f"files:{digest}", _stamp(model)))


def model_fingerprint(model: Any) -> str:
    """The weights fingerprint of a loaded model: its files' one while its tensors are untouched
    since loading, else (and for models built in memory) a hash of its tensors."""
    saved = getattr(model, _ATTR, None)
    stamp = _stamp(model)
    if saved is not None and saved[1] == stamp:
        return saved[0]
    digest = f"tensors:{tensors_fingerprint(model)}"
    with contextlib.suppress(AttributeError):
        setattr(model, _ATTR, (digest, stamp))
    return digest
