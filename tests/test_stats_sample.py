"""The statistics' own fit sample (``stats`` section): its size, where its rows come from, the
streamed fit against a one-shot float64 one, the cache key, and the small-fit warning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from perturb_lens.cli.app import app
from perturb_lens.config.schema import ConfigError, validate_config
from perturb_lens.data.text import dataset_tokens
from perturb_lens.models.load import load_model
from perturb_lens.plots.report import write_report
from perturb_lens.results import load_manifest
from perturb_lens.statistics.activations import fit_size_warning
from perturb_lens.statistics.cache import load_stats, stats_tokens
from perturb_lens.workflows.experiment import prepare, run_experiment

D = 64  # the tiny GPT-2's d_model
SEQ_LEN = 16


def _config(gpt2_dir: Path, text_file: Path, **stats) -> dict:
    return {
        "name": "fit",
        "model": str(gpt2_dir),
        "hook": "blocks.1.hook_resid_pre",
        "data": {"source": str(text_file), "seq_len": SEQ_LEN, "n_seqs": 4},
        "stats": {"pool_size": 4000, **stats},
        "shard_seqs": 4,
        "lengths": [0, 3],
        "directions": ["isotropic", "real-mixture"],
    }


def _naive_rows(text_file: Path, tokenizer, bos: int, eos: int, n_rows: int) -> torch.Tensor:
    """Plain chunking: the documents' tokens joined by EOS, cut into rows of BOS + 15 tokens."""
    stream: list[int] = []
    for line in text_file.read_text().splitlines():
        ids = tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
        if ids:
            stream += ([eos] if stream else []) + ids
    k = SEQ_LEN - 1
    rows = [[bos, *stream[i * k : (i + 1) * k]] for i in range(min(n_rows, len(stream) // k))]
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def model(gpt2_dir: Path):
    return load_model(str(gpt2_dir), device="cpu")


def test_fit_sample_reads_beyond_the_measured_rows(model, gpt2_dir: Path, text_file: Path) -> None:
    """Default: 20 x d_model samples = ceil(1280 / 15) = 86 rows of the data source, whose first
    4 are the measured rows (the measured tokens are a prefix of the fit sample)."""
    cfg = validate_config(_config(gpt2_dir, text_file))
    measured = dataset_tokens(cfg.data, model, progress=False)
    fit = stats_tokens(cfg, model, measured, progress=False)
    assert fit.shape == (math.ceil(20 * D / (SEQ_LEN - 1)), SEQ_LEN) == (86, 16)
    assert torch.equal(fit[:4], measured)
    eos = model.tokenizer.eos_token_id
    assert torch.equal(fit, _naive_rows(text_file, model.tokenizer, model.bos_token_id, eos, 86))
    sized = validate_config(_config(gpt2_dir, text_file, n_tokens=31))  # 31 -> 3 whole rows
    assert torch.equal(stats_tokens(sized, model, measured, progress=False), measured[:3])
    rows = validate_config(_config(gpt2_dir, text_file, n_seqs=10))  # n_seqs still sizes it
    assert torch.equal(stats_tokens(rows, model, measured, progress=False), fit[:10])
    # a huge ask from a short source: what it has (here all 120 documents' rows)
    huge = validate_config(_config(gpt2_dir, text_file, n_tokens=10**7))
    everything = stats_tokens(huge, model, measured, progress=False)
    naive = _naive_rows(text_file, model.tokenizer, model.bos_token_id, eos, 10**6)
    assert torch.equal(everything, naive) and 86 < len(naive) < 10**7 / 15


def test_fit_sample_from_another_source(model, gpt2_dir: Path, text_file: Path, tmp_path) -> None:
    """``stats.source``: rows of that text, not the measured ones."""
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(text_file.read_text().splitlines()[60:]) + "\n")
    cfg = validate_config(_config(gpt2_dir, text_file, source=str(other), n_seqs=5))
    measured = dataset_tokens(cfg.data, model, progress=False)
    fit = stats_tokens(cfg, model, measured, progress=False)
    eos = model.tokenizer.eos_token_id
    assert torch.equal(fit, _naive_rows(other, model.tokenizer, model.bos_token_id, eos, 5))
    assert not torch.equal(fit[:4], measured)


def test_both_sizes_refused(gpt2_dir: Path, text_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"stats.n_tokens=100 and stats.n_seqs=2 .* only one"):
        validate_config(_config(gpt2_dir, text_file, n_tokens=100, n_seqs=2))


def test_streamed_fit_equals_one_shot_float64(
    model, gpt2_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    """The run's statistics (streamed row by row: 86 Chan merges) equal torch.cov on all the fit
    sample's non-BOS activations at once, in float64; the pool is drawn from the same rows."""
    cfg = _config(gpt2_dir, text_file, batch_seqs=1)
    run_dir = run_experiment(cfg, tmp_path / "run", model=model, progress=False)
    stats, pool = load_stats(run_dir)
    vcfg = validate_config(cfg)
    fit = stats_tokens(vcfg, model, dataset_tokens(vcfg.data, model, progress=False))
    # each row alone, as the runner did (batch_seqs=1): the very same float32 activations
    acts = torch.cat([model.run_to_hook(row[None], cfg["hook"])[0, 1:] for row in fit])
    x = acts.double()
    assert x.shape == (86 * 15, D)
    # streamed vs one-shot float64: both sum the same float64 values in another order; the
    # rounding is ~ N eps64 |x|^2 ~ 1e3 * 1e-16 = 1e-13 relative, below the 1e-10 required
    rel = (stats.cov - torch.cov(x.T)).abs().max() / torch.cov(x.T).abs().max()
    assert rel <= 1e-10
    assert (stats.mean - x.mean(0)).abs().max() <= 1e-10 * x.mean(0).abs().max()
    assert stats.n_tokens == 86 * 15
    meta = load_manifest(run_dir)["meta"]
    assert meta["stats"] == {"n_samples": 1290, "d_model": D, "source": str(text_file)}
    # every pool row is one of the fit sample's rows, and some come from beyond the measured 4
    index = {tuple(r.tolist()): i for i, r in enumerate(acts)}
    where = torch.tensor([index[tuple(r.tolist())] for r in pool])
    assert len(pool) == 1290 and (where >= 4 * 15).any()


def test_cache_keyed_by_fit_size(model, gpt2_dir: Path, text_file: Path, tmp_path: Path) -> None:
    """Another fit size is another cache entry (other statistics); the same size reuses it."""

    def fitted(**stats):
        cfg = validate_config(_config(gpt2_dir, text_file, **stats))
        ctx = prepare(cfg, tmp_path / "none", model=model, progress=False)
        return ctx.stats, ctx.stats_files

    small, small_dir = fitted(n_seqs=20)
    big, big_dir = fitted(n_seqs=40)
    assert small_dir != big_dir and (small.n_tokens, big.n_tokens) == (300, 600)
    assert not torch.equal(small.cov, big.cov)
    again, again_dir = fitted(n_tokens=300)  # 300 samples = the same 20 rows
    assert again_dir == small_dir and torch.equal(again.cov, small.cov)


def test_warning_below_ten_d_model() -> None:
    assert fit_size_warning(10 * D, D) is None and fit_size_warning(10**6, D) is None
    warning = fit_size_warning(10 * D - 1, D)
    assert warning is not None and "639 samples" in warning and "stats.n_tokens=1280" in warning


@pytest.mark.parametrize("n_seqs", [42, 43])  # 630 < 640 <= 645 samples
def test_cli_and_report_warn_on_a_small_fit(
    gpt2_dir: Path, text_file: Path, tmp_path: Path, n_seqs: int
) -> None:
    cfg = _config(gpt2_dir, text_file, n_seqs=n_seqs)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    yaml_path = path.with_suffix(".yaml")
    yaml_path.write_text(path.read_text())  # JSON is YAML
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(yaml_path), "--out", str(run_dir), "-q"])
    assert result.exit_code == 0, result.output
    n = n_seqs * 15
    assert f"Statistics fitted on {n} samples" in result.output
    small = n < 10 * D
    assert ("WARNING" in result.output and "stats.n_tokens=1280" in result.output) == small
    page = write_report(run_dir).read_text()
    assert f"{n} samples" in page
    assert ('class="warning"' in page and "stats.n_tokens=1280" in page) == small


def test_fit_runs_the_prefix_only(
    gpt2_dir: Path, text_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fitting calls run_to_hook only: no suffix, no logits (each raises here)."""
    from perturb_lens.statistics.cache import fit_run_stats

    model = load_model(str(gpt2_dir), device="cpu")
    for name in ("run_clean", "continue_all", "continue_at", "unembed", "logits"):
        monkeypatch.setattr(model, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} called"))
    cfg = validate_config(_config(gpt2_dir, text_file, n_seqs=6))
    fit = stats_tokens(cfg, model, dataset_tokens(cfg.data, model, progress=False))
    stats, _ = fit_run_stats(cfg, model, fit, progress=False)
    assert stats.n_tokens == 6 * 15
