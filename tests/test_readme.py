"""The README's "Extending" snippets run as written, and what they register works in a run:
the metric against a plain float64 computation, the experiment against the plain sweep."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from doc_blocks import fenced_blocks, registries_restored, run_blocks, section
from naive import forward_with_edit

from perturb_lens import run_experiment
from perturb_lens.results import load_results

README = Path(__file__).resolve().parents[1] / "README.md"


def extending_snippets() -> list[str]:
    """The python blocks of the README's "Extending" section, in order."""
    return fenced_blocks(section(README.read_text(), "Extending"))


@pytest.fixture
def snippets():
    """Run every snippet (in one namespace, as a reader would); unregister what they added."""
    with registries_restored():
        yield run_blocks(extending_snippets(), README, {"__name__": "readme"})


def test_readme_has_an_example_of_each_extension() -> None:
    code = "\n".join(extending_snippets())
    for call in ("register_metric(", "register_experiment(", "register_family("):
        assert call in code


def test_readme_metric_and_experiment_work_in_a_run(snippets, gpt2_dir: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, 50257, (2, 6), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 50256
    d = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    d /= d.norm(dim=-1, keepdim=True)
    cfg = {
        "model": str(gpt2_dir),
        "frame": "raw",
        "experiment": "both-signs",
        "hook": "blocks.1.hook_resid_pre",
        "lengths": [0.0, 2.0],
        "metrics": ["kl", "tv"],
        "directions": ["fixed"],
        "stats": {"pool_size": 16},
        "shard_seqs": 2,
    }
    run = run_experiment(
        cfg, tmp_path / "run", tokens=tokens, explicit={"fixed": d.float()}, progress=False
    )
    rows = load_results(run)
    assert set(rows["direction"].astype(str)) == {"fixed", "-fixed"}
    hf = AutoModelForCausalLM.from_pretrained(gpt2_dir).double().eval()
    clean, _ = forward_with_edit(hf, tokens, 1, lambda h: None, 3)
    for label, sign in (("fixed", 1.0), ("-fixed", -1.0)):

        def edit(h: torch.Tensor, sign: float = sign) -> None:
            h += 2.0 * sign * d.to(h.dtype)

        pert, _ = forward_with_edit(hf, tokens, 1, edit, 3)
        tv = 0.5 * (pert.softmax(-1) - clean.softmax(-1)).abs().sum(-1)  # [2, 6] float64
        got = rows[(rows["direction"] == label) & (rows["length"] == 2.0)]
        got = got.sort_values(["seq", "pos"])["tv"].to_numpy()
        # float32 engine vs float64 reference: probabilities <= 1 summed over 50257 entries with
        # relative error ~ 1e-6 (float32 logits of magnitude ~10, eps 6e-8 times depth) -> 1e-4
        np.testing.assert_allclose(got, tv.flatten().numpy(), atol=1e-4)
    zero = rows[rows["length"] == 0.0]
    np.testing.assert_array_equal(zero["tv"].to_numpy(), 0.0)


def test_readme_family_runs_mistral_natively(snippets, tmp_path: Path) -> None:
    """The registered family loads a random-weight Mistral on the native path, and its logits are
    transformers' own."""
    from conftest import SMALL_CONFIG, float32_tol, save_random_model
    from transformers import GPT2TokenizerFast, MistralConfig, MistralForCausalLM

    from perturb_lens import load_model

    torch.manual_seed(3)
    cfg = MistralConfig(
        **SMALL_CONFIG,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        sliding_window=4096,
    )
    folder = save_random_model(MistralForCausalLM(cfg), tmp_path / "mistral")
    # a tokenizer.json, so that transformers need not convert a slow Mistral tokenizer
    GPT2TokenizerFast.from_pretrained(folder).save_pretrained(folder)
    model = load_model(str(folder), device="cpu")
    assert model.spec.family == "mistral" and type(model).__name__ == "MistralLens"
    hf = MistralForCausalLM.from_pretrained(folder).eval()
    tokens = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(tokens).logits
    assert (model.logits(tokens) - ref).abs().max().item() <= float32_tol(ref, 2, 64)
