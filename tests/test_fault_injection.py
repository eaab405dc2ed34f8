"""Fault injection: each file of a run directory and of the caches is damaged, one at a time
(truncated, overwritten with garbage, deleted, given wrong JSON types), and ``run --resume`` and
``report`` either recover exactly (rows identical to the uninterrupted run) or refuse clearly
(exit 1, no traceback, a message naming the file and the fix). Each case states which it expects.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from perturb_lens.cli.app import app
from perturb_lens.results import load_manifest, load_results

GARBAGE = bytes(range(256)) * 4
Damage = Callable[[Path], None]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    """A cache root of this module's own, so damaging it touches no other test."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PERTURB_LENS_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def config_file(shard_config: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small run: 4 sequences in 2 shards, one direction, two lengths."""
    cfg = {
        **shard_config,
        "data": {**shard_config["data"], "n_seqs": 4},
        "lengths": [0, 4],
        "directions": ["cov-random-mixture"],
    }
    path = tmp_path_factory.mktemp("cfg") / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str) -> tuple[int, str]:
    """The CLI in-process: (exit code, output from ``Error:`` on, if any); never a traceback."""
    result = CliRunner().invoke(app, list(args))
    out = result.output
    assert "Traceback" not in out, out
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, out[out.find("Error: ") :] if "Error: " in out else out


@pytest.fixture(scope="module")
def reference(cache: Path, config_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run, through the CLI."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    code, out = cli("run", str(config_file), "--out", str(run_dir), "-q")
    assert code == 0, out
    return run_dir


# -- the damage ----------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def garbage(path: Path) -> None:
    path.write_bytes(GARBAGE)


def delete(path: Path) -> None:
    path.unlink()


def edit_manifest(change: Callable[[dict], object]) -> Damage:
    """Rewrite manifest.json after ``change(manifest)`` edited it in place."""

    def damage(path: Path) -> None:
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))

    return damage


def manifest_as_list(path: Path) -> None:
    path.write_text(json.dumps([json.loads(path.read_text())]))


def first_entry(change: Callable[[dict], object]) -> Damage:
    """Edit the manifest entry of shard s00000 in place."""
    return edit_manifest(lambda m: change(m["shards"]["s00000"]))


RECOVER, REFUSE = "recover", "refuse"

# (file in the run dir, damage, expected outcome of --resume, words the refusal names)
RUN_DIR_CASES: dict[str, tuple[str, Damage, str, tuple[str, ...]]] = {
    "manifest-truncated": ("manifest.json", truncate, REFUSE, ("not valid JSON",)),
    "manifest-garbage": ("manifest.json", garbage, REFUSE, ("not valid JSON",)),
    "manifest-deleted": ("manifest.json", delete, RECOVER, ()),  # computed again, from scratch
    "manifest-a-list": ("manifest.json", manifest_as_list, REFUSE, ("a list",)),
    "manifest-no-shards": (
        "manifest.json",
        edit_manifest(lambda m: m.pop("shards")),
        REFUSE,
        ("'shards' is missing",),
    ),
    "manifest-no-meta": (
        "manifest.json",
        edit_manifest(lambda m: m.pop("meta")),
        REFUSE,
        ("'meta' is missing",),
    ),
    "manifest-no-config": (
        "manifest.json",
        edit_manifest(lambda m: m.pop("config")),
        REFUSE,
        ("'config' is missing",),
    ),
    "manifest-shards-a-list": (
        "manifest.json",
        edit_manifest(lambda m: m.update(shards=list(m["shards"].values()))),
        REFUSE,
        ("'shards' is a list instead of an object",),
    ),
    "manifest-hash-a-number": (
        "manifest.json",
        edit_manifest(lambda m: m.update(config_hash=1)),
        REFUSE,
        ("'config_hash' is a number",),
    ),
    "manifest-newer-format": (
        "manifest.json",
        edit_manifest(lambda m: m.update(format_version=99)),
        REFUSE,
        ("format_version 99",),
    ),
    "entry-no-sha256": ("manifest.json", first_entry(lambda e: e.pop("sha256")), RECOVER, ()),
    "entry-sha256-a-number": (
        "manifest.json",
        first_entry(lambda e: e.update(sha256=0)),
        RECOVER,
        (),
    ),
    "entry-a-string": (
        "manifest.json",
        edit_manifest(lambda m: m["shards"].update(s00000="done")),
        RECOVER,
        (),
    ),
    "entry-file-outside": (
        "manifest.json",
        first_entry(lambda e: e.update(file="../../etc/passwd")),
        RECOVER,
        (),
    ),
    "stats-sha-missing": (
        "manifest.json",
        edit_manifest(lambda m: m["meta"].pop("stats_sha256")),
        REFUSE,
        ("stats_sha256", "<missing>"),
    ),
    **{
        f"{shard}-{how.__name__}": (f"shards/{shard}.parquet", how, RECOVER, ())
        for shard in ("s00000", "s00001")
        for how in (truncate, garbage, delete)
    },
    "shards-folder-deleted": ("shards", shutil.rmtree, RECOVER, ()),
    **{
        f"{name.split('.')[0]}-{how.__name__}": (name, how, RECOVER, ())
        for name in ("stats.safetensors", "pool.pt")
        for how in (truncate, garbage, delete)
    },
    "lock-garbage": (".lock", garbage, RECOVER, ()),
    "lock-deleted": (".lock", delete, RECOVER, ()),
    "stray-temp-file": (
        "shards/.s00000.parquet.x1y2z3w4.tmp",
        lambda p: p.write_bytes(GARBAGE),
        RECOVER,
        (),
    ),
}


