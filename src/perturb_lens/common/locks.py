"""One writer per output folder: an exclusive ``flock`` on ``FOLDER/.lock`` (holding the writer's
PID), taken without waiting, released when the writer ends (the kernel drops it if it dies).

Used by the run store (``perturb-lens run``) and by SAE training (``perturb-lens sae train``), so
that two processes never write to one folder at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

LOCK = ".lock"


class FolderLockedError(RuntimeError):
    """Another process (or another writer in this one) holds the folder's lock."""


def acquire_lock(
    folder: Path, what: str, locked: type[FolderLockedError] = FolderLockedError
) -> int:
    """Lock ``folder`` (which must exist) for writing; the lock's file descriptor.

    ``what`` names the writer in messages ("run", "SAE training"); a held lock raises ``locked``
    naming the holder's PID. An unwritable folder raises an OSError saying what to do."""
    path = folder / LOCK
    try:  # O_NONBLOCK: a named pipe planted as .lock opens at once (and is refused below)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise OSError(
            e.errno,
            f"cannot write to {folder} ({e.strerror or e}): choose another --out, or make it "
            f"writable (chmod u+w {folder})",
        ) from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(
            f"{path} is not a regular file, so {folder} cannot be locked for the {what}: remove "
            f"it (rm {path}), or choose another --out"
        )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise locked(
            f"another {what} (pid {pid}) is writing to {folder}: wait for it to finish (or stop "
            "it), or choose another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release_lock(fd: int) -> None:
    """Release a lock taken by :func:`acquire_lock` (the lock file stays)."""
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def folder_locked(folder: Path, what: str) -> Iterator[None]:
    """``folder`` locked for the block (see :func:`acquire_lock`)."""
    fd = acquire_lock(folder, what)
    try:
        yield
    finally:
        release_lock(fd)
