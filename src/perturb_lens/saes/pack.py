"""Trained SAEs as a versioned archive: pack SAELens folders, verify, unpack, find them by name.

An archive ``<name>-<version>.tar.gz`` holds ``<name>/manifest.json`` and one folder per SAE,
``<name>/<id>/`` (``cfg.json``, ``sae_weights.safetensors`` and, when present, ``eval.json`` and
``train_log.json``). The manifest records the format, name, version, the perturb-lens version,
and per SAE its hook, model, model weights fingerprint, the training config (``train_config.json``
beside the SAE folder), the held-out metrics (``eval.json``) and the sha256 of every file.

:func:`unpack` checks every file against the manifest (a changed, missing or extra file is
refused with the file named) and installs the archive under
``<cache_root>/saes/<name>/<version>/``; the SAE reference ``pack:NAME/ID`` (or
``pack:NAME@VERSION/ID``) resolves there, re-checking the hashes on each load, and
``ARCHIVE.tar.gz`` / ``ARCHIVE.tar.gz:ID`` unpacks on first use.

An archive is not trusted: it is streamed to disk, each entry's header checked before its data
is read (:mod:`perturb_lens.common.archive`: regular files under ``<name>/`` with the names above
only, at most :data:`~perturb_lens.common.archive.MAX_MEMBERS` entries, declared sizes within
:data:`PACK_RATIO` times the archive's size and the free disk), so memory and time stay bounded
whatever it claims. An existing ``<name>/<version>/`` folder is replaced only if it is an install
of that pack holding nothing its manifest does not list; links are never followed or replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from perturb_lens.common.archive import MAX_MEMBERS, ArchiveError, TarContents, read_tar_gz
from perturb_lens.common.files import (
    JSON_MAX_BYTES,
    MIB,
    UnreadableFileError,
    first_few,
    load_json,
    open_regular,
    size_text,
)
from perturb_lens.common.paths import cache_root, file_mode
from perturb_lens.saes.format import CFG_FILE, WEIGHTS_FILE

PACK_FORMAT = 1
MANIFEST = "manifest.json"
EXTRA_FILES = ("eval.json", "train_log.json")
PACK_FILES = (CFG_FILE, WEIGHTS_FILE, *EXTRA_FILES)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a plain folder name, 100 at most
# gzip shrinks float32 weights by ~10 % (bfloat16-rounded ones by about half) and JSON a few
# times, so a pack's files come to a small multiple of its size; a decompression bomb claims a
# thousand times (a 2.3 MB archive declared 2.4 GB). 20x plus some slack for the JSON files
# admits every real pack and refuses bombs before their data is read.
PACK_RATIO = 20
PACK_SLACK = 16 * MIB


class SAEPackError(ValueError):
    """An archive or ``pack:`` reference that cannot be used; the message names the problem."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_name(what: str, value: str) -> str:
    if not _NAME.fullmatch(value):
        raise SAEPackError(
            f"{what} {value!r} must be letters, digits, '.', '_' or '-' (no '/', ':' or '@')."
        )
    return value


def _read(path: Path) -> bytes:
    """A file of an SAE folder (regular files only: a pipe is refused, not waited on)."""
    with open_regular(path, "a file of an SAE folder") as f:
        return f.read()