def assert_recovered(run_dir: Path, reference: Path) -> None:
    """Complete, every recorded file intact, rows identical to the uninterrupted run's."""
    manifest = load_manifest(run_dir)
    assert manifest["complete"] and manifest["meta"] == load_manifest(reference)["meta"]
    pd.testing.assert_frame_equal(load_results(run_dir), load_results(reference))
    for name in ("stats.safetensors", "pool.pt"):
        assert (run_dir / name).read_bytes() == (reference / name).read_bytes()


def resume(config_file: Path, run_dir: Path) -> tuple[int, str]:
    return cli("run", str(config_file), "--out", str(run_dir), "--resume", "-q")


@pytest.mark.parametrize("case", list(RUN_DIR_CASES))
def test_damaged_run_dir(case: str, reference: Path, config_file: Path, tmp_path: Path) -> None:
    name, damage, expected, named = RUN_DIR_CASES[case]
    code = 0
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    damage(run_dir / name)
    # report reads the manifest and the shards: it works, or says which file and what to do
    if name == "manifest.json" or name.startswith("shards/"):
        code, out = cli("report", str(run_dir), "--out", str(tmp_path / "rep"), "--format", "")
    if code != 0:
        assert code == 1 and out.startswith("Error: "), out
        assert ("manifest.json" in out and "--out" in out) or (
            "shard" in out and "rerun the run with --resume" in out
        ), out
    code, out = resume(config_file, run_dir)
    if expected == RECOVER:
        assert code == 0, out
        assert_recovered(run_dir, reference)
    else:
        assert code == 1 and out.startswith("Error: "), out
        assert str(run_dir / "manifest.json") in out or str(run_dir) in out
        assert "another --out" in out and all(n in out for n in named), out
        assert not (run_dir / "report.html").exists()


# (what is damaged, how, whether the run dir's own statistics are removed first so the cache
# must serve them)
def _stats_cache(root: Path) -> Path:
    (folder,) = (root / "stats").iterdir()
    return folder


def _token_caches(root: Path) -> list[Path]:
    """Both token cache entries: the measured rows and the statistics' fit sample."""
    paths = sorted((root / "tokens").glob("*.safetensors"))
    assert len(paths) == 2, paths
    return paths


def _each(how: Damage) -> Callable[[list[Path]], None]:
    def damage(paths: list[Path]) -> None:
        for path in paths:
            how(path)

    damage.__name__ = how.__name__
    return damage


CACHE_CASES: dict[str, tuple[Callable[[Path], Any], Callable[[Any], Any]]] = {
    **{
        f"tokens-{how.__name__}": (_token_caches, _each(how)) for how in (truncate, garbage, delete)
    },
    **{
        f"stats-cache-{name.split('.')[0]}-{how.__name__}": (
            lambda root, name=name: _stats_cache(root) / name,
            how,
        )
        for name in ("stats.safetensors", "pool.pt")
        for how in (truncate, garbage, delete)
    },
    "stats-cache-folder-deleted": (_stats_cache, shutil.rmtree),
    "fingerprint-memo-garbage": (
        lambda root: next((root / "fingerprints").iterdir()),
        garbage,
    ),
}


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_damaged_cache(
    case: str, reference: Path, config_file: Path, cache: Path, tmp_path: Path
) -> None:
    """A damaged cache entry is skipped and rebuilt: the resumed run (its own statistics removed,
    so the cache has to serve them, or a refit) comes out identical."""
    where, damage = CACHE_CASES[case]
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    for name in ("stats.safetensors", "pool.pt", "shards/s00001.parquet"):
        (run_dir / name).unlink()
    damage(where(cache))
    code, out = resume(config_file, run_dir)
    assert code == 0, out
    assert_recovered(run_dir, reference)
