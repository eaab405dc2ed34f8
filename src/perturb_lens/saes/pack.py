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
"""

from __future__ import annotations

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

from perturb_lens.paths import cache_root
from perturb_lens.saes.format import CFG_FILE, WEIGHTS_FILE

PACK_FORMAT = 1
MANIFEST = "manifest.json"
EXTRA_FILES = ("eval.json", "train_log.json")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


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


def _entry(folder: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """One SAE folder's manifest entry and its files' bytes."""
    if not (folder / CFG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise SAEPackError(
            f"{folder} is not a trained SAE folder ({CFG_FILE} + {WEIGHTS_FILE}); train it with "
            "perturb-lens sae train first."
        )
    files = {
        n: (folder / n).read_bytes()
        for n in (CFG_FILE, WEIGHTS_FILE, *EXTRA_FILES)
        if (folder / n).is_file()
    }
    cfg = json.loads(files[CFG_FILE])
    meta = cfg.get("metadata") or {}
    train_cfg = folder.parent / "train_config.json"
    entry = {
        "hook": meta.get("hook_name", ""),
        "model": meta.get("model_name", ""),
        "model_fingerprint": meta.get("model_fingerprint"),
        "architecture": cfg.get("architecture"),
        "d_in": cfg.get("d_in"),
        "d_sae": cfg.get("d_sae"),
        "k": cfg.get("k"),
        "train_config": json.loads(train_cfg.read_text()) if train_cfg.is_file() else None,
        "heldout": json.loads(files["eval.json"]) if "eval.json" in files else None,
        "files": {n: _sha256(b) for n, b in files.items()},
    }
    return entry, files


def pack_saes(folders: list[str | Path], archive: str | Path, *, name: str, version: str) -> Path:
    """Write the SAE ``folders`` (ids: their folder names) into the archive ``archive``."""
    from perturb_lens.version import __version__

    _check_name("Pack name", name)
    _check_name("Pack version", version)
    saes: dict[str, Any] = {}
    payload: dict[str, bytes] = {}
    for folder in map(Path, folders):
        sae_id = _check_name("SAE id (folder name)", folder.name)
        if sae_id in saes:
            raise SAEPackError(f"Two SAE folders are named {sae_id!r}; ids must be unique.")
        saes[sae_id], files = _entry(folder)
        payload.update({f"{sae_id}/{n}": b for n, b in files.items()})
    manifest = {
        "format": PACK_FORMAT,
        "name": name,
        "version": version,
        "perturb_lens": __version__,
        "saes": saes,
    }
    payload[MANIFEST] = json.dumps(manifest, indent=1, sort_keys=True).encode()
    archive = Path(archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(f".{archive.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for rel, data in sorted(payload.items()):
            info = tarfile.TarInfo(f"{name}/{rel}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, archive)
    return archive


def _read_archive(archive: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and the files (relative to ``<name>/``) of an archive, checked."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            bad = [m.name for m in members if not m.isfile()]
            if bad:
                raise SAEPackError(f"{archive} holds non-file entries {bad[:3]}; refusing it.")
            files = {}
            for m in members:
                fh = tar.extractfile(m)
                assert fh is not None
                files[m.name] = fh.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SAEPackError(f"{archive} is not a readable SAE pack (.tar.gz): {e}") from None
    manifests = [n for n in files if n.count("/") == 1 and n.endswith("/" + MANIFEST)]
    if len(manifests) != 1:
        raise SAEPackError(f"{archive} has no single <name>/{MANIFEST}: not an SAE pack.")
    root = manifests[0].split("/")[0]
    try:
        manifest = json.loads(files.pop(manifests[0]))
        listed = {f"{i}/{n}": h for i, e in manifest["saes"].items() for n, h in e["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SAEPackError(f"{archive}: its {MANIFEST} is malformed ({e}).") from None
    allowed = {CFG_FILE, WEIGHTS_FILE, *EXTRA_FILES}
    for sae_id, entry in manifest["saes"].items():  # names become paths: no '..', no '/'
        _check_name("SAE id", sae_id)
        if not set(entry["files"]) <= allowed:
            raise SAEPackError(f"{archive}: SAE {sae_id!r} lists files outside {sorted(allowed)}.")
    outside = [n for n in files if not n.startswith(_check_name("Pack name", root) + "/")]
    if outside:
        raise SAEPackError(f"{archive} holds files outside {root}/ ({outside[:3]}); refusing it.")
    rel = {n[len(root) + 1 :]: b for n, b in files.items()}
    if manifest.get("format") != PACK_FORMAT or manifest.get("name") != root:
        raise SAEPackError(f"{archive}: format/name in {MANIFEST} do not match the archive.")
    _check_name("Pack version", str(manifest.get("version")))
    _verify(archive, listed, rel)
    return manifest, rel


def _verify(where: Path, listed: dict[str, str], files: dict[str, bytes]) -> None:
    """Refuse files that differ from, are missing from, or are not in the manifest."""
    problems = [f"{n}: missing" for n in sorted(set(listed) - set(files))]
    problems += [f"{n}: not in the manifest" for n in sorted(set(files) - set(listed))]
    problems += [
        f"{n}: sha256 differs from the manifest"
        for n in sorted(set(listed) & set(files))
        if _sha256(files[n]) != listed[n]
    ]
    if problems:
        raise SAEPackError(
            f"SAE pack {where} fails its checksums ({'; '.join(problems)}): it was changed or "
            "damaged; download or pack it again."
        )


def packs_root() -> Path:
    """Where unpacked SAE packs live: ``<cache_root>/saes``."""
    return cache_root() / "saes"


def unpack(archive: str | Path, dest: str | Path | None = None) -> Path:
    """Verify ``archive`` and install it at ``<dest or packs_root()>/<name>/<version>``."""
    archive = Path(archive)
    manifest, files = _read_archive(archive)
    target = Path(dest or packs_root()) / manifest["name"] / str(manifest["version"])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def verified_folder(installed: Path, sae_id: str) -> Path:
    """The SAE folder ``sae_id`` of an installed pack, its files checked against the manifest."""
    manifest = json.loads((installed / MANIFEST).read_text())
    if sae_id not in manifest["saes"]:
        raise SAEPackError(
            f"SAE pack {installed} has no SAE {sae_id!r}; it has {sorted(manifest['saes'])}."
        )
    listed = {n: h for n, h in manifest["saes"][sae_id]["files"].items()}
    folder = installed / sae_id
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    _verify(folder, listed, files)
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
        ids = sorted(json.loads((installed / MANIFEST).read_text())["saes"])
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
