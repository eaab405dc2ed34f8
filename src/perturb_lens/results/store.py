"""The run directory: Parquet shards + a JSON manifest, written atomically, resumable.

Layout of a run directory::

    manifest.json          config, config_hash, meta (versions, model, frame, scope, seeds, and
                           what the rows depend on beyond the config: the weights fingerprint,
                           dataset hash, sha256 of the statistics files, ...), created, complete,
                           and per shard {file, sha256, rows, info}
    shards/{id}.parquet    one row per sequence x position x direction x length (or, in an
                           aggregate run, the shard's aggregates)
    sketches/{id}.parquet  an aggregate shard's quantile sketch (its manifest entry's ``sketch``),
                           until merged into the run-level ``sketch-{n}.parquet`` (manifest key
                           ``sketch``: file, sha256 and the shards it covers), see
                           :mod:`~perturb_lens.results.compaction`
    tokens.parquet         the token id and text at each (seq, pos) the run keeps rows of
                           (manifest key ``tokens``), see :mod:`~perturb_lens.results.tokens`
    .lock                  flock'ed by the writer for its lifetime; holds its PID

Every file is written to a temporary file in its own folder, fsync'ed and moved into place with
``os.replace``, so a crash (or a full disk) at any moment leaves the previous manifest and shards
whole. A shard counts as done only if the manifest lists it *and* its file's sha256 matches, so
resuming recomputes exactly the shards that are missing or damaged. A resume whose meta differs
from the recorded one (other tokens, weights, statistics, versions) is refused: the rows would mix.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from perturb_lens.common.files import (
    MANIFEST_MAX_BYTES,
    UnreadableFileError,
    first_few,
    open_regular,
    read_limited,
)
from perturb_lens.common.locks import LOCK, FolderLockedError, acquire_lock, release_lock
from perturb_lens.common.writes import (  # noqa: F401  (re-exported: the run store's API)
    MISSING,
    TMP_SUFFIX,
    _to_jsonable,
    atomic_write,
    atomic_write_json,
    diff_configs,
    file_sha256,
)

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARDS = "shards"
SKETCHES = "sketches"
RUN_SKETCH = "sketch"  # manifest key of the run-level (merged) quantile sketch
FORMAT_VERSION = 2  # 2: an aggregate run's quantile sketch may live in sketch files (not shards)
# what atomic_write leaves when killed: ".NAME." + mkstemp's 8 random characters + ".tmp"
# files a run writes into its folder besides shards, sketches and the manifest (the statistics,
# the pool, the SAE's alive latents, the token text: runner.STATS_FILE, POOL_FILE,
# saes.directions.ALIVE_FILE, results.tokens.TOKENS_FILE)
RUN_FILES = frozenset({LOCK, "stats.safetensors", "pool.pt", "sae_alive.pt", "tokens.parquet"})
_STALE_TMP = re.compile(r"\.[^/]+\.[a-z0-9_]{8}\.tmp")
_SHARD_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class RunLockedError(FolderLockedError):
    """Another process (or another ResultStore in this one) is writing to the run directory."""


class NotARunError(FileExistsError):
    """An output folder that holds other files and no run: a run is not written among them."""


class ConfigMismatchError(ValueError):
    """Resuming a run directory with a config whose hash differs from the recorded one."""


class ChecksumError(ValueError):
    """A shard file does not match the sha256 recorded in the manifest."""


class ManifestError(ValueError):
    """A manifest that is not a JSON object with config, config_hash, meta and shards."""


class InputsChangedError(ValueError):
    """Resuming would compute the remaining shards from other inputs than the finished ones."""


INFORMATIONAL_META = frozenset({"python", "model_source", "cpu"})
"""Meta keys that may change on resume (with a warning); any other change refuses the resume.
``cpu`` is vetted before this check, by the runner (refused unless ``--allow-cpu-change``)."""

_META_MEANING = {
    "dataset_hash": "the tokens: the text source, its tokenizer or the data settings changed",
    "weights_fingerprint": "the model weights",
    "stats_sha256": "the activation statistics (stats.safetensors)",
    "pool_sha256": "the pool of real activations (pool.pt)",
    "median_norm": "the activation statistics",
    "stats": "the activation statistics' fit sample (stats section)",
    "lengths": "the resolved length grid (relative lengths follow the statistics)",
    "perturb_lens_version": "the perturb-lens version (numbers may differ)",
    "torch_version": "the torch version (numbers may differ)",
    "device": "the device (numbers differ between devices)",
}
_SHARD_FILE = re.compile(rf"{SHARDS}/[A-Za-z0-9_][A-Za-z0-9_.-]*\.parquet")
SKETCH_FILE = re.compile(rf"{SKETCHES}/[A-Za-z0-9_][A-Za-z0-9_.-]*\.parquet")
RUN_SKETCH_FILE = re.compile(r"sketch-[0-9]+\.parquet")


def _short(value: Any) -> str:
    """A value for a message: long hashes cut to 12 characters."""
    if isinstance(value, str) and len(value) > 24 and re.fullmatch(r"[\w:]+", value):
        return repr(value[:12] + "...")
    return repr(value)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# The run directory


def load_manifest(run_dir: Path) -> dict:
    """The manifest of a run directory (config, meta, shards with checksums, ...)."""
    path = Path(run_dir) / MANIFEST
    try:
        text = read_limited(path, MANIFEST_MAX_BYTES, "a run manifest")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {MANIFEST} in {run_dir}: not a perturb-lens run directory (or the run has not "
            "started yet); pass the folder given to --out"
        ) from None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ManifestError(
            f"{path} is not valid JSON ({why}): damaged or edited by hand. {_fresh_run(run_dir)}"
        ) from None
    check_manifest(manifest, path)
    return manifest


def _fresh_run(run_dir: Path) -> str:
    return (
        f"Start a fresh run: choose another --out (or delete {run_dir}) and run the config again."
    )


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else "null")


def check_manifest(manifest: Any, path: Path) -> None:
    """Raise :class:`ManifestError`, naming what is wrong, unless ``manifest`` has the layout
    this version writes (an object with config, config_hash, meta and shards objects)."""
    if not isinstance(manifest, dict):
        problems = [f"it holds {_json_type(manifest)} instead of an object"]
    else:
        problems = []
        for key, kind in (("config", dict), ("config_hash", str), ("meta", dict), ("shards", dict)):
            if key not in manifest:
                problems.append(f"{key!r} is missing")
            elif not isinstance(manifest[key], kind):
                want = _json_type(kind())
                problems.append(f"{key!r} is {_json_type(manifest[key])} instead of {want}")
        version = manifest.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            problems.append(
                f"format_version {version!r} is not one this perturb-lens reads "
                f"({FORMAT_VERSION}; a newer perturb-lens may read it)"
            )
    if problems:
        raise ManifestError(
            f"{path} is damaged ({'; '.join(problems)}), so which shards are finished, and from "
            f"what, is unknown. {_fresh_run(Path(path).parent)}"
        )


def _entry_problem(entry: Any, pattern: re.Pattern[str] = _SHARD_FILE) -> str | None:
    """What is wrong with a manifest's file entry (None: it names a file matching ``pattern``
    and a sha256)."""
    if not isinstance(entry, dict):
        return f"its manifest entry is {_json_type(entry)} instead of an object"
    if not isinstance(entry.get("file"), str) or not pattern.fullmatch(entry["file"]):
        return "its manifest entry has no valid 'file'"
    sha = entry.get("sha256")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        return "its manifest entry has no valid 'sha256'"
    return None


def check_new_or_resume(
    run_dir: Path, resume: bool, config: dict | None = None, config_hash: str | None = None
) -> None:
    """Refuse a directory that already holds a run unless resuming (cheap: call it early).

    With ``config`` and its ``config_hash``, resuming is also refused (naming the differing keys)
    when the run was made with another config.
    """
    if not (Path(run_dir) / MANIFEST).exists():
        return
    if not resume:
        raise FileExistsError(
            f"run dir exists; pass --resume to continue or choose another --out "
            f"({run_dir} already holds a run)"
        )
    if config is not None and config_hash is not None:
        check_same_config(Path(run_dir), load_manifest(Path(run_dir)), config, config_hash)


def check_same_config(run_dir: Path, old: dict, config: dict, new_hash: str) -> None:
    """Raise :class:`ConfigMismatchError`, naming the keys, if ``old`` has another config."""
    if old.get("config_hash") == new_hash:
        return
    diffs = diff_configs(old.get("config", {}), _to_jsonable(config))
    lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in diffs) or (
        "  (no key differs: the hash function or its inputs changed)"
    )
    raise ConfigMismatchError(
        f"cannot resume {run_dir}: it was made with another config "
        f"(hash {old.get('config_hash')} != {new_hash}). Differing keys (old -> new):\n"
        f"{lines}\nResume with the original config, or choose another --out."
    )


class ResultStore:
    """Writer (and reader) of one run directory.

    Typical use by the engine::

        with ResultStore(out) as store:
            store.create(config, config_hash(config), meta, resume=resume)
            done = store.done_shards()
            for s in (s for s in shard_ids if s not in done):
                store.write_shard(s, compute(s))
            store.finish(summary)
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._lock_fd: int | None = None
        self._manifest: dict | None = None
        self._made: list[Path] = []  # what open() created, removed again if no run starts
        self._mutex = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------

    def create(self, config: dict, config_hash: str, meta: dict, *, resume: bool) -> None:
        """Open the run directory for writing: make it, lock it, write or check the manifest.

        An existing manifest is refused without ``resume``; with ``resume`` its config hash must
        equal ``config_hash`` (else the differing keys are named) and it is kept as is.
        """
        if self._manifest is not None:
            raise RuntimeError(f"ResultStore({self.run_dir}) is already open")
        self.open()
        try:
            manifest_path = self.run_dir / MANIFEST
            if manifest_path.exists():
                check_new_or_resume(self.run_dir, resume)
                old = load_manifest(self.run_dir)
                self._check_resume(old, config, config_hash, meta)
                self._manifest = old
                self._check_run_sketch()
            else:
                self._manifest = {
                    "format_version": FORMAT_VERSION,
                    "config": _to_jsonable(config),
                    "config_hash": config_hash,
                    "meta": _to_jsonable(meta),
                    "created": _now(),
                    "complete": False,
                    "shards": {},
                }
                atomic_write_json(manifest_path, self._manifest)
        except BaseException:
            self._manifest = None
            self.close()
            raise

    def open(self) -> ResultStore:
        """Make the run directory and take its lock, before any work (idempotent).

        Fails fast, saying what to do, when the directory cannot be written or another run holds
        it. :meth:`create` then writes or checks the manifest.
        """
        if self._lock_fd is None:
            self._check_not_foreign()
            wanted = [self.run_dir, self.run_dir / SHARDS, self.run_dir / LOCK]
            missing = [p for p in wanted if not p.exists()]
            try:
                self._open_dir()
                self._acquire_lock()
            except BaseException as e:
                if not isinstance(e, RunLockedError):  # a locked folder is another run's
                    self._made = missing
                    self._remove_if_unused()
                raise
            self._made = missing
            self._remove_stale_tmp_files()
            self._check_writable()
        return self

    def close(self) -> None:
        """Release the lock (the manifest on disk is always up to date).

        A directory this store made but never wrote a manifest into (the run failed before it
        started) is removed again, so a failed start leaves nothing behind.
        """
        if self._lock_fd is not None:
            release_lock(self._lock_fd)
            self._lock_fd = None
            self._remove_if_unused()

    def _remove_if_unused(self) -> None:
        """Remove what :meth:`open` created (lock file, shards/, the folder) if no run started
        in it; a folder that existed before is left as it was."""
        if (self.run_dir / MANIFEST).exists():
            return
        for path in reversed(self._made):  # the lock, shards/, then the folder itself
            with contextlib.suppress(OSError):
                if path.name == LOCK:
                    path.unlink()
                else:
                    path.rmdir()
        self._made = []

    def _check_writable(self) -> None:
        """Fail now, not at the first write, when the folder cannot take new files (an existing
        run dir made read-only, a read-only mount): the lock file alone does not show it."""
        try:
            fd, probe = tempfile.mkstemp(dir=self.run_dir, prefix=".probe.", suffix=TMP_SUFFIX)
        except OSError as e:
            self.close()
            raise OSError(
                e.errno,
                f"cannot write to the run directory {self.run_dir} ({e.strerror or e}): choose "
                f"another --out, or make it writable (chmod u+w {self.run_dir})",
            ) from e
        os.close(fd)
        os.unlink(probe)

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_dir(self) -> None:
        try:
            (self.run_dir / SHARDS).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(
                e.errno,
                f"cannot create the run directory {self.run_dir} ({e.strerror or e}): choose "
                "another --out, or make its parent writable",
            ) from e

    def _acquire_lock(self) -> None:
        self._lock_fd = acquire_lock(self.run_dir, "run", RunLockedError)

    def _check_not_foreign(self) -> None:
        """Refuse an existing folder without a manifest that holds anything a run does not
        write (:func:`_left_by_a_store`): a run is not written among someone's files, nor are
        their files cleaned up as ours. A run whose manifest was lost is still taken as one."""
        folder = self.run_dir
        if not folder.is_dir() or (folder / MANIFEST).exists():
            return
        foreign = sorted(p.name for p in folder.iterdir() if not _left_by_a_store(p))
        if foreign:
            shown = first_few(foreign)
            raise NotARunError(
                f"{folder} is not empty and holds no perturb-lens run ({shown}): a run gets a "
                f"folder of its own. Choose a new or empty --out (e.g. --out {folder / 'run'})."
            )

    def _remove_stale_tmp_files(self) -> None:
        """Temp files left by a killed writer (we hold the lock, so none is in use): only names
        :func:`atomic_write` makes, so a hidden ``.notes.tmp`` of the user's stays."""
        for folder in (self.run_dir, self.run_dir / SHARDS, self.run_dir / SKETCHES):
            for tmp in folder.glob(f".*{TMP_SUFFIX}"):
                if _STALE_TMP.fullmatch(tmp.name) and tmp.is_file():
                    tmp.unlink(missing_ok=True)

    def _check_resume(self, old: dict, config: dict, new_hash: str, meta: dict) -> None:
        """Same config; same inputs (meta) unless only :data:`INFORMATIONAL_META` differs or no
        shard is finished yet (then the new meta replaces the old)."""
        check_same_config(self.run_dir, old, config, new_hash)
        changed = diff_configs(old["meta"], _to_jsonable(meta))
        if not changed:
            return
        shown = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, a, b in changed)
        blocking = [c for c in changed if c[0].split(".")[0] not in INFORMATIONAL_META]
        if blocking and old["shards"]:
            lines = "\n".join(
                f"  {k}: {_short(a)} -> {_short(b)}"
                + (
                    f"  ({_META_MEANING[k.split('.')[0]]})"
                    if k.split(".")[0] in _META_MEANING
                    else ""
                )
                for k, a, b in blocking
            )
            raise InputsChangedError(
                f"cannot resume {self.run_dir}: its {len(old['shards'])} finished shard(s) were "
                "computed from other inputs than the rest would be, and the rows would mix. "
                f"Changed (recorded -> now):\n{lines}\nRestore what changed and resume, or "
                f"start a fresh run: choose another --out (or delete {self.run_dir})."
            )
        logger.warning("resuming %s with a different environment: %s", self.run_dir, shown)
        old["meta"] = _to_jsonable(meta)
        atomic_write_json(self.run_dir / MANIFEST, old)

    # -- reading ----------------------------------------------------------------------------------

    @property
    def manifest(self) -> dict:
        """A copy of the manifest (read from disk if this store has not been opened)."""
        if self._manifest is None:
            return load_manifest(self.run_dir)
        return copy.deepcopy(self._manifest)

    def done_shards(self) -> set[str]:
        """Shards listed in the manifest whose file exists and matches its recorded sha256 (and
        so does its sketch file, unless the run-level sketch covers it)."""
        manifest = self._manifest if self._manifest is not None else load_manifest(self.run_dir)
        covered = covered_shards(manifest)
        done = set()
        for shard_id, entry in manifest["shards"].items():
            files = [("", entry, _SHARD_FILE)]
            side = entry.get("sketch") if isinstance(entry, dict) else None
            if side is not None and shard_id not in covered:
                files.append(("sketch ", side, SKETCH_FILE))
            if all(self._file_ok(shard_id, *f) for f in files):
                done.add(shard_id)
        return done

    def _file_ok(self, shard_id: str, what: str, entry: Any, pattern: re.Pattern[str]) -> bool:
        """Whether a shard's file (``what``: "" or "sketch ") is as its manifest entry records
        (else a warning: it will be recomputed)."""
        problem = _entry_problem(entry, pattern)
        if problem is not None:
            logger.warning("shard %s: %s%s; it will be recomputed", shard_id, what, problem)
            return False
        path = self.run_dir / entry["file"]
        if not path.is_file():
            logger.warning("shard %s: %s is missing; it will be recomputed", shard_id, path)
        elif file_sha256(path) != entry["sha256"]:
            logger.warning("shard %s: %s is damaged; it will be recomputed", shard_id, path)
        else:
            return True
        return False

    # -- writing ----------------------------------------------------------------------------------

    def write_shard(
        self,
        shard_id: str,
        table: pd.DataFrame | pa.Table,
        *,
        info: dict | None = None,
        sketch: pa.Table | None = None,
    ) -> None:
        """Write ``shards/{shard_id}.parquet`` atomically, then record it (and its sha256).

        ``sketch``: the shard's quantile sketch, written first to ``sketches/{shard_id}.parquet``
        and recorded in the entry's ``sketch`` until a compaction merges it into the run-level
        sketch. A shard that sketch already covers (recomputed after its file was damaged: the
        same rows, resume refuses other inputs) writes none, as it is counted there.
        """
        if self._lock_fd is None or self._manifest is None:
            raise RuntimeError("ResultStore.create() must be called before write_shard()")
        if not _SHARD_ID.fullmatch(shard_id):
            raise ValueError(f"shard id {shard_id!r} must match {_SHARD_ID.pattern}")
        side = None
        if sketch is not None and shard_id not in covered_shards(self._manifest):
            side = f"{SKETCHES}/{shard_id}.parquet"
            (self.run_dir / SKETCHES).mkdir(exist_ok=True)
            atomic_write(self.run_dir / side, lambda f: pq.write_table(sketch, f))
        if isinstance(table, pd.DataFrame):
            table = pa.Table.from_pandas(table, preserve_index=False)
        i = table.schema.get_field_index("direction")
        if i >= 0 and not pa.types.is_dictionary(table.schema.field(i).type):
            table = table.set_column(i, "direction", table.column(i).dictionary_encode())
        rel = f"{SHARDS}/{shard_id}.parquet"
        path = self.run_dir / rel
        atomic_write(path, lambda f: pq.write_table(table, f))
        entry = {"file": rel, "sha256": file_sha256(path), "rows": table.num_rows, "info": info}
        if side is not None:
            entry["sketch"] = {"file": side, "sha256": file_sha256(self.run_dir / side)}
        self.update_manifest(lambda m: m["shards"].__setitem__(shard_id, _to_jsonable(entry)))

    def finish(self, summary: dict | None = None) -> None:
        """Mark the run complete (with an optional summary) in the manifest."""

        def complete(manifest: dict) -> None:
            manifest["complete"] = True
            manifest["finished"] = _now()
            if summary is not None:
                manifest["summary"] = _to_jsonable(summary)

        self.update_manifest(complete)

    @property
    def writing(self) -> bool:
        """Whether this store holds the run's lock with its manifest open (after create())."""
        return self._lock_fd is not None and self._manifest is not None

    def update_manifest(self, change: Callable[[dict], None]) -> None:
        """Apply ``change`` to a copy of the manifest and write it atomically (the commit point
        of every write: the manifest on disk is always whole and up to date)."""
        if not self.writing:
            raise RuntimeError("ResultStore.create() must be called before writing to the run")
        with self._mutex:
            manifest = copy.deepcopy(self._manifest)
            change(manifest)
            atomic_write_json(self.run_dir / MANIFEST, manifest)
            self._manifest = manifest

    def _check_run_sketch(self) -> None:
        """On resume: a run-level sketch that is missing or damaged loses the sketches of the
        shards it covers, so it and those shards are dropped from the manifest (recomputed)."""
        assert self._manifest is not None
        entry = self._manifest.get(RUN_SKETCH)
        if entry is None:
            return
        try:
            verified_bytes(self.run_dir, "the run's merged sketch", entry, RUN_SKETCH_FILE)
        except ChecksumError as e:
            covered = covered_shards(self._manifest)
            logger.warning("%s; the %d shard(s) it covers will be recomputed", e, len(covered))

            def drop(manifest: dict) -> None:
                del manifest[RUN_SKETCH]
                for shard_id in covered:
                    manifest["shards"].pop(shard_id, None)

            self.update_manifest(drop)


