"""Reading a ``.tar.gz`` someone else made, without trusting it: bounded memory, time and disk.

:func:`read_tar_gz` reads the archive once, as a stream, and checks each entry's header before
any of its data is read:

- at most ``max_members`` entries (a 300,000-entry archive is refused at entry 10,001);
- tarfile's ``data`` filter (PEP 706): no absolute path, nothing outside the destination, no
  device; then regular files only, under names the caller accepts, none twice;
- declared sizes: each within the caller's cap for its name, all together within ``max_bytes``
  (a 2.3 MB archive declaring 2.4 GB is refused before its data is read).

An entry's data is then read in 1 MiB blocks and hashed (sha256), and written to disk only when
a destination is given, so memory stays at a block however large an entry is: a caller reads the
archive once to check it (nothing written) and a second time to extract what it checked. The
decompressed stream is counted as well: it may run ahead of the declared sizes by the tar headers
and padding of the entries seen, plus :data:`HEADER_SLACK`, so extension headers (pax, GNU long
names), which tarfile reads into memory whole, are refused past that.

tarfile's ``extractall(filter="data")`` vets paths and types but has no count, size or total
caps, and hashes nothing, so the loop is ours; the path and type checks are the library's.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from perturb_lens.common.files import open_regular, size_text

MAX_MEMBERS = 10_000
HEADER_SLACK = 1 << 20  # a pax or long-name header, tarfile's read-ahead, the end blocks
_PER_MEMBER = 2 * tarfile.BLOCKSIZE  # a member's header block and its data's padding
_BLOCK = 1 << 20


class ArchiveError(ValueError):
    """An archive refused while extracting it; the message says what is wrong with it."""


class _Budget:
    """The decompressed bytes a stream may yield: a wrapper of a file object whose reads raise
    :class:`ArchiveError` once more than ``limit`` bytes have come out of it (``limit`` grows as
    members are accepted)."""

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        self.raw, self.limit, self.used = raw, limit, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.used += len(data)
        if self.used > self.limit:
            raise ArchiveError(
                f"it decompresses to more than its entries declare ({size_text(self.limit)} "
                "with their tar headers), e.g. an oversized extension header"
            )
        return data


@dataclass
class TarContents:
    """What :func:`read_tar_gz` read: each entry's sha256, and the bytes of those kept."""

    hashes: dict[str, str] = field(default_factory=dict)
    kept: dict[str, bytes] = field(default_factory=dict)


def read_tar_gz(
    archive: Path,
    *,
    check_name: Callable[[str], str | None],
    max_bytes: int,
    member_cap: Callable[[str], int] | None = None,
    max_members: int = MAX_MEMBERS,
    keep: Callable[[str], bool] = lambda name: False,
    dest: Path | None = None,
) -> TarContents:
    """Read the regular files of the gzip'd tar ``archive`` as a stream, checking every header
    first (see the module docstring); hash each entry, keep the bytes of those ``keep(name)``
    selects, and with ``dest`` (an empty folder) write each to ``dest / name``.

    ``check_name(name)`` returns a problem (None: accepted); ``member_cap(name)`` the largest size
    an entry of that name may declare; ``max_bytes`` caps the declared sizes together. A refused
    archive raises :class:`ArchiveError` (a short message: one entry named); what was written
    into ``dest`` stays for the caller to remove."""
    out = TarContents()
    total = 0
    try:
        with open_regular(archive, "an archive") as raw, gzip.GzipFile(fileobj=raw) as gz:
            budget = _Budget(gz, HEADER_SLACK)
            with tarfile.open(fileobj=budget, mode="r|") as tar:  # type: ignore[call-overload]
                for count, member in enumerate(tar, start=1):
                    if count > max_members:
                        raise ArchiveError(f"it holds more than {max_members:,} entries")
                    shown = repr(member.name[:200])  # messages stay short whatever the name
                    problem = _member_problem(member, dest or Path("."), check_name, out.hashes)
                    if problem is not None:
                        raise ArchiveError(f"entry {shown} {problem}")
                    cap = member_cap(member.name) if member_cap is not None else max_bytes
                    total += member.size
                    if total > max_bytes:
                        raise ArchiveError(
                            f"entry {shown} declares {size_text(member.size)}, bringing the "
                            f"entries to {size_text(total)}, beyond the {size_text(max_bytes)} "
                            "allowed for all together"
                        )
                    if member.size > cap:
                        raise ArchiveError(
                            f"entry {shown} declares {size_text(member.size)}, more than the "
                            f"{size_text(cap)} an entry of its name may hold"
                        )
                    budget.limit = total + count * _PER_MEMBER + HEADER_SLACK
                    target = dest / member.name if dest is not None else None
                    kept = [] if keep(member.name) else None
                    out.hashes[member.name] = _copy(tar, member, target, kept)
                    if kept is not None:
                        out.kept[member.name] = b"".join(kept)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ArchiveError(f"it is not a readable .tar.gz ({type(e).__name__}: {e})") from None
    return out


def _member_problem(
    member: tarfile.TarInfo,
    dest: Path,
    check_name: Callable[[str], str | None],
    seen: dict[str, str],
) -> str | None:
    """Why ``member`` is refused (None: it is not): the data filter, type, name, duplicates."""
    if not member.isreg():
        return "is not a regular file (links, folders and devices are refused)"
    if member.name in seen:
        return "appears twice"
    problem = check_name(member.name)
    if problem is not None:
        return problem
    try:
        tarfile.data_filter(member, str(dest))
    except tarfile.FilterError as e:
        return f"is refused by tarfile's data filter ({type(e).__name__})"
    return None


def _copy(
    tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path | None, kept: list[bytes] | None
) -> str:
    """Read ``member``'s data in blocks: its sha256; each block also written to the new file
    ``path`` and appended to ``kept`` when given."""
    src = tar.extractfile(member)
    assert src is not None  # a regular file
    digest = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        out = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            out = stack.enter_context(open(path, "xb"))  # "x": never through a file there
        while block := src.read(_BLOCK):
            digest.update(block)
            if out is not None:
                out.write(block)
            if kept is not None:
                kept.append(block)
    return digest.hexdigest()