def _json(data: bytes, path: Path) -> Any:
    """``data`` (the bytes of ``path``) as JSON, or an SAEPackError naming the file."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        raise SAEPackError(
            f"{path} is not valid JSON ({type(e).__name__}): damaged; save or train the SAE again "
            "before packing it."
        ) from None


def _entry(folder: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """One SAE folder's manifest entry and its files' bytes."""
    if not (folder / CFG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise SAEPackError(
            f"{folder} is not a trained SAE folder ({CFG_FILE} + {WEIGHTS_FILE}); train it with "
            "perturb-lens sae train first."
        )
    files = {n: _read(folder / n) for n in PACK_FILES if (folder / n).is_file()}
    cfg = _json(files[CFG_FILE], folder / CFG_FILE)
    meta = (cfg.get("metadata") if isinstance(cfg, dict) else None) or {}
    train_cfg = folder.parent / "train_config.json"
    heldout = _json(files["eval.json"], folder / "eval.json") if "eval.json" in files else None
    entry = {
        "hook": meta.get("hook_name", ""),
        "model": meta.get("model_name", ""),
        "model_fingerprint": meta.get("model_fingerprint"),
        "architecture": cfg.get("architecture"),
        "d_in": cfg.get("d_in"),
        "d_sae": cfg.get("d_sae"),
        "k": cfg.get("k"),
        "train_config": _json(_read(train_cfg), train_cfg) if train_cfg.is_file() else None,
        "heldout": heldout,
        "files": {n: _sha256(b) for n, b in files.items()},
    }
    return entry, files


def pack_saes(folders: list[str | Path], archive: str | Path, *, name: str, version: str) -> Path:
    """Write the SAE ``folders`` (ids: their folder names) into the archive ``archive``
    (all-or-nothing: a temp file beside it, renamed into place)."""
    from perturb_lens.common.version import __version__

    _check_name("Pack name", name)
    _check_name("Pack version", version)
    archive = Path(archive)
    if archive.is_dir() or (archive.exists() and not archive.is_file()):
        raise SAEPackError(
            f"--archive {archive} is {'a folder' if archive.is_dir() else 'not a regular file'}: "
            f"give the archive's file name, e.g. --archive {archive / f'{name}-{version}.tar.gz'}."
        )
    saes: dict[str, Any] = {}
    payload: dict[str, bytes] = {}
    for folder in map(Path, folders):
        sae_id = _check_name("SAE id (folder name)", folder.name)
        if sae_id in saes:
            raise SAEPackError(f"Two SAE folders are named {sae_id!r}; ids must be unique.")
        saes[sae_id], files = _entry(folder)
        payload.update({f"{sae_id}/{n}": b for n, b in files.items()})
    if len(payload) >= MAX_MEMBERS:
        raise SAEPackError(
            f"{len(folders)} SAEs make {len(payload) + 1} archive entries, more than the "
            f"{MAX_MEMBERS:,} sae unpack reads: pack them into several archives."
        )
    manifest = {
        "format": PACK_FORMAT,
        "name": name,
        "version": version,
        "perturb_lens": __version__,
        "saes": saes,
    }
    payload[MANIFEST] = json.dumps(manifest, indent=1, sort_keys=True).encode()
    archive.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=archive.parent, prefix=f".{archive.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            for rel, data in sorted(payload.items()):
                info = tarfile.TarInfo(f"{name}/{rel}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; the archive gets what the umask allows
        os.replace(tmp, archive)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return archive


def _name_rule() -> Any:
    """The entry names an SAE pack may hold: ``ROOT/manifest.json`` and ``ROOT/ID/FILE`` (FILE
    one of :data:`PACK_FILES`), one ROOT for all; a function name -> problem (None: fine)."""
    roots: list[str] = []

    def check(name: str) -> str | None:
        parts = name.split("/")
        if not roots:
            if not _NAME.fullmatch(parts[0]):
                return "does not start with the pack's name folder"
            roots.append(parts[0])
        root = roots[0]
        if parts[0] != root:
            return f"lies outside {root}/ (a pack has one top folder)"
        if parts[1:] == [MANIFEST]:
            return None
        if len(parts) == 3 and _NAME.fullmatch(parts[1]) and parts[2] in PACK_FILES:
            return None
        return f"is not {root}/{MANIFEST} or {root}/ID/FILE with FILE one of {list(PACK_FILES)}"

    return check


def _extract(archive: Path, staging: Path) -> tuple[str, dict[str, Any]]:
    """Check ``archive`` in a first read (headers, sizes, manifest, every sha256; nothing written),
    then stream it into ``staging`` in a second, which must find the same bytes: its root folder
    name and manifest."""
    try:
        size = os.stat(archive).st_size
    except FileNotFoundError:
        raise SAEPackError(f"SAE pack {archive} not found.") from None
    budget = min(PACK_RATIO * size + PACK_SLACK, shutil.disk_usage(staging).free)
    rules: dict[str, Any] = {
        "max_bytes": budget,
        "member_cap": lambda n: JSON_MAX_BYTES if n.endswith(".json") else budget,
    }
    try:
        seen = read_tar_gz(archive, check_name=_name_rule(), keep=_is_manifest, **rules)
        root, manifest = _checked_manifest(archive, seen)
        written = read_tar_gz(archive, check_name=_name_rule(), dest=staging, **rules)
    except (ArchiveError, UnreadableFileError) as e:
        raise SAEPackError(
            f"SAE pack {archive} ({size_text(size)}) is refused: {e}. Nothing was installed; "
            "fetch the archive again from its source, or make it with perturb-lens sae pack "
            f"(its files may take up to {PACK_RATIO}x the archive's size, and no more than the "
            "free disk)."
        ) from None
    if written.hashes != seen.hashes:
        raise SAEPackError(f"SAE pack {archive} changed while it was read: unpack it again.")
    return root, manifest


def _is_manifest(name: str) -> bool:
    return name.count("/") == 1 and name.endswith("/" + MANIFEST)


def _checked_manifest(archive: Path, seen: TarContents) -> tuple[str, dict[str, Any]]:
    """The archive's root folder name and manifest, checked against what it holds."""
    if len(seen.kept) != 1:
        raise SAEPackError(f"{archive} has no <name>/{MANIFEST}: not an SAE pack.")
    [(name, data)] = seen.kept.items()
    root = name.split("/")[0]
    try:
        manifest = json.loads(data)
        listed = {f"{i}/{n}": h for i, e in manifest["saes"].items() for n, h in e["files"].items()}
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
        why = f"{type(e).__name__}: {str(e)[:100]}"
        raise SAEPackError(f"{archive}: its {MANIFEST} is malformed ({why}).") from None
    for sae_id, entry in manifest["saes"].items():  # names become paths: no '..', no '/'
        _check_name("SAE id", sae_id)
        if not set(entry["files"]) <= set(PACK_FILES):
            raise SAEPackError(f"{archive}: SAE {sae_id!r} lists files other than {PACK_FILES}.")
    if manifest.get("format") != PACK_FORMAT or manifest.get("name") != root:
        raise SAEPackError(f"{archive}: format/name in {MANIFEST} do not match the archive.")
    _check_name("Pack version", str(manifest.get("version")))
    got = {n[len(root) + 1 :]: h for n, h in seen.hashes.items() if n != name}
    _verify(archive, listed, got)
    return root, manifest