def _left_by_a_store(path: Path) -> bool:
    """Whether ``path`` (in a run folder without a manifest) is something a run writes: its lock,
    temp files, statistics files, a merged sketch, ``shards/`` and ``sketches/`` holding only
    Parquet shards and temp files (what a run whose manifest was lost still holds)."""
    if path.name == LOCK:  # whatever it is: acquire_lock says what to do with a strange one
        return True
    if path.is_symlink():
        return False
    if path.is_file():
        return path.name in RUN_FILES or _ours(path.name, RUN_SKETCH_FILE)
    if path.name in (SHARDS, SKETCHES) and path.is_dir():
        shard = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.parquet")
        return all(p.is_file() and _ours(p.name, shard) for p in path.iterdir())
    return False


def _ours(name: str, pattern: re.Pattern[str]) -> bool:
    """A file name matching ``pattern``, or a temp file :func:`atomic_write` leaves."""
    return bool(pattern.fullmatch(name) or _STALE_TMP.fullmatch(name))


def verified_shard_bytes(run_dir: Path, shard_id: str, entry: dict) -> bytes:
    """A shard's file, read once and checked against its manifest entry; a malformed entry, a
    missing file or another sha256 raises :class:`ChecksumError` saying to resume."""
    return verified_bytes(run_dir, f"shard {shard_id}", entry)


