"""The run directory: round trip, checksums, resume, lock, disk-full and permission errors."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import unwritable

from perturb_lens.results import (
    ChecksumError,
    ConfigMismatchError,
    ResultStore,
    RunLockedError,
    atomic_write_json,
    config_hash,
    diff_configs,
    load_manifest,
    load_results,
)

CONFIG = {"model": {"name": "gpt2", "hook": "blocks.6.hook_resid_pre"}, "lengths": [1, 3, 5]}
META = {"package": "0.1.0", "torch": "2.5", "frame": "centered", "scope": "all-positions"}


def shard_frame(seed: int, directions=("isotropic", "ablation")) -> pd.DataFrame:
    """A small results shard with the engine's column types."""
    rng = np.random.default_rng(seed)
    n = 24
    return pd.DataFrame(
        {
            "seq": np.arange(n, dtype=np.int32) // 6 + 4 * seed,
            "pos": np.arange(n, dtype=np.int16) % 6,
            "direction": pd.Categorical(rng.choice(directions, n), categories=list(directions)),
            "length": np.float32(rng.choice([1.0, 3.0, 5.0], n)),
            "kl": rng.random(n, dtype=np.float32),
            "l2": rng.random(n, dtype=np.float32),
            "top1_changed": rng.random(n) > 0.5,
        }
    )


def open_store(run_dir: Path, config: dict = CONFIG, *, resume: bool = False) -> ResultStore:
    store = ResultStore(run_dir)
    store.create(config, config_hash(config), META, resume=resume)
    return store


def tmp_files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


def test_round_trip_is_exact(tmp_path: Path) -> None:
    a, b = shard_frame(0), shard_frame(1)
    with open_store(tmp_path / "run") as store:
        store.write_shard("s00001", b, info={"seqs": [4, 8]})
        store.write_shard("s00000", pa.Table.from_pandas(a, preserve_index=False))
        store.finish({"kl_mean": 0.5})

    df = load_results(tmp_path / "run")
    pd.testing.assert_frame_equal(df, pd.concat([a, b], ignore_index=True))  # shard-id order
    assert isinstance(df["direction"].dtype, pd.CategoricalDtype)

    m = load_manifest(tmp_path / "run")
    assert m["config"] == CONFIG and m["config_hash"] == config_hash(CONFIG) and m["meta"] == META
    assert m["complete"] is True and m["summary"] == {"kl_mean": 0.5} and "created" in m
    assert m["shards"]["s00001"]["rows"] == len(b)
    assert m["shards"]["s00001"]["info"] == {"seqs": [4, 8]}
    assert m["shards"]["s00000"]["file"] == "shards/s00000.parquet"
    assert tmp_files(tmp_path / "run") == []


def test_load_results_columns_filters_and_differing_categories(tmp_path: Path) -> None:
    a, b = shard_frame(0, ("isotropic", "ablation")), shard_frame(1, ("real-mixture",))
    with open_store(tmp_path) as store:
        store.write_shard("s0", a)
        plain = pa.Table.from_pandas(b.astype({"direction": str}), preserve_index=False)
        store.write_shard("s1", plain)  # plain strings: stored as a dictionary all the same
    df = load_results(tmp_path)
    assert set(df["direction"].cat.categories) == {"isotropic", "ablation", "real-mixture"}
    assert df["direction"].astype(str).tolist() == [*a.direction.astype(str), *b.direction]

    sub = load_results(tmp_path, columns=["direction", "kl"], filters=[("length", ">", 2.0)])
    assert list(sub.columns) == ["direction", "kl"]
    both = pd.concat([a, b], ignore_index=True)
    np.testing.assert_array_equal(sub["kl"], both.loc[both.length > 2, "kl"])


def test_done_shards_excludes_damaged_and_missing(tmp_path: Path, caplog) -> None:
    with open_store(tmp_path) as store:
        for i in range(3):
            store.write_shard(f"s{i}", shard_frame(i))
        assert store.done_shards() == {"s0", "s1", "s2"}

        path = tmp_path / "shards" / "s1.parquet"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        (tmp_path / "shards" / "s2.parquet").unlink()
        assert store.done_shards() == {"s0"}
    assert "s1" in caplog.text and "s2" in caplog.text

    with pytest.raises(ChecksumError, match="--resume"):
        load_results(tmp_path)


def test_existing_run_refused_without_resume(tmp_path: Path) -> None:
    open_store(tmp_path).close()
    with pytest.raises(FileExistsError, match="pass --resume to continue or choose another --out"):
        open_store(tmp_path)


