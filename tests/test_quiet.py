"""``--quiet`` silences every progress bar, the libraries' own included (transformers prints
"Loading weights" while it loads a model unless told otherwise)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import run_config


def _run(config: dict, out: Path, *extra: str) -> str:
    cfg = out.parent / f"{out.name}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    # not inherited from an earlier in-process `-q` command of the test session
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    proc = subprocess.run(
        [sys.executable, "-m", "perturb_lens.cli", "run", str(cfg), "--out", str(out), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout + proc.stderr


def test_quiet_silences_the_model_loading_bar(
    tmp_path: Path, gpt2_dir: Path, text_file: Path
) -> None:
    config = run_config(
        gpt2_dir,
        text_file,
        layer=1,
        seq_len=8,
        n_seqs=2,
        pool_size=16,
        name="quiet",
        lengths=[0, 1],
        directions=["isotropic"],
    )
    assert "Loading weights" in _run(config, tmp_path / "loud")  # the bar the flag must silence
    assert "Loading weights" not in _run(config, tmp_path / "quiet", "--quiet")