def verified_bytes(
    run_dir: Path, name: str, entry: Any, pattern: re.Pattern[str] = _SHARD_FILE
) -> bytes:
    """The file of a manifest ``entry`` (``{file, sha256}``, ``file`` matching ``pattern``;
    ``name`` says what it is), read once and checked; else :class:`ChecksumError`."""
    fix = "rerun the run with --resume to recompute it"
    problem = _entry_problem(entry, pattern)
    if problem is not None:
        raise ChecksumError(f"{name} of {run_dir}: {problem}: {fix}")
    path = run_dir / entry["file"]
    try:
        with open_regular(path, name) as f:
            data = f.read()
    except FileNotFoundError:
        raise ChecksumError(f"{name} ({path}) is missing: {fix}") from None
    except UnreadableFileError:
        raise ChecksumError(f"{name} ({path}) is not a regular file: {fix}") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ChecksumError(
            f"{name} ({path}) does not match its recorded sha256 (damaged or changed after the "
            f"run): {fix}"
        )
    return data


def covered_shards(manifest: dict) -> set[str]:
    """The shards whose quantile sketch the run-level sketch (manifest key ``sketch``) holds."""
    entry = manifest.get(RUN_SKETCH)
    shards = entry.get("shards") if isinstance(entry, dict) else None
    return set(shards) if isinstance(shards, list) else set()


