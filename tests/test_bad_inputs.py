"""The bad-input catalogue: each bad input fails with an error that says what to do, and leaves
no corrupt output (no run directory at all, or one whose manifest matches every shard file).

Entries: malformed YAML/TOML, unknown config key, unknown model, unknown hook, unknown direction,
SAE width or hook mismatch, empty or too-short dataset, sequence longer than the context, empty or
negative length grid, NaN/inf activations, unwritable output directory, disk full during a write,
resume with another config, two runs writing to one directory; and (issue 16 items 4-6, at the
end) unknown direction on the command line, unexpected errors, full disk while saving statistics,
damaged SAE files, an unavailable device, report/compare on runs without shards or with other
length grids, run names outside runs/, an empty --out, failed starts in existing folders, a read
hook before the perturbed hook, the umask, non-UTF-8/binary/non-parquet text, bad seeds, length
syntax, duplicates and cap, too little data, unwritable report/resume folders.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import unwritable
from typer.testing import CliRunner

from perturb_lens.cli.app import app
from perturb_lens.common.hooks import UnknownHookError
from perturb_lens.config.schema import ConfigError
from perturb_lens.directions.base import UnknownDirectionError
from perturb_lens.models.load import ModelLoadError, load_model
from perturb_lens.results import (
    ConfigMismatchError,
    InputsChangedError,
    ResultStore,
    RunLockedError,
    file_sha256,
    load_manifest,
    load_results,
)
from perturb_lens.workflows.experiment import run_experiment


@pytest.fixture(scope="module")
def config(shard_config: dict) -> dict:
    """A tiny valid run: 4 sequences of 16 tokens in 2 shards, one direction, two lengths."""
    return with_(shard_config, data={"n_seqs": 4}, lengths=[0, 4], directions=["isotropic"])


@pytest.fixture(scope="module")
def reference(config: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run of ``config``."""
    return run_experiment(config, tmp_path_factory.mktemp("ref") / "run", progress=False)


def with_(config: dict, **over) -> dict:
    """A copy of ``config`` with top-level keys replaced (``data`` is merged)."""
    out = {**config, **over}
    if "data" in over:
        out["data"] = {**config["data"], **over["data"]}
    return out


