"""Writing files all-or-nothing (:func:`atomic_write`: a temp file beside the target, fsync,
rename), hashing files and configs (:func:`file_sha256`, :func:`config_hash`) and comparing
configs (:func:`diff_configs`), for every stage that writes: runs, statistics, SAEs, reports."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import IO, Any

import numpy as np

from perturb_lens.common.files import open_regular
from perturb_lens.common.paths import file_mode

TMP_SUFFIX = ".tmp"  # atomic_write's temp files: ``.NAME.XXXXXXXX.tmp`` beside the target


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()
"""Stands for an absent key in :func:`diff_configs` output."""


def _json_default(obj: Any) -> Any:
    """JSON for the few non-JSON types a config or meta dict may hold; refuse the rest."""
    if isinstance(obj, PurePath):
        return obj.as_posix()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(
        f"cannot store {type(obj).__name__} {obj!r} in JSON: convert it to str/number/list/dict "
        "first (e.g. pydantic model_dump(mode='json'))"
    )


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _to_jsonable(obj: Any) -> Any:
    """The value as it reads back from JSON (tuples -> lists, Paths -> str, ...)."""
    return json.loads(_canonical_json(obj))


def config_hash(config: dict) -> str:
    """sha256 of the canonical JSON of ``config`` (sorted keys, no whitespace), 16 hex chars."""
    return hashlib.sha256(_canonical_json(config).encode()).hexdigest()[:16]


def diff_configs(a: dict, b: dict, _prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted.path, value_in_a, value_in_b)`` for every leaf that differs.

    Absent keys read as :data:`MISSING`; lists of equal length are compared item by item
    (``saes.1.l0``), lists of different lengths as a whole.
    """
    out: list[tuple[str, Any, Any]] = []
    for key in sorted(set(a) | set(b), key=str):
        path = f"{_prefix}{key}"
        va, vb = a.get(key, MISSING), b.get(key, MISSING)
        out.extend(_diff_values(path, va, vb))
    return out


def _diff_values(path: str, va: Any, vb: Any) -> list[tuple[str, Any, Any]]:
    if isinstance(va, dict) and isinstance(vb, dict):
        return diff_configs(va, vb, f"{path}.")
    if isinstance(va, list | tuple) and isinstance(vb, list | tuple) and len(va) == len(vb):
        pairs = enumerate(zip(va, vb, strict=True))
        return [d for i, (x, y) in pairs for d in _diff_values(f"{path}.{i}", x, y)]
    return [] if va == vb else [(path, va, vb)]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open_regular(path, "a run file") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: some filesystems refuse fsync on a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` all-or-nothing: ``write(f)`` into a temp file beside it, fsync, os.replace.

    On any failure the temp file is removed and ``path`` is left as it was; a full disk raises an
    ``OSError(ENOSPC)`` that says so and what to do.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0600; the file gets what the umask allows
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(
                e.errno,
                f"disk full while writing {path} ({e.strerror or e}): nothing was changed; free "
                f"some space (or choose another --out) and rerun with --resume to continue",
            ) from e
        if isinstance(e, OSError):
            e.add_note(f"while writing {path} (nothing was changed)")
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (see :func:`atomic_write`)."""
    data = (json.dumps(obj, indent=2, default=_json_default) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))