def test_resume_same_config_keeps_shards(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        store.write_shard("s0", shard_frame(0))
        created = store.manifest["created"]
    killed = tmp_path / "shards" / ".s1.parquet.abc12345.tmp"  # atomic_write's temp file name
    killed.write_bytes(b"half a shard")  # a killed writer
    config = json.loads(json.dumps(CONFIG))  # equal, not identical
    with open_store(tmp_path, config, resume=True) as store:
        assert store.done_shards() == {"s0"}
        assert store.manifest["created"] == created
        assert tmp_files(tmp_path) == []
        store.write_shard("s1", shard_frame(1))
    assert set(load_manifest(tmp_path)["shards"]) == {"s0", "s1"}


def test_resume_with_other_config_names_the_keys(tmp_path: Path) -> None:
    open_store(tmp_path).close()
    other = {"model": {"name": "gpt2", "hook": "blocks.2.hook_resid_pre"}, "lengths": [1, 3]}
    with pytest.raises(ConfigMismatchError) as err:
        open_store(tmp_path, other, resume=True)
    msg = str(err.value)
    assert "model.hook: 'blocks.6.hook_resid_pre' -> 'blocks.2.hook_resid_pre'" in msg
    assert "lengths: [1, 3, 5] -> [1, 3]" in msg
    assert "model.name" not in msg
    open_store(tmp_path, resume=True).close()  # the refusal released the lock


def test_lock_refuses_a_second_writer(tmp_path: Path) -> None:
    first = open_store(tmp_path)
    with pytest.raises(RunLockedError, match=f"another run \\(pid {os.getpid()}\\) is writing to"):
        open_store(tmp_path, resume=True)
    first.close()
    open_store(tmp_path, resume=True).close()


def test_lock_holds_across_processes(tmp_path: Path) -> None:
    holder = (
        "import sys; from perturb_lens.results import ResultStore\n"
        f"s = ResultStore({str(tmp_path)!r}); s.create({{}}, 'h', {{}}, resume=False)\n"
        "print('locked', flush=True); sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
            ResultStore(tmp_path).create({}, "h", {}, resume=True)
    finally:
        proc.communicate(timeout=30)
    with ResultStore(tmp_path) as store:  # released when the holder exited
        store.create({}, "h", {}, resume=True)


def test_disk_full_during_shard_write_changes_nothing(tmp_path: Path, monkeypatch) -> None:
    store = open_store(tmp_path)
    store.write_shard("s0", shard_frame(0))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def full_disk(table, where, **kwargs):
        where.write(b"PAR1 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full_disk)
    with pytest.raises(OSError, match="disk full") as err:
        store.write_shard("s0", shard_frame(5))  # rewriting an existing shard
    assert err.value.errno == errno.ENOSPC
    with pytest.raises(OSError, match="disk full"):
        store.write_shard("s1", shard_frame(1))  # a new one
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before and tmp_files(tmp_path) == []
    assert store.done_shards() == {"s0"}
    store.close()


def test_disk_full_during_manifest_write_keeps_previous_manifest(tmp_path, monkeypatch) -> None:
    store = open_store(tmp_path)
    store.write_shard("s0", shard_frame(0))
    manifest = (tmp_path / "manifest.json").read_bytes()
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "manifest.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        store.write_shard("s1", shard_frame(1))
    assert (tmp_path / "manifest.json").read_bytes() == manifest
    assert tmp_files(tmp_path) == []
    assert store.done_shards() == {"s0"}  # s1's file exists but is not recorded: recomputed
    assert store.manifest == json.loads(manifest)
    store.close()


def test_unwritable_location_says_what_to_do(tmp_path: Path, monkeypatch) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    with unwritable(parent, monkeypatch), pytest.raises(PermissionError, match="--out") as err:
        open_store(parent / "run")
    assert str(parent / "run") in str(err.value)


def test_write_requires_create_and_a_safe_shard_id(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="create"):
        ResultStore(tmp_path).write_shard("s0", shard_frame(0))
    with open_store(tmp_path) as store, pytest.raises(ValueError, match="shard id"):
        store.write_shard("../evil", shard_frame(0))


def test_config_hash_and_diff() -> None:
    a = {"b": 1, "a": {"x": (1, 2), "y": "z"}}
    b = {"a": {"y": "z", "x": [1, 2]}, "b": 1}
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 16 and int(config_hash(a), 16) >= 0
    assert config_hash(a) != config_hash({**a, "b": 2})
    diffs = diff_configs(
        {"a": {"x": 1, "l": [{"k": 1}, 2]}, "gone": 1},
        {"a": {"x": 2, "l": [{"k": 3}, 2]}, "new": 0},
    )
    assert [(k, x, y) for k, x, y in diffs if k.startswith("a.")] == [
        ("a.l.0.k", 1, 3),
        ("a.x", 1, 2),
    ]
    assert {k for k, _, _ in diffs} == {"a.l.0.k", "a.x", "gone", "new"}
    assert repr(dict((k, y) for k, _, y in diffs)["gone"]) == "<missing>"


def test_atomic_write_json_failure_leaves_old_file(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    atomic_write_json(path, {"a": Path("/p/q"), "n": np.float32(0.5)})
    assert json.loads(path.read_text()) == {"a": "/p/q", "n": 0.5}
    with pytest.raises(TypeError, match="cannot store"):
        atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": "/p/q", "n": 0.5}
    assert tmp_files(tmp_path) == []