def sketch_entries(manifest: dict) -> list[tuple[str, dict]]:
    """``(shard id, sketch file entry)`` of the shards whose sketch is in its own file, not yet
    merged into the run-level sketch (shard-id order)."""
    covered = covered_shards(manifest)
    return [
        (shard_id, entry["sketch"])
        for shard_id, entry in sorted(manifest["shards"].items())
        if isinstance(entry, dict) and entry.get("sketch") is not None and shard_id not in covered
    ]


def load_results(
    run_dir: Path,
    *,
    columns: Iterable[str] | None = None,
    filters: Any = None,
) -> pd.DataFrame:
    """All shards of a run as one DataFrame (shard-id order), each checked against its sha256.

    ``columns`` and ``filters`` are passed to :func:`pyarrow.parquet.read_table` (e.g.
    ``filters=[("direction", "in", ["isotropic", "ablation"])]``). ``direction`` comes back as a
    pandas Categorical over the directions of all shards. An aggregate run (``results:
    aggregate``) holds its per-shard aggregate tables instead of rows, without the quantile
    sketch (kept in sketch files): read them merged with
    :func:`~perturb_lens.results.aggregate.run_aggregates`.
    """
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    columns = list(columns) if columns is not None else None
    tables = []
    for shard_id in sorted(manifest["shards"]):
        data = verified_shard_bytes(run_dir, shard_id, manifest["shards"][shard_id])
        tables.append(pq.read_table(pa.BufferReader(data), columns=columns, filters=filters))
    if not tables:
        logger.warning("%s has no shards yet", run_dir)
        return pd.DataFrame(columns=columns)
    df = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    if "direction" in df.columns and not isinstance(df["direction"].dtype, pd.CategoricalDtype):
        df["direction"] = df["direction"].astype("category")
    # what the analysis functions check: an aggregate run's tables are not rows (their errors
    # point to the aggregate API instead of naming missing columns)
    df.attrs.update(results=manifest["config"].get("results", "rows"), run_dir=str(run_dir))
    return df


def __getattr__(name: str) -> object:
    """``RunStore``: the old name of :class:`ResultStore` (one release, with a warning)."""
    if name == "RunStore":
        import warnings

        warnings.warn("RunStore is now ResultStore", DeprecationWarning, stacklevel=2)
        return ResultStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