def assert_no_corrupt_output(run_dir: Path) -> None:
    """Nothing at all, or a manifest that lists exactly the shard files, each matching its sha256
    (and no temporary files)."""
    if not run_dir.exists():
        return
    assert [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")] == []
    files = {p.relative_to(run_dir).as_posix() for p in run_dir.glob("shards/*.parquet")}
    if not (run_dir / "manifest.json").exists():
        assert files == set()
        return
    shards = load_manifest(run_dir)["shards"]
    assert files == {entry["file"] for entry in shards.values()}
    for entry in shards.values():
        assert file_sha256(run_dir / entry["file"]) == entry["sha256"]


def cli_error(*args: str) -> str:
    """Run the CLI expecting a clean failure (exit 1, a message, no traceback); its output."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and "Traceback" not in result.output
    return result.output


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "kind"),
    [
        ("cfg.yaml", "hook: [blocks.1\ndata: {n_seqs: 4\n", "YAML"),
        ("cfg.toml", "hook = [x\n", "TOML"),
    ],
)
def test_malformed_yaml_or_toml(tmp_path: Path, name: str, text: str, kind: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    out = cli_error("run", str(path), "--out", str(tmp_path / "run"))
    assert "Malformed config" in out and f"Fix the {kind} syntax at the line shown" in out
    assert "line" in out  # the parser's position
    assert not (tmp_path / "run").exists()


def test_unknown_config_key(tmp_path: Path, config: dict) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(with_(config, data={"n_seq": 4})))
    out = cli_error("run", str(path), "--out", str(tmp_path / "run"))
    assert "unknown key 'data.n_seq'; valid keys here:" in out and "n_seqs" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("lengths", "advice"),
    [([], "give at least one length"), ([0, -1, 4], "Use lengths >= 0"), ("5:1:-1", "positive")],
    ids=["empty", "negative", "negative-step"],
)
def test_lengths_grid_empty_or_negative(
    tmp_path: Path, config: dict, lengths: list | str, advice: str
) -> None:
    with pytest.raises(ConfigError, match="lengths") as err:
        run_experiment(with_(config, lengths=lengths), tmp_path / "run", progress=False)
    assert advice in str(err.value)
    assert not (tmp_path / "run").exists()


# -- model, hook, direction --------------------------------------------------------------------


def test_unknown_model(tmp_path: Path, config: dict) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="neither a local folder or file") as err:
        run_experiment(with_(config, model=str(missing)), tmp_path / "run", progress=False)
    assert "load_model('smollm2-135m')" in str(err.value)  # what works without the hub
    assert not (tmp_path / "run").exists()  # the folder opened for the run is removed again


def test_unknown_hook(tmp_path: Path, config: dict) -> None:
    with pytest.raises(UnknownHookError, match=r"Valid hook names are blocks\.\{0\.\.3\}"):
        run_experiment(
            with_(config, hook="blocks.7.hook_resid_pre"), tmp_path / "run", progress=False
        )
    assert not (tmp_path / "run").exists()


def test_unknown_direction(tmp_path: Path, config: dict) -> None:
    with pytest.raises(UnknownDirectionError, match="registered directions: ablation") as err:
        run_experiment(with_(config, directions=["isotropik"]), tmp_path / "run", progress=False)
    assert "register_direction" in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("d_in", "hook", "problem"),
    [
        (32, "blocks.1.hook_resid_pre", "its width d_in=32 differs from d_model=64"),
        (64, "blocks.2.hook_resid_pre", "it was trained at 'blocks.2.hook_resid_pre', not at"),
    ],
    ids=["width", "hook"],
)
def test_sae_width_or_hook_mismatch(
    tmp_path: Path, config: dict, d_in: int, hook: str, problem: str
) -> None:
    from perturb_lens.saes import SAE, SAEConfig, SAEMismatchError

    sae = SAE(SAEConfig(d_in=d_in, d_sae=128, hook=hook, frame="centered", model="gpt2"))
    folder = sae.save(tmp_path / "sae")
    with pytest.raises(SAEMismatchError, match="does not fit this experiment") as err:
        run_experiment(with_(config, sae=str(folder)), tmp_path / "run", progress=False)
    assert problem in str(err.value)
    assert "Use an SAE trained at blocks.1.hook_resid_pre of this model" in str(err.value)
    assert not (tmp_path / "run").exists()


# -- data --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "Too short."], ids=["empty", "too-short"])
def test_empty_or_too_short_dataset(tmp_path: Path, config: dict, text: str) -> None:
    source = tmp_path / "docs.txt"
    source.write_text(text)
    with pytest.raises(ValueError, match="give more text or lower seq_len"):
        run_experiment(
            with_(config, data={"source": str(source)}), tmp_path / "run", progress=False
        )
    assert not (tmp_path / "run").exists()


def test_sequence_longer_than_context(tmp_path: Path, config: dict) -> None:
    with pytest.raises(ValueError, match="exceeds the model's context of 256 tokens") as err:
        run_experiment(with_(config, data={"seq_len": 300}), tmp_path / "run", progress=False)
    assert "set data.seq_len to at most 256" in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["stats", "shard"])
def test_nan_activation_reported_with_sequence_and_position(
    tmp_path: Path, config: dict, gpt2_dir: Path, where: str
) -> None:
    model = load_model(str(gpt2_dir), device="cpu")
    bad_token = 4321
    model.w_te[bad_token] = float("nan")  # this token's embedding: NaN at the hook where it sits
    tokens = torch.randint(0, 4000, (4, 16), generator=torch.Generator().manual_seed(7))
    tokens[:, 0] = model.bos_token_id
    tokens[3, 7] = bad_token
    # stats fitted on all sequences meet the NaN first; fitted on 2, the shard of sequence 3 does
    # at the embedding: past an attention layer, 0 x NaN spreads it to every position
    cfg = with_(
        config,
        hook="blocks.0.hook_resid_pre",
        stats={"pool_size": 64, "n_seqs": None if where == "stats" else 2},
    )
    run_dir = tmp_path / "run"
    with pytest.raises((ValueError, FloatingPointError)) as err:
        run_experiment(cfg, run_dir, model=model, tokens=tokens, progress=False)
    msg = str(err.value)
    assert "Non-finite activation" in msg and "NaN" in msg
    assert "sequence 3" in msg and "position 7" in msg
    assert "dtype" in msg and "input tokens" in msg  # what to check
    assert_no_corrupt_output(run_dir)
    if where == "shard":  # the first shard is kept; the run is not marked complete
        manifest = load_manifest(run_dir)
        assert set(manifest["shards"]) == {"s00000"} and not manifest["complete"]


# -- the run directory -------------------------------------------------------------------------


def test_output_dir_not_writable(tmp_path: Path, config: dict, monkeypatch) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    with unwritable(parent, monkeypatch):
        # refused before any work: the (unknown) model is never loaded
        with pytest.raises(PermissionError, match="choose another --out") as err:
            run_experiment(with_(config, model="no-such-model"), parent / "run", progress=False)
        assert str(parent / "run") in str(err.value)
    assert list(parent.iterdir()) == []


def test_disk_full_during_a_write(
    tmp_path: Path, config: dict, reference: Path, monkeypatch
) -> None:
    real_write = pq.write_table
    calls = []

    def fill_up(table, where, **kwargs):
        calls.append("length" in table.column_names)  # a shard's rows (not the token text)
        if sum(calls) == 2 and calls[-1]:  # the second shard: half written, then the disk is full
            where.write(b"PAR1 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", fill_up)
    run_dir = tmp_path / "run"
    with pytest.raises(OSError, match="disk full") as err:
        run_experiment(config, run_dir, progress=False)
    assert err.value.errno == errno.ENOSPC and "rerun with --resume" in str(err.value)
    assert_no_corrupt_output(run_dir)
    assert set(load_manifest(run_dir)["shards"]) == {"s00000"}
    monkeypatch.setattr(pq, "write_table", real_write)  # space freed
    run_experiment(config, run_dir, resume=True, progress=False)
    pd.testing.assert_frame_equal(load_results(run_dir), load_results(reference))


def test_resume_with_different_config(tmp_path: Path, config: dict, reference: Path) -> None:
    before = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    other = with_(config, hook="blocks.2.hook_resid_pre", lengths=[0, 8])
    with pytest.raises(ConfigMismatchError, match="cannot resume") as err:
        run_experiment(other, reference, resume=True, progress=False)
    msg = str(err.value)
    assert "hook: 'blocks.1.hook_resid_pre' -> 'blocks.2.hook_resid_pre'" in msg
    assert "lengths.1: 4.0 -> 8.0" in msg and "data" not in msg
    assert "Resume with the original config, or choose another --out" in msg
    assert {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()} == before


def test_two_runs_writing_to_one_directory(tmp_path: Path, config: dict) -> None:
    run_dir = tmp_path / "run"
    holder = ResultStore(run_dir).open()  # another run holds the directory
    try:
        with pytest.raises(RunLockedError, match=f"another run \\(pid {os.getpid()}\\)") as err:
            run_experiment(config, run_dir, progress=False)
        assert "wait for it to finish (or stop it), or choose another --out" in str(err.value)
        assert not (run_dir / "manifest.json").exists()
    finally:
        holder.close()
    assert_no_corrupt_output(run_dir)


# --- issue 16 items 4-6 ---
# Each case through the CLI as a user types it: exit code 1, no traceback, a message naming the
# thing and the fix, and nothing left behind that the README does not promise.


def cli_fails(*args: str, cwd: Path | None = None, monkeypatch=None) -> str:
    """Run ``perturb-lens ARGS`` expecting a clean refusal; its output (stdout + stderr)."""
    if cwd is not None:
        monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # handled, not a crash
    assert "Traceback" not in result.output and "Error: " in result.output, result.output
    return result.output


def config_file(folder: Path, config: dict, **over) -> str:
    """``config`` (with ``over``) as a YAML file in ``folder``; its path."""
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(with_(config, **over)))
    return str(path)


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path below ``folder`` with its bytes (None for folders)."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


# -- item 4: no raw traceback ------------------------------------------------------------------


def test_unknown_direction_on_the_command_line(tmp_path: Path, config: dict) -> None:
    out = cli_fails(
        "run",
        config_file(tmp_path, config),
        "directions=[isotropic,foo-dir]",
        "-o",
        f"{tmp_path}/r",
    )
    assert "Unknown direction 'foo-dir'" in out and "register_direction" in out
    assert not (tmp_path / "r").exists()


def test_unexpected_error_is_one_line_and_verbose_shows_the_traceback(
    tmp_path: Path, config: dict, monkeypatch
) -> None:
    import perturb_lens.workflows.experiment as run_module

    def broken(*args, **kwargs):
        raise KeyError("shards")

    monkeypatch.setattr(run_module, "run_experiment", broken)
    out = cli_fails("run", config_file(tmp_path, config))
    assert "Error: unexpected KeyError: 'shards'" in out and "perturb-lens --verbose" in out
    result = CliRunner().invoke(app, ["--verbose", "run", config_file(tmp_path, config)])
    assert result.exit_code == 1 and "Traceback" in result.output  # for the bug report


def test_disk_full_while_writing_statistics(tmp_path: Path, config: dict, monkeypatch) -> None:
    import perturb_lens.results.store as store

    monkeypatch.setenv("PERTURB_LENS_CACHE", str(tmp_path / "cache"))  # statistics not cached
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if "stats.safetensors" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(store.os, "fsync", fsync)
    out = cli_fails("run", config_file(tmp_path, config), "-o", str(tmp_path / "r"))
    assert "disk full while writing" in out and "stats.safetensors" in out
    assert "free some space" in out
    assert not (tmp_path / "r").exists()
    stats_cache = tmp_path / "cache" / "stats"
    assert [p.name for p in stats_cache.rglob("*") if p.is_file()] == []  # no half-written file


@pytest.fixture
def garbage_sae(tmp_path: Path) -> Path:
    """A SAELens folder whose weights file is random bytes."""
    from perturb_lens.saes import SAE, SAEConfig

    sae = SAE(SAEConfig(d_in=64, d_sae=128, hook="blocks.1.hook_resid_pre", frame="centered"))
    folder = sae.save(tmp_path / "sae")
    (folder / "sae_weights.safetensors").write_bytes(os.urandom(300))
    return folder


def test_sae_with_garbage_weights(
    tmp_path: Path, config: dict, garbage_sae: Path, gpt2_dir: Path, text_file: Path
) -> None:
    weights = garbage_sae / "sae_weights.safetensors"
    out = cli_fails(
        "run", config_file(tmp_path, config, sae=str(garbage_sae)), "-o", f"{tmp_path}/r"
    )
    assert f"{weights} is not a readable safetensors file" in out
    assert "save or download the SAE again" in out
    assert not (tmp_path / "r").exists()
    out = cli_fails(
        "sae", "stats", str(garbage_sae), "--model", str(gpt2_dir), "--data", str(text_file),
        "--n-seqs", "2", "--seq-len", "16", "-q",
    )  # fmt: skip
    assert f"{weights} is not a readable safetensors file" in out


def test_e2e_checkpoint_with_garbage_bytes(tmp_path: Path, config: dict) -> None:
    ckpt = tmp_path / "samples_100.pt"
    ckpt.write_bytes(b"PK\x03\x04 not a checkpoint" + os.urandom(64))
    out = cli_fails("run", config_file(tmp_path, config, sae=str(ckpt)), "-o", f"{tmp_path}/r")
    assert f"{ckpt} is not a readable torch checkpoint" in out and "another checkpoint" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_on_a_cpu_only_torch(tmp_path: Path, config: dict) -> None:
    out = cli_fails("run", config_file(tmp_path, config), "device=cuda", "-o", f"{tmp_path}/r")
    assert "device 'cuda' is not available" in out and "set device=cpu" in out
    assert not (tmp_path / "r").exists()


def without_shards(run: Path, folder: Path) -> Path:
    """A copy of ``run`` whose manifest lists no shard (a run killed before its first)."""
    import shutil

    copy = folder / "empty-run"
    shutil.copytree(run, copy)
    manifest = load_manifest(copy)
    manifest["shards"], manifest["complete"] = {}, False
    (copy / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(copy / "shards")
    return copy


def test_report_and_compare_on_a_run_without_shards(tmp_path: Path, reference: Path) -> None:
    empty = without_shards(reference, tmp_path)
    before = tree(empty)
    out = cli_fails("report", str(empty))
    assert f"{empty} has no finished shard yet" in out and f"--out {empty} --resume" in out
    out = cli_fails("compare", str(reference), str(empty), "--out", str(tmp_path / "cmp"))
    assert "has no finished shard yet" in out
    assert tree(empty) == before and not (tmp_path / "cmp").exists()


def test_compare_runs_with_different_length_grids(
    tmp_path: Path, config: dict, reference: Path
) -> None:
    other = run_experiment(with_(config, lengths=[0, 3, 9]), tmp_path / "other", progress=False)
    result = CliRunner().invoke(
        app, ["compare", str(other), str(reference), "-o", str(tmp_path / "cmp"), "--format", "svg"]
    )
    assert result.exit_code == 0, result.output
    bars = pd.read_csv(tmp_path / "cmp" / "figures" / "compare_kl_bars.csv")
    # figure 7-8 lengths of the first run (grid 0, 3, 9): 20/91, 40/91 and 61/91 of 9, nearest
    # 3, 3, 9 -> [3, 9]; the second run (grid 0, 4) has 4 nearest to both: one bar, at 3
    second = bars[bars["run"] == bars["run"].iloc[-1]]
    assert set(second["length"]) == {4.0} and set(second["requested"]) == {3.0}


# -- item 5: writes where it should not ----------------------------------------------------------


@pytest.mark.parametrize("name", ["../../x", "/tmp/x/evil", "a/b", ".hidden", ""])
def test_run_name_must_be_a_plain_folder_name(
    tmp_path: Path, config: dict, monkeypatch, name: str
) -> None:
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    cfg = config_file(tmp_path, config)
    out = cli_fails("run", cfg, f"name={name!r}", cwd=cwd, monkeypatch=monkeypatch)
    assert "must be a plain folder name" in out and "pass --out DIR" in out
    assert tree(tmp_path / "a") == {"b": None} and not Path("/tmp/x/evil").exists()


@pytest.mark.parametrize("command", ["run", "report"])
def test_empty_out_is_refused(
    tmp_path: Path, config: dict, reference: Path, monkeypatch, command: str
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("the user's own file")
    target = config_file(tmp_path, config) if command == "run" else str(reference)
    out = cli_fails(command, target, "--out", "", cwd=cwd, monkeypatch=monkeypatch)
    assert "--out is empty, which would write into the current folder" in out
    assert tree(cwd) == {"notes.txt": b"the user's own file"}


def test_failed_start_leaves_an_existing_folder_as_it_was(tmp_path: Path, config: dict) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()  # empty: a folder holding other files is refused outright (issue 23 item 4)
    out = cli_fails(
        "run", config_file(tmp_path, config), "hook=blocks.9.hook_resid_pre", "-o", str(folder)
    )
    assert "Unknown hook 'blocks.9.hook_resid_pre'" in out
    assert tree(folder) == {}  # no .lock, no shards/


def test_read_hook_before_the_perturbed_hook_is_refused_before_any_work(
    tmp_path: Path, config: dict
) -> None:
    out = cli_fails(
        "run", config_file(tmp_path, config), "read=blocks.0.hook_resid_post", "-o", f"{tmp_path}/r"
    )
    assert "read 'blocks.0.hook_resid_post' comes before hook 'blocks.1.hook_resid_pre'" in out
    assert "set read to a hook at or after" in out
    assert not (tmp_path / "r").exists()  # no manifest, no statistics


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_respect_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    from perturb_lens.data.text import save_tokens
    from perturb_lens.results import atomic_write

    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
        save_tokens(torch.zeros(1, 2, dtype=torch.long), tmp_path / "t.safetensors")
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {
        "a.bin": mode,
        "t.safetensors": mode,
    }


def test_run_files_respect_the_umask(tmp_path: Path, config: dict) -> None:
    old = os.umask(0o022)
    try:
        result = CliRunner().invoke(
            app, ["run", config_file(tmp_path, config), "-q", "-o", f"{tmp_path}/r"]
        )
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "r").rglob("*") if p.is_file()}
    assert {"manifest.json", "stats.safetensors", "pool.pt", "s00000.parquet"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes


# -- item 6: messages that name the file and the fix ---------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "problem"),
    [
        ("latin1.txt", "caf\xe9 au lait\n".encode("latin-1"), "not UTF-8 text"),
        ("latin1.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"), "not UTF-8 text"),
        ("binary.txt", b"\x00\x01\x02ELF\x00\n" * 20, "binary, not text"),
    ],
)
def test_text_source_that_is_not_utf8_text(
    tmp_path: Path, config: dict, name: str, data: bytes, problem: str
) -> None:
    source = tmp_path / name
    source.write_bytes(data)
    cfg = config_file(tmp_path, config, data={"source": str(source)})
    out = cli_fails("run", cfg, "-o", f"{tmp_path}/r")
    assert f"{source}, line 1: " in out and problem in out and "data.source" in out
    assert not (tmp_path / "r").exists()


def test_parquet_column_not_strings_or_file_not_parquet(tmp_path: Path, config: dict) -> None:
    import pyarrow as pa

    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3], "body": ["a", "b", "c"]}), numbers)
    out = cli_fails(
        "run", config_file(tmp_path, config, data={"source": str(numbers)}), "-o", f"{tmp_path}/r"
    )
    assert f"{numbers}: column 'text' holds int64, not strings" in out
    assert "set data.text_field" in out and "'body'" in out
    fake = tmp_path / "fake.parquet"
    fake.write_text("just some text, not parquet\n")
    out = cli_fails(
        "run", config_file(tmp_path, config, data={"source": str(fake)}), "-o", f"{tmp_path}/r"
    )
    assert f"{fake} is not a readable Parquet file" in out
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("text", "problem"),
    [("{not json", "is not valid JSON"), ("[1, 2]", "must hold a JSON object"), ("{}", "lacks")],
)
def test_sae_cfg_json_that_is_not_a_config(
    tmp_path: Path, config: dict, text: str, problem: str
) -> None:
    from perturb_lens.saes import SAE, SAEConfig

    sae = SAE(SAEConfig(d_in=64, d_sae=128, hook="blocks.1.hook_resid_pre", frame="centered"))
    folder = sae.save(tmp_path / "sae")
    (folder / "cfg.json").write_text(text)
    out = cli_fails("run", config_file(tmp_path, config, sae=str(folder)), "-o", f"{tmp_path}/r")
    assert f"{folder / 'cfg.json'} " in out and problem in out
    assert "point to another SAE folder" in out
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (f"seed={2**64}", "seed: Input should be less than or equal to 9223372036854775807"),
        ("seed=-1", "seed: Input should be greater than or equal to 0"),
        ("lengths=a:b:c", "Length range 'a:b:c' must be three numbers start:stop:step"),
        ("lengths=[0,4,4]", "Lengths [4.0] appear more than once; each length is measured once"),
        ("lengths=0:1e6:1", "has 1,000,001 lengths, more than the cap of 1,000: use a larger step"),
        (f"lengths={list(range(1001))}", "1,001 lengths, more than the cap of 1,000"),
        ("lengths=0:inf:1", "must use finite numbers"),
        ("data=[", "Override 'data=[': the value is not valid YAML"),
    ],
    ids=["seed-64-bit", "seed-negative", "a:b:c", "duplicates", "absurd-range", "long-list",
         "inf-range", "bad-yaml"],
)  # fmt: skip
def test_bad_values_on_the_command_line(
    tmp_path: Path, config: dict, override: str, message: str
) -> None:
    out = cli_fails("run", config_file(tmp_path, config), override, "-o", f"{tmp_path}/r")
    assert message in out
    assert not (tmp_path / "r").exists()


def test_range_lengths_are_not_read_as_base_60_numbers() -> None:
    from perturb_lens.config.lengths import resolve_lengths
    from perturb_lens.config.schema import load_config

    cfg = load_config(None, ["lengths=1:20:1", "name=x"])  # YAML 1.1 would read 4801
    assert cfg.lengths == "1:20:1" and resolve_lengths(cfg.lengths) == [
        float(v) for v in range(1, 21)
    ]


def test_too_little_data_stops(tmp_path: Path, config: dict, text_file: Path) -> None:
    out = cli_fails(
        "run", config_file(tmp_path, config), "data.n_seqs=100000", "-o", f"{tmp_path}/r"
    )
    assert f"Too little data: {text_file} gives" in out and "fewer than data.n_seqs=100000" in out
    assert re.search(r"Set data\.n_seqs=\d+ \(or lower data\.seq_len\), or give more text", out)
    assert not (tmp_path / "r").exists()


def test_report_into_an_unwritable_folder(tmp_path: Path, reference: Path, monkeypatch) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    with unwritable(parent, monkeypatch):
        out = cli_fails("report", str(reference), "--out", str(parent / "rep"))
    assert str(parent) in out and "pass --out a folder or .html file you can write" in out
    assert list(parent.iterdir()) == []


def test_resume_into_an_unwritable_run_directory(
    tmp_path: Path, config: dict, reference: Path, monkeypatch
) -> None:
    import shutil

    import perturb_lens.results.store as store

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = tree(run)
    real_mkstemp = store.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # what a read-only folder does, even for root
        if Path(dir) == run:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(store.tempfile, "mkstemp", mkstemp)
    out = cli_fails("run", config_file(tmp_path, config), "--resume", "-o", str(run))
    assert f"cannot write to the run directory {run}" in out and "chmod u+w" in out
    assert tree(run) == before


def test_report_out_is_an_existing_file(tmp_path: Path, reference: Path) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    out = cli_fails("report", str(reference), "--out", str(existing))
    assert f"--out {existing} is an existing file, not a folder" in out
    assert "pass a folder, or an .html file path" in out
    assert tree(tmp_path) == {"notes.txt": b"mine"}


# --- issue 16 item 7: thread count ---


def test_resume_under_other_threads_or_cpu_is_refused(tmp_path: Path, config: dict) -> None:
    """The manifest records the thread count and CPU kind; resuming with another of either is
    refused through the CLI, naming what changed and the fix (a CPU change can be accepted)."""
    from perturb_lens.executors.compute import cpu_model

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(with_(config, threads=1)))
    run_dir = tmp_path / "run"
    ok = CliRunner().invoke(app, ["run", str(cfg_file), "--out", str(run_dir), "-q"])
    assert ok.exit_code == 0, ok.output
    meta = load_manifest(run_dir)["meta"]
    assert meta["threads"] == 1 and meta["cpu"] == cpu_model()

    out = cli_error("run", str(cfg_file), "threads=2", "--out", str(run_dir), "--resume")
    assert "threads: 1 -> 2" in out and "Resume with the original config" in out

    def record(**changes) -> None:
        manifest = load_manifest(run_dir)
        manifest["meta"].update(changes)
        (run_dir / "manifest.json").write_text(json.dumps(manifest))

    record(threads=3)  # shards made with 3 threads, a config that now says 1
    out = cli_error("run", str(cfg_file), "--out", str(run_dir), "--resume")
    assert "computed with 3 torch threads, this run would use 1" in out
    assert "Resume with threads=3" in out

    record(threads=1, cpu="Another CPU 9000")
    out = cli_error("run", str(cfg_file), "--out", str(run_dir), "--resume")
    assert "'Another CPU 9000' CPU" in out and repr(cpu_model()) in out
    assert "pass --allow-cpu-change" in out and "another --out" in out
    ok = CliRunner().invoke(
        app, ["run", str(cfg_file), "--out", str(run_dir), "--resume", "--allow-cpu-change", "-q"]
    )
    assert ok.exit_code == 0, ok.output


# --- issue 16 items 2-3: resume refuses, non-finite ---


def cli_run(config: dict, run_dir: Path, *extra: str) -> tuple[int, str]:
    """``perturb-lens run CONFIG.yaml --out RUN_DIR -q EXTRA...`` in-process: (exit code, output
    from ``Error:`` on if any), checked to hold no traceback."""
    path = run_dir.with_name(run_dir.name + ".yaml")
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(run_dir), "-q", *extra])
    assert "Traceback" not in result.output and not isinstance(result.exception, AssertionError)
    out = result.output
    return result.exit_code, out[out.find("Error: ") :] if "Error: " in out else out


def interrupted(config: dict, run_dir: Path) -> Path:
    """A run of ``config`` killed after its first shard: the manifest records only that one."""
    assert cli_run(config, run_dir)[0] == 0
    manifest = load_manifest(run_dir)
    for sid in sorted(manifest["shards"])[1:]:
        (run_dir / manifest["shards"].pop(sid)["file"]).unlink()
    manifest["complete"] = False
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return run_dir


def assert_refused(run_dir: Path, out: str, *named: str) -> None:
    """A refused resume: the message names what changed and the fix; nothing was written."""
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert out.startswith("Error: cannot resume") and all(n in out for n in named), out
    assert "choose another --out" in out and f"delete {run_dir}" in out
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before and not load_manifest(run_dir)["complete"]


def test_resume_refuses_an_edited_text_source(tmp_path: Path, config: dict) -> None:
    source = tmp_path / "docs.jsonl"
    source.write_text(Path(config["data"]["source"]).read_text())
    cfg = with_(config, data={"source": str(source)})
    run_dir = interrupted(cfg, tmp_path / "run")
    source.write_text("\n".join(reversed(source.read_text().splitlines())) + "\n")
    code, out = cli_run(cfg, run_dir, "--resume")
    assert code == 1
    assert_refused(run_dir, out, "dataset_hash", "the tokens", "1 finished shard")
    assert len(load_manifest(run_dir)["shards"]) == 1


def test_resume_refuses_retrained_weights_and_stats_follow_them(
    tmp_path: Path, config: dict, gpt2_dir: Path
) -> None:
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "model"
    shutil.copytree(gpt2_dir, model_dir)
    cfg = with_(config, model=str(model_dir))
    run_dir = interrupted(cfg, tmp_path / "run")
    weights = model_dir / "model.safetensors"
    tensors = load_file(weights)
    tensors = {k: v + 0.01 * torch.randn_like(v) for k, v in tensors.items()}  # "retrained"
    save_file(tensors, weights, metadata={"format": "pt"})
    code, out = cli_run(cfg, run_dir, "--resume")
    assert code == 1
    assert_refused(run_dir, out, "weights_fingerprint", "the model weights")
    # a fresh run at the same path fits new statistics (the cache is keyed by the weights)
    assert cli_run(cfg, tmp_path / "fresh")[0] == 0
    old, new = load_manifest(run_dir)["meta"], load_manifest(tmp_path / "fresh")["meta"]
    assert new["stats_sha256"] != old["stats_sha256"]
    assert new["weights_fingerprint"] != old["weights_fingerprint"]


def test_resume_refuses_another_package_version(tmp_path: Path, config: dict, monkeypatch) -> None:
    from perturb_lens.common import version

    run_dir = interrupted(config, tmp_path / "run")
    monkeypatch.setattr(version, "__version__", "99.0")
    code, out = cli_run(config, run_dir, "--resume")
    assert code == 1
    assert_refused(run_dir, out, "perturb_lens_version", "'99.0'", "numbers may differ")


def stats_caches_of(run_dir: Path) -> list[Path]:
    """The shared statistics cache folders holding the very files a run recorded (several when
    runs of other settings, e.g. another thread count, fitted identical statistics)."""
    from perturb_lens.common.paths import cache_root

    want = load_manifest(run_dir)["meta"]["stats_sha256"]
    found = [
        folder
        for folder in (cache_root() / "stats").iterdir()
        if (folder / "stats.safetensors").is_file()
        and file_sha256(folder / "stats.safetensors") == want
    ]
    assert found, "the run's statistics are not in the cache"
    return found


def test_resume_with_another_runs_statistics(
    tmp_path: Path, config: dict, reference: Path, webtext_path: Path
) -> None:
    other_text = tmp_path / "other.jsonl"  # another run: other text, so other statistics
    other_text.write_text("\n".join(webtext_path.read_text().splitlines()[200:320]) + "\n")
    other = tmp_path / "other"
    assert cli_run(with_(config, data={"source": str(other_text)}), other)[0] == 0
    run_dir = interrupted(config, tmp_path / "run")
    recorded = load_manifest(run_dir)["meta"]
    for name in ("stats.safetensors", "pool.pt"):
        shutil.copy(other / name, run_dir / name)
    # the files are not those recorded: refitted (here: from the shared cache), exactly as before
    code, out = cli_run(config, run_dir, "--resume")
    assert code == 0, out
    pd.testing.assert_frame_equal(load_results(run_dir), load_results(reference))
    assert file_sha256(run_dir / "stats.safetensors") == recorded["stats_sha256"]
    assert file_sha256(run_dir / "pool.pt") == recorded["pool_sha256"]
    # when even the recomputation gives other statistics (a cache overwritten by another run's
    # files), the resume is refused
    run_dir = interrupted(config, tmp_path / "run2")
    caches = stats_caches_of(run_dir)
    for name in ("stats.safetensors", "pool.pt"):
        shutil.copy(other / name, run_dir / name)
        for cache in caches:
            shutil.copy(other / name, cache / name)
    try:
        code, out = cli_run(config, run_dir, "--resume")
        assert code == 1
        assert_refused(run_dir, out, "stats_sha256", "pool_sha256", "activation statistics")
    finally:
        for cache in caches:
            shutil.rmtree(cache)  # the poisoned cache entries; refitted by the next run


@pytest.mark.parametrize(
    ("dtype", "cause"),
    [("float32", "activation norm there"), ("float16", "half precision (float16)")],
)
def test_nonfinite_metric_refuses_the_shard(
    tmp_path: Path, config: dict, dtype: str, cause: str
) -> None:
    run_dir = tmp_path / "run"
    code, out = cli_run(config, run_dir, "lengths=[0,1.0e+30]", f"dtype={dtype}")
    assert code == 1
    assert out.startswith("Error: Non-finite metric (NaN/inf)") and cause in out, out
    assert "direction 'isotropic', length 1e+30, sequence 0, position" in out
    assert "use shorter lengths" in out and "nonfinite=record" in out
    assert_no_corrupt_output(run_dir)
    assert load_manifest(run_dir)["shards"] == {}  # nothing non-finite was written


def test_nonfinite_rows_recorded_flagged_and_counted(tmp_path: Path, config: dict) -> None:
    run_dir = tmp_path / "run"
    extra = ("lengths=[0,4,1.0e+30]", "nonfinite=record", "metrics=[kl,l2,dce]")
    code, out = cli_run(config, run_dir, *extra)
    assert code == 0, out
    df = load_results(run_dir)
    finite = {m: np.isfinite(df[m].to_numpy()) for m in ("kl", "l2", "dce")}
    last = df["pos"].to_numpy() == 15  # no next token: dce is NaN by definition, not flagged
    expect = ~finite["kl"] | ~finite["l2"] | (~finite["dce"] & ~last)
    assert expect.sum() > 0 and (df["length"][expect] == np.float32(1e30)).all()
    np.testing.assert_array_equal(df["nonfinite"].to_numpy(), expect)
    assert f"Non-finite rows (NaN/inf): {int(expect.sum())}, flagged in column 'nonfinite'" in (
        " ".join(out.split())
    )
    from perturb_lens.results.summary import summary_rows

    kept = summary_rows(run_dir)
    assert not kept["nonfinite"].any() and np.isfinite(kept[["kl", "l2"]].to_numpy()).all()


def test_resume_refuses_weights_changed_in_memory(tmp_path: Path, config: dict, gpt2_dir: Path):
    model = load_model(str(gpt2_dir), device="cpu")
    tokens = torch.randint(0, 4000, (4, 16), generator=torch.Generator().manual_seed(3))
    tokens[:, 0] = model.bos_token_id
    run_dir = tmp_path / "run"
    run_experiment(config, run_dir, model=model, tokens=tokens, progress=False)
    manifest = load_manifest(run_dir)
    (run_dir / manifest["shards"].pop("s00001")["file"]).unlink()
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    before = manifest["meta"]["weights_fingerprint"]
    assert before.startswith("files:")  # loaded from files: their digest, no tensor hashing
    model.w_te[5] += 1.0  # edited in place after loading
    with pytest.raises(InputsChangedError, match="weights_fingerprint") as err:
        run_experiment(config, run_dir, resume=True, model=model, tokens=tokens, progress=False)
    assert "the model weights" in str(err.value) and before[:12] in str(err.value)
    assert load_manifest(run_dir) == manifest
