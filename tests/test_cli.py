"""The command line: run a tiny config end to end, clear errors, presets validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import run_config
from typer.testing import CliRunner

from perturb_lens.cli.app import app
from perturb_lens.config.schema import ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_presets_validate(path: Path) -> None:
    """Every preset parses with the reader of its command (run, sae run, sae train)."""
    from perturb_lens.workflows.sae_suite import is_suite_file, load_suite_config
    from perturb_lens.workflows.sae_training import load_train_config

    if path.name.startswith("sae_train"):
        assert load_train_config(path).saes
    elif is_suite_file(path):
        assert load_suite_config(path).saes
    else:
        assert load_config(path).name == path.stem
        return
    with pytest.raises(ConfigError, match="perturb-lens sae"):  # `run` points to the right one
        load_config(path)


def test_run_prints_summary_and_writes(tmp_path: Path, gpt2_dir: Path, webtext_path: Path) -> None:
    cfg = run_config(
        gpt2_dir,
        webtext_path,
        layer=1,
        seq_len=16,
        n_seqs=4,
        pool_size=64,
        name="cli",
        lengths=[0, 4, 16],
        directions=["isotropic", "cov-random-mixture"],
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["run", str(path), "scope=single-position", "--out", str(out), "-q"]
    )
    assert result.exit_code == 0, result.output
    assert "mean kl by length" in result.output and "cov-random-mixture" in result.output
    assert (out / "manifest.json").is_file()
    again = CliRunner().invoke(app, ["run", str(path), "--out", str(out), "-q"])
    assert again.exit_code == 1 and "--resume" in again.output


def test_run_bad_config_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("hookk: blocks.1.hook_resid_pre\n")
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 1
    assert "unknown key 'hookk'" in result.output and "hook" in result.output
