"""Reading files perturb-lens did not write itself: regular files only, and never more than a cap.

A path a user names, or one found in a folder they name (a run directory's manifest, a config, an
SAE folder, an archive, a checkpoint), may be a named pipe or a device, whose ``open()`` or
``read()`` blocks forever, or a file far larger than its kind ever is (a 45 MB "config" took
minutes and gigabytes to refuse). Every such read goes through here: the file is opened without
blocking (``O_NONBLOCK``: a pipe with no writer opens at once), checked to be a regular file, and
read up to a size cap stated by the caller. Paths handed to libraries that open them themselves
(safetensors, torch, pyarrow) are vetted with :func:`regular_file` first.

The standard library has no "read at most N bytes of a regular file" call, so this is our own:
a dozen lines around ``os.open`` and ``os.fstat``.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
CONFIG_MAX_BYTES = 1 * MIB  # configs are a few KB; 1 MiB parses in well under a second
JSON_MAX_BYTES = 64 * MIB  # side files (cfg.json, eval.json, train logs, pack manifests)
MANIFEST_MAX_BYTES = 256 * MIB  # a run manifest: ~200 bytes per shard, a million shards


class UnreadableFileError(ValueError):
    """A file that is not a regular file, is larger than its kind can be, or does not parse."""


def size_text(n: int) -> str:
    """``n`` bytes for a message, to 3 digits: ``512 bytes``, ``45.3 MB``, ``1.07 GB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def first_few(names: Sequence[str], n: int = 3, sep: str = ", ") -> str:
    """``a, b, c and 7 more``: a list of names for a message, kept short however long it is."""
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return sep.join(str(x) for x in names[:n]) + more


def _kind(mode: int) -> str:
    """What a non-regular file is, for a message."""
    kinds = (
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _not_regular(path: Path, mode: int, what: str) -> UnreadableFileError:
    return UnreadableFileError(
        f"{path} is {_kind(mode)}, not a regular file, so it is not read as {what} (reading a "
        "pipe or device can block forever): replace it with the file itself."
    )


def regular_file(path: str | Path, what: str) -> Path:
    """``path``, if it is a regular file (or a link to one); else :class:`UnreadableFileError`
    (``FileNotFoundError`` if it does not exist). For paths a library opens itself."""
    path = Path(path)
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode, what)
    return path


def open_regular(path: str | Path, what: str) -> BinaryIO:
    """``path`` opened for binary reading, if it is a regular file: opened with ``O_NONBLOCK``
    (a pipe opens at once instead of waiting for a writer), then checked, so nothing blocks."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode, what)
        return os.fdopen(fd, "rb")  # O_NONBLOCK means nothing for a regular file
    except BaseException:
        os.close(fd)
        raise


def _too_big(path: Path, size: int, limit: int, what: str) -> UnreadableFileError:
    return UnreadableFileError(
        f"{path} is {size_text(size)}, more than {what} can be ({size_text(limit)} at most), so "
        "it is not read: check that it is the file you meant."
    )


def read_limited(path: str | Path, limit: int, what: str) -> bytes:
    """The bytes of the regular file ``path``, refused unread when larger than ``limit``.

    ``what`` names the file's kind in messages ("a config file"). The size is checked before
    reading and again while reading (a file that grows is cut off at ``limit + 1`` bytes)."""
    path = Path(path)
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise _too_big(path, size, limit, what)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise _too_big(path, len(data), limit, what)
    return data


def load_json(path: str | Path, what: str, limit: int = JSON_MAX_BYTES) -> Any:
    """The JSON in the regular file ``path`` (at most ``limit`` bytes); a file that is not JSON,
    not UTF-8, or nested deeper than Python's parser goes raises :class:`UnreadableFileError`."""
    data = read_limited(path, limit, what)
    try:
        return json.loads(data)
    except RecursionError:
        problem = "its values nest deeper than any JSON perturb-lens writes"
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        problem = f"not valid JSON: {e}"
    raise UnreadableFileError(
        f"{path} cannot be read as {what} ({problem}): it is damaged or another kind of file; "
        "restore it, or point to another."
    )


def torch_load(path: str | Path, what: str) -> Any:
    """A torch file (``.pt``) read with ``weights_only=True`` onto the CPU: tensors and plain
    containers only, so a pickle that would run code is refused. ``what`` names the file's kind
    without an article ("torch checkpoint"). Not a regular file, unreadable or refused:
    :class:`UnreadableFileError` saying why (the loader's warnings are silenced)."""
    import warnings

    import torch

    file = regular_file(path, f"a {what}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": noise here
            return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated, foreign or hostile pickles raise many kinds of errors
        text = str(e).strip()
        if text.startswith("Weights only load failed"):  # torch's advice is to drop the check
            detail = text.partition("WeightsUnpickler error:")[2].strip().splitlines()
            why = (
                "not a file of tensors and plain values that torch reads without running code"
                f" ({detail[0][:200] if detail else 'refused'}): damaged, or holding Python "
                "objects, which perturb-lens does not load"
            )
        else:
            why = f"{type(e).__name__}: {(text.splitlines() or [''])[0][:200]}"
    raise UnreadableFileError(f"{path} is not a readable {what} ({why})")
