"""A configured run end to end: store, resume after a kill, config errors, explicit directions."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import kl_floor32, logit_bound, run_config, run_in_subprocess

from perturb_lens.config.schema import ConfigError, load_config
from perturb_lens.directions.base import register_direction
from perturb_lens.results import ConfigMismatchError, load_manifest, load_results
from perturb_lens.results.summary import summary_rows
from perturb_lens.workflows.experiment import run_experiment


def _config(gpt2_dir: Path, text_file: Path, **over) -> dict:
    rest = {
        "name": "test",
        "shard_seqs": 2,
        "lengths": [0, 2, 8],
        "directions": ["isotropic", "real-mixture", "ablation"],
    }
    cfg = run_config(gpt2_dir, text_file, layer=2, seq_len=24, n_seqs=12, pool_size=256, **rest)
    cfg.update(over)
    return cfg


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["seq", "pos", "direction", "length"]).reset_index(drop=True)


def test_run_writes_results_and_manifest(tmp_path: Path, gpt2_dir: Path, text_file: Path) -> None:
    run_dir = run_experiment(_config(gpt2_dir, text_file), tmp_path / "run", progress=False)
    manifest = load_manifest(run_dir)
    meta = manifest["meta"]
    assert manifest["complete"] and len(manifest["shards"]) == 6
    assert meta["frame"] == "centered" and meta["scope"] == "all-positions"
    assert len(meta["dataset_hash"]) == 64 and meta["torch_version"] == torch.__version__
    df = load_results(run_dir)
    assert len(df) == 12 * 24 * 3 * 3
    from transformers import GPT2LMHeadModel

    # length 0: the float32 noise floor 4 eps max|logit|, max|logit| <= 5.7 for this model:
    # 2.7e-6 (measured 5.7e-8)
    max_logit = logit_bound(GPT2LMHeadModel.from_pretrained(gpt2_dir))
    assert df[df.length == 0].kl.abs().max() <= kl_floor32(max_logit)
    assert (df[df.length == 8].kl > 0).all()
    kept = summary_rows(run_dir)
    assert kept.pos.max() == 22 and kept.pos.min() == 0  # last position dropped, BOS kept


def test_killed_run_resumes_identically(tmp_path: Path, gpt2_dir: Path, text_file: Path) -> None:
    cfg = _config(gpt2_dir, text_file)
    reference = run_experiment(cfg, tmp_path / "ref", progress=False)
    run_dir = tmp_path / "killed"
    run_in_subprocess(cfg, run_dir, kill_after_first_shard=True)
    partial = load_manifest(run_dir)
    assert 1 <= len(partial["shards"]) < 6 and not partial["complete"]
    with pytest.raises(FileExistsError, match="--resume"):
        run_experiment(cfg, run_dir, progress=False)
    run_experiment(cfg, run_dir, resume=True, progress=False)
    assert load_manifest(run_dir)["complete"]
    pd.testing.assert_frame_equal(_sorted(load_results(run_dir)), _sorted(load_results(reference)))


def test_resume_with_other_config_is_refused(
    tmp_path: Path, gpt2_dir: Path, text_file: Path
) -> None:
    run_dir = run_experiment(_config(gpt2_dir, text_file), tmp_path / "run", progress=False)
    with pytest.raises(ConfigMismatchError, match="hook"):
        run_experiment(
            _config(gpt2_dir, text_file, hook="blocks.1.hook_resid_pre"),
            run_dir,
            resume=True,
            progress=False,
        )


def test_single_position_run_and_custom_directions(
    tmp_path: Path, gpt2_dir: Path, text_file: Path
) -> None:
    @register_direction(
        "test-first-axis", contains_minus_x=False, description="e_0", overwrite=True
    )
    def first_axis(ctx):
        out = torch.zeros_like(ctx.x)
        out[:, 0] = 1.0
        return out

    fixed = torch.zeros(64)
    fixed[0] = 1.0
    cfg = _config(
        gpt2_dir, text_file, scope="single-position", directions=["test-first-axis", "explicit"]
    )
    cfg["data"]["n_seqs"] = 4
    run_dir = run_experiment(cfg, tmp_path / "run", explicit={"explicit": fixed}, progress=False)
    df = load_results(run_dir)
    a = _sorted(df[df.direction == "test-first-axis"]).drop(columns="direction")
    b = _sorted(df[df.direction == "explicit"]).drop(columns="direction")
    pd.testing.assert_frame_equal(a, b)


def test_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("hook: blocks.1.hook_resid_pre\ndata:\n  n_seq: 4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'data.n_seq'.*n_seqs"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"valid keys here: .*scope"):
        load_config(None, ["scopes=all-positions"])
    malformed = tmp_path / "m.toml"
    malformed.write_text("hook = [unclosed\n")
    with pytest.raises(ConfigError, match="Malformed"):
        load_config(malformed)
    with pytest.raises(ConfigError, match="lengths"):
        load_config(None, ["lengths=[]"])
    with pytest.raises(ConfigError, match="metric"):
        load_config(None, ["metrics=[kl, entropy]"])
    cfg = load_config(None, ["data.n_seqs=3", "lengths=[0, 1]", "scope=single-position"])
    assert cfg.data.n_seqs == 3 and cfg.lengths == [0.0, 1.0] and cfg.scope == "single-position"
