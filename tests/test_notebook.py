"""examples/quickstart.ipynb runs top to bottom (nbclient) and is committed without outputs; the
README's "From TransformerLens / SAELens" section runs as written (hub downloads stubbed) and its
DuckDB query gives the same means as pandas on the checked rows."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from doc_blocks import fenced_blocks, run_blocks, section

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "quickstart.ipynb"
README = REPO / "README.md"
NOTEBOOK_NEEDS = ("nbclient", "nbformat", "ipykernel", "transformer_lens", "sae_lens", "duckdb")


def _require(*modules: str) -> None:
    """Skip, naming what is missing and how to get it, unless every module is importable."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: pip install 'perturb-lens[notebook]'")


def test_committed_notebook_has_no_outputs() -> None:
    """Outputs are not committed: every code cell is unexecuted and empty."""
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code
    for cell in code:
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, cell["source"]


def test_quickstart_notebook_runs(tmp_path: Path, smollm2) -> None:
    """Executed in a fresh kernel (working directory: a temporary folder, so its runs land
    there); the run's inline view, the verdicts and the figures come out. ``smollm2``: skips
    without the embedded model, and has converted it into the cache the kernel inherits."""
    _require(*NOTEBOOK_NEEDS)
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("Verdicts" in h and "<svg" in h for h in html)  # the Run's inline view
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 3  # fig1 and all_kl of the SmolLM2 run, all_kl of the hooked one
    assert (tmp_path / "runs" / "hooked" / "manifest.json").is_file()


def readme_section_blocks() -> list[str]:
    """The python blocks of the README's "From TransformerLens / SAELens" section, in order."""
    return fenced_blocks(section(README.read_text(), "From TransformerLens / SAELens"))


def test_readme_tl_section_runs(tmp_path: Path, monkeypatch, smollm2) -> None:
    """The section's code as written, with the two hub downloads stubbed by objects of the same
    kinds built from configs (a 7-layer processed HookedTransformer with SmolLM2's tokenizer, a
    random SAELens SAE at the hook); the DuckDB means equal pandas' on the checked rows."""
    _require("transformer_lens", "sae_lens", "duckdb")
    import sae_lens
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    def tiny_gpt2(cls, name: str, **kw):
        cfg = HookedTransformerConfig(
            n_layers=7, d_model=64, d_head=16, n_heads=4, d_mlp=256, n_ctx=64,
            d_vocab=len(smollm2.tokenizer), act_fn="gelu_new", seed=0,
        )  # fmt: skip
        ht = HookedTransformer(cfg, tokenizer=smollm2.tokenizer)
        ht.load_and_process_state_dict(ht.state_dict())  # from_pretrained's default processing
        return ht

    def random_sae(cls, release: str, sae_id: str, **kw):
        cfg = sae_lens.StandardSAEConfig(d_in=64, d_sae=256)
        cfg.metadata.hook_name = sae_id
        return sae_lens.StandardSAE(cfg)

    monkeypatch.setattr(HookedTransformer, "from_pretrained", classmethod(tiny_gpt2))
    monkeypatch.setattr(sae_lens.SAE, "from_pretrained", classmethod(random_sae))
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        namespace = run_blocks(readme_section_blocks(), README, {"__name__": "readme"})
    run = namespace["run"]
    assert run == Path("runs/tl-gpt2") and run.meta["frame"] == "centered"
    assert type(namespace["fig"]).__name__ == "Figure"
    rows = run.rows()
    rows = rows[rows.pos < run.meta["seq_len"] - 1].astype({"kl": "float64", "l2": "float64"})
    ref = rows.groupby(["direction", "length"], observed=True)[["kl", "l2"]].mean().reset_index()
    got = namespace["means"]
    assert len(got) == len(ref) == 3 * 4
    merged = got.merge(ref.astype({"direction": str}), on=["direction", "length"])
    assert len(merged) == len(ref)
    # the same float32 rows summed in float64 in another order: n = 124 terms of relative
    # rounding 1.1e-16 each stay below 1e-12 relative
    for m in ("kl", "l2"):
        pd.testing.assert_series_equal(
            merged[f"{m}_x"], merged[f"{m}_y"], check_names=False, rtol=1e-12, atol=0
        )
    assert torch.tensor(got.n.to_numpy()).eq(4 * (run.meta["seq_len"] - 1)).all()