def _verify(where: Path, listed: dict[str, str], files: dict[str, str]) -> None:
    """Refuse files (name -> sha256) that differ from, are missing from, or are not in the
    manifest (``listed``); the message names the first few problems."""
    problems = [f"{n}: missing" for n in sorted(set(listed) - set(files))]
    problems += [f"{n}: not in the manifest" for n in sorted(set(files) - set(listed))]
    problems += [
        f"{n}: sha256 differs from the manifest"
        for n in sorted(set(listed) & set(files))
        if files[n] != listed[n]
    ]
    if problems:
        raise SAEPackError(
            f"SAE pack {where} fails its checksums ({first_few(problems, sep='; ')}): it was "
            "changed or damaged; download or pack it again."
        )


def packs_root() -> Path:
    """Where unpacked SAE packs live: ``<cache_root>/saes``."""
    return cache_root() / "saes"


def unpack(archive: str | Path, dest: str | Path | None = None) -> Path:
    """Verify ``archive`` and install it at ``<dest or packs_root()>/<name>/<version>``.

    The archive is extracted into a temporary folder in ``dest`` first and moved into place only
    once every check passed; an existing version folder is replaced only if it is an install of
    this pack that holds nothing else (see :func:`_check_replaceable`)."""
    archive = Path(archive)
    if dest is not None and not str(dest).strip():
        raise SAEPackError(
            "--dest is empty, which would install into the current folder: give a folder, or "
            f"leave --dest out for the perturb-lens cache ({packs_root()})."
        )
    base = Path(dest) if dest is not None else packs_root()
    made = [p for p in (base, *base.parents) if not p.exists()]  # removed again on failure
    try:
        base.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=base, prefix=".unpack-"))
    except OSError as e:
        raise SAEPackError(
            f"cannot write to the install folder {base} ({e.strerror or e}): choose another "
            "--dest, or make it writable."
        ) from None
    try:
        root, manifest = _extract(archive, staging)
        target = base / root / str(manifest["version"])
        _check_replaceable(target, root, str(manifest["version"]))
        target.parent.mkdir(exist_ok=True)
        _replace(staging / root, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # ours: made above
        for path in made:  # the folders made for nothing, innermost first (only if empty)
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return target


def _check_replaceable(target: Path, name: str, version: str) -> None:
    """Refuse to install at ``target`` when it (or its pack folder) is a link or not a folder, or
    is a folder that is not an install of pack ``name@version`` with nothing else in it."""
    for path in (target.parent, target):
        if path.is_symlink():
            raise SAEPackError(
                f"{path} is a symbolic link; sae unpack neither writes through links nor replaces "
                "them: remove the link, or choose another --dest."
            )
        if path.exists() and not path.is_dir():
            raise SAEPackError(
                f"{path} exists and is not a folder: move it away, or choose another --dest."
            )
    if not target.exists():
        return
    problem = _install_problem(target, name, version)
    if problem is not None:
        raise SAEPackError(
            f"{target} exists and is not an install of SAE pack {name}@{version} ({problem}): "
            "sae unpack replaces only its own installs, so nothing was changed. Move that folder "
            "away, or choose another --dest."
        )


def _install_problem(folder: Path, name: str, version: str) -> str | None:
    """Why ``folder`` is not an install of ``name@version`` holding only what its manifest lists
    (None: it is one)."""
    try:
        manifest = load_json(folder / MANIFEST, "an SAE pack manifest")
        listed = {i: set(e["files"]) for i, e in manifest["saes"].items()}
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (UnreadableFileError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST} is not an SAE pack manifest"
    if (manifest.get("name"), str(manifest.get("version"))) != (name, version):
        return f"its {MANIFEST} is of {manifest.get('name')}@{manifest.get('version')}"
    extra = [p.name for p in folder.iterdir() if p.name != MANIFEST and p.name not in listed]
    for sae_id, names in listed.items():
        sub = folder / sae_id
        if sub.is_symlink() or not sub.is_dir():
            continue
        extra += [f"{sae_id}/{p.name}" for p in sub.iterdir() if p.name not in names]
    return f"it also holds {first_few(sorted(extra))}" if extra else None


def _replace(src: Path, target: Path) -> None:
    """Move the folder ``src`` to ``target``, replacing an existing ``target`` (already checked
    to be ours): it is moved aside first and removed only once ``src`` is in place."""
    if not target.exists():
        os.replace(src, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.replace(target, old)  # onto the empty folder just made
    try:
        os.replace(src, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _file_hashes(folder: Path) -> dict[str, str]:
    """name -> sha256 of the regular files in ``folder``, each read in blocks."""
    out = {}
    for p in folder.iterdir():
        if p.is_file():
            digest = hashlib.sha256()
            with open_regular(p, "a file of an SAE pack") as f:
                while block := f.read(MIB):
                    digest.update(block)
            out[p.name] = digest.hexdigest()
    return out


def _installed_ids(installed: Path) -> list[str]:
    try:
        return sorted(load_json(installed / MANIFEST, "an SAE pack manifest")["saes"])
    except (UnreadableFileError, KeyError, TypeError) as e:
        raise SAEPackError(
            f"{installed / MANIFEST} is damaged ({e}): unpack the pack again."
        ) from None


def verified_folder(installed: Path, sae_id: str) -> Path:
    """The SAE folder ``sae_id`` of an installed pack, its files checked against the manifest."""
    ids = _installed_ids(installed)
    if sae_id not in ids:
        raise SAEPackError(f"SAE pack {installed} has no SAE {sae_id!r}; it has {ids}.")
    manifest = load_json(installed / MANIFEST, "an SAE pack manifest")
    listed = dict(manifest["saes"][sae_id]["files"])
    folder = installed / sae_id
    _verify(folder, listed, _file_hashes(folder) if folder.is_dir() else {})
    return folder


def is_pack_ref(ref: str) -> bool:
    """``pack:...``, or an existing ``*.tar.gz`` archive (with an optional ``:ID``)."""
    return ref.startswith("pack:") or _archive_part(ref) is not None


def _archive_part(ref: str) -> tuple[Path, str | None] | None:
    """(archive, id or None) when ``ref`` names an existing ``.tar.gz`` (``:ID`` optional)."""
    if ref.endswith(".tar.gz") and Path(ref).expanduser().is_file():
        return Path(ref).expanduser(), None
    head, sep, tail = ref.rpartition(":")
    if sep and head.endswith(".tar.gz") and Path(head).expanduser().is_file():
        return Path(head).expanduser(), tail
    return None


def resolve_pack_ref(ref: str) -> Path:
    """The verified SAE folder of ``pack:NAME[@VERSION]/ID`` or ``ARCHIVE.tar.gz[:ID]``."""
    archive = _archive_part(ref)
    if archive is not None:
        installed = unpack(archive[0])
        ids = _installed_ids(installed)
        if archive[1] is None and len(ids) != 1:
            raise SAEPackError(f"{archive[0]} holds SAEs {ids}; name one as {archive[0]}:ID.")
        return verified_folder(installed, archive[1] or ids[0])
    m = re.fullmatch(r"pack:([^/@]+)(?:@([^/]+))?/(.+)", ref)
    if m is None:
        raise SAEPackError(f"SAE reference {ref!r}: write pack:NAME/ID or pack:NAME@VERSION/ID.")
    name, version, sae_id = m.groups()
    base = packs_root() / name
    versions = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if version is None and len(versions) > 1:
        raise SAEPackError(
            f"SAE pack {name!r} has versions {versions}; pick one: pack:{name}@V/ID."
        )
    if version is None:
        version = versions[0] if versions else None
    if version is None or version not in versions:
        raise SAEPackError(
            f"SAE pack {name!r}{'' if version is None else ' version ' + version} is not "
            f"installed in {packs_root()}; run: perturb-lens sae unpack ARCHIVE.tar.gz."
        )
    return verified_folder(base / version, sae_id)
