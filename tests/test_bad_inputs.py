"""The bad-input catalogue: each bad input fails with an error that says what to do, and leaves
no corrupt output (no run directory at all, or one whose manifest matches every shard file).

Entries: malformed YAML/TOML, unknown config key, unknown model, unknown hook, unknown direction,
SAE width or hook mismatch, empty or too-short dataset, sequence longer than the context, empty or
negative length grid, NaN/inf activations, unwritable output directory, disk full during a write,
resume with another config, two runs writing to one directory.
"""

from __future__ import annotations

import errno
import json
import os
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

from perturb_lens.cli import app
from perturb_lens.config import ConfigError
from perturb_lens.directions import UnknownDirectionError
from perturb_lens.engine.run import run_experiment
from perturb_lens.models.hooks import UnknownHookError
from perturb_lens.models.load import ModelLoadError, load_model
from perturb_lens.results import (
    ConfigMismatchError,
    InputsChangedError,
    RunLockedError,
    RunStore,
    file_sha256,
    load_manifest,
    load_results,
)


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
        calls.append(1)
        if len(calls) == 2:  # the second shard: half written, then the disk is full
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
    holder = RunStore(run_dir).open()  # another run holds the directory
    try:
        with pytest.raises(RunLockedError, match=f"another run \\(pid {os.getpid()}\\)") as err:
            run_experiment(config, run_dir, progress=False)
        assert "wait for it to finish (or stop it), or choose another --out" in str(err.value)
        assert not (run_dir / "manifest.json").exists()
    finally:
        holder.close()
    assert_no_corrupt_output(run_dir)


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
    import perturb_lens

    run_dir = interrupted(config, tmp_path / "run")
    monkeypatch.setattr(perturb_lens, "__version__", "99.0")
    code, out = cli_run(config, run_dir, "--resume")
    assert code == 1
    assert_refused(run_dir, out, "perturb_lens_version", "'99.0'", "numbers may differ")


def stats_cache_of(run_dir: Path) -> Path:
    """The shared statistics cache folder holding the very files a run recorded."""
    from perturb_lens.paths import cache_root

    want = load_manifest(run_dir)["meta"]["stats_sha256"]
    for folder in (cache_root() / "stats").iterdir():
        if file_sha256(folder / "stats.safetensors") == want:
            return folder
    raise AssertionError("the run's statistics are not in the cache")


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
    cache = stats_cache_of(run_dir)
    for name in ("stats.safetensors", "pool.pt"):
        shutil.copy(other / name, run_dir / name)
        shutil.copy(other / name, cache / name)
    try:
        code, out = cli_run(config, run_dir, "--resume")
        assert code == 1
        assert_refused(run_dir, out, "stats_sha256", "pool_sha256", "activation statistics")
    finally:
        shutil.rmtree(cache)  # the poisoned cache entry; refitted by the next run


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
    from perturb_lens.engine.run import summary_rows

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
