"""The built wheel: its file list (the package and its presets, no test data), and (slow) the
wheel installed into a fresh virtual environment, used from a folder outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "perturb_lens"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from this checkout with this interpreter's setuptools (no download)."""
    pytest.importorskip("build", reason="the wheel tests need `pip install build`")
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out)]
    done = subprocess.run([*cmd, str(REPO)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = out.glob("*.whl")
    return path


def test_wheel_holds_the_package_and_presets_and_no_test_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    info = f"perturb_lens-{VERSION}.dist-info/"
    assert wheel.name == f"perturb_lens-{VERSION}-py3-none-any.whl"
    assert all(n.startswith(("perturb_lens/", info)) for n in names), names
    package = {n for n in names if n.startswith("perturb_lens/")}
    source = {
        f"perturb_lens/{p.relative_to(PACKAGE).as_posix()}"
        for p in PACKAGE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    assert package == source  # every module, py.typed and every preset; nothing else
    presets = {Path(n).name for n in package if n.startswith("perturb_lens/config/presets/")}
    assert presets >= {p.name for p in PACKAGE.glob("config/presets/*.yaml")} > set()
    assert "sensitive-directions.yaml" in presets
    data = [n for n in package if not n.endswith((".py", ".yaml", "py.typed"))]
    assert data == []  # no test data, configs, runs or model files
    assert not any("tests/" in n or "configs/" in n or "frozen_configs" in n for n in names)
    meta = zipfile.ZipFile(wheel).read(info + "METADATA").decode()
    assert f"\nVersion: {VERSION}\n" in meta
    entry = zipfile.ZipFile(wheel).read(info + "entry_points.txt").decode()
    assert "perturb-lens = perturb_lens.cli:app" in entry


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_a_preset(tmp_path: Path) -> None:
    """scripts/wheel_check.sh (as CI runs it, with a smaller main job and quick subset): sdist and
    wheel built and twine-checked, the wheel installed into a new venv (torch CPU first), then
    from an empty folder outside the checkout --version, presets, `run sensitive-directions`,
    report and tests/test_presets.py against the installed package."""
    pytest.importorskip("build", reason="the wheel tests need `pip install build twine`")
    pytest.importorskip("twine", reason="the wheel tests need `pip install build twine`")
    env = {
        **os.environ,
        "BUILD_PYTHON": sys.executable,
        "BUILD_ARGS": "--no-isolation",
        "QUICK_TESTS": "tests/test_presets.py",
    }
    env.pop("PYTHONPATH", None)
    small = ["data.n_seqs=4", "shard_seqs=2", "lengths=[0,0.1,0.3]", "metrics=[kl]"]
    cmd = ["bash", str(REPO / "scripts" / "wheel_check.sh"), str(tmp_path / "work"), "--", *small]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3000)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert f"perturb-lens {VERSION}" in log and f"wheel check passed: perturb-lens {VERSION}" in log
    assert "sensitive-directions" in log and "Report:" in log
    run = tmp_path / "work" / "use" / "run"
    assert (run / "manifest.json").is_file() and (run / "report.html").is_file()
