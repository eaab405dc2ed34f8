"""The generic hook path against transformers itself: hidden states, logits, hooked forwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_close32
from naive import hooked_forward
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from perturb_lens.common.hooks import HOOK_KINDS
from perturb_lens.models.generic import CHUNK_ROWS, GenericLens

FAMILIES = ("gpt2", "llama", "neox")


def load_hf(folder: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def models(
    gpt2_dir: Path, llama_dir: Path, neox_dir: Path
) -> dict[str, tuple[GenericLens, nn.Module]]:
    """family -> (GenericLens, an independent HF copy of the same weights as the reference)."""
    out = {}
    for family, folder in (("gpt2", gpt2_dir), ("llama", llama_dir), ("neox", neox_dir)):
        lens = GenericLens.from_hf(
            load_hf(folder), AutoTokenizer.from_pretrained(folder), source=f"folder {folder}"
        )
        out[family] = (lens, load_hf(folder))
    return out


def tokens_for(batch: int = 2, seq: int = 12, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50257, (batch, seq), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(models, family: str) -> None:
    lens, hf = models[family]
    tokens = tokens_for()
    with torch.no_grad():
        ref = hf(tokens).logits
    assert_close32(lens.logits(tokens), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_run_to_hook_matches_hidden_states(models, family: str) -> None:
    lens, hf = models[family]
    tokens = tokens_for()
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states  # [emb, block0 out, ...]
    n = lens.spec.n_layers
    for layer in range(n):
        acts = {k: lens.run_to_hook(tokens, f"blocks.{layer}.{k}") for k in HOOK_KINDS}
        assert_close32(acts["hook_resid_pre"], hidden[layer])
        if layer < n - 1:  # HF's last entry is after the final norm
            assert_close32(acts["hook_resid_post"], hidden[layer + 1])
        # sequential and parallel blocks: resid_post = resid_pre + attn_out + mlp_out
        assert_close32(
            acts["hook_resid_pre"] + acts["hook_attn_out"] + acts["hook_mlp_out"],
            acts["hook_resid_post"],
        )
        for kind in ("hook_attn_out", "hook_mlp_out"):
            ref, _, _ = hooked_forward(hf, tokens, layer, kind, None)
            assert_close32(acts[kind], ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_run_clean_final_and_reads(models, family: str) -> None:
    lens, hf = models[family]
    tokens = tokens_for()
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    clean = lens.run_clean(tokens, "blocks.1.hook_resid_pre", reads=["blocks.2.hook_resid_pre"])
    assert_close32(clean.final, hidden[-1])
    assert_close32(clean.x, hidden[1])
    assert_close32(clean.reads["blocks.2.hook_resid_pre"], hidden[2])
    assert clean.cache is None


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", HOOK_KINDS)
def test_continue_all_unchanged_reproduces_clean(models, family: str, kind: str) -> None:
    lens, _ = models[family]
    tokens = tokens_for()
    read = lens.default_read
    clean = lens.run_clean(tokens, f"blocks.1.{kind}", reads=[read])
    x_new = clean.x.unsqueeze(1).expand(-1, 3, -1, -1)  # k = 3 unchanged copies
    final, reads = lens.continue_all(clean, x_new, reads=[read])
    assert final.shape == (2, 3, 12, lens.spec.d_model)
    assert_close32(final, clean.final.unsqueeze(1).expand_as(final))
    assert_close32(reads[read], clean.reads[read].unsqueeze(1).expand_as(final))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", HOOK_KINDS)
def test_continue_all_perturbed_matches_plain_forward(models, family: str, kind: str) -> None:
    lens, hf = models[family]
    tokens = tokens_for()
    clean = lens.run_clean(tokens, f"blocks.2.{kind}")
    g = torch.Generator().manual_seed(3)
    x_new = clean.x.unsqueeze(1) + torch.randn((2, 2, 12, lens.spec.d_model), generator=g)
    final, _ = lens.continue_all(clean, x_new)
    for j in range(2):
        _, ref, _ = hooked_forward(hf, tokens, 2, kind, lambda h, j=j: x_new[:, j])
        assert_close32(final[:, j], ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", HOOK_KINDS)
def test_continue_at_matches_one_copy_forward(models, family: str, kind: str) -> None:
    """Each (sequence, position) row: one HF forward of that sequence alone, with only that
    position's activation replaced; final and a downstream read at that position."""
    lens, hf = models[family]
    tokens = tokens_for()
    layer = 1
    read_layer = 3  # read blocks.3.hook_resid_pre = HF hidden_states[3]
    clean = lens.run_clean(tokens, f"blocks.{layer}.{kind}", keep_kv=True)
    positions = torch.tensor([[0, 5, 11], [7, 7, 2]])
    g = torch.Generator().manual_seed(4)
    delta = 3.0 * torch.randn((2, 3, lens.spec.d_model), generator=g)
    x_new = clean.x[torch.arange(2)[:, None], positions] + delta
    read = f"blocks.{read_layer}.hook_resid_pre"
    final, reads = lens.continue_at(clean, x_new, positions, reads=[read])
    assert final.shape == (2, 3, lens.spec.d_model) and reads[read].shape == final.shape
    for b in range(2):
        for i in range(3):
            p = int(positions[b, i])

            def put(h: Tensor, b: int = b, i: int = i, p: int = p) -> Tensor:
                h[0, p] = x_new[b, i]
                return h

            _, ref_final, hidden = hooked_forward(hf, tokens[b : b + 1], layer, kind, put)
            assert_close32(final[b, i], ref_final[0, p])
            assert_close32(reads[read][b, i], hidden[read_layer][0, p])
            # and the perturbation did change something downstream
            # changed by far more than float32 noise (1.5e-5 of the values, see assert_close32)
            assert not torch.allclose(final[b, i], clean.final[b, p], atol=1e-4)


def test_continue_at_chunks_many_rows(models) -> None:
    """More rows than one chunk: chunk boundaries must not mix rows up."""
    lens, _ = models["gpt2"]
    tokens = tokens_for(batch=3, seq=40)
    clean = lens.run_clean(tokens, "blocks.2.hook_resid_pre")
    n = 40  # 3 * 40 = 120 rows > CHUNK_ROWS
    assert 3 * n > CHUNK_ROWS
    positions = torch.arange(n).repeat(3, 1)
    final, _ = lens.continue_at(clean, clean.x, positions)  # unchanged rows
    assert_close32(final, clean.final)


def test_frames_and_errors(models) -> None:
    lens, hf = models["gpt2"]
    assert lens.frame == "raw"
    with pytest.raises(ValueError, match="native path"):
        GenericLens.from_hf(hf, lens.tokenizer, frame="centered")
    llama, _ = models["llama"]
    with pytest.raises(ValueError, match="LayerNorm"):
        GenericLens.from_hf(models["llama"][1], llama.tokenizer, frame="centered")
    clean = lens.run_clean(tokens_for(), "blocks.2.hook_resid_pre")
    with pytest.raises(ValueError, match="downstream"):
        lens.continue_all(clean, clean.x.unsqueeze(1), reads=["blocks.1.hook_resid_post"])
    with pytest.raises(ValueError, match="x_new must be"):
        lens.continue_all(clean, clean.x)
    with pytest.raises(ValueError, match="positions must be"):
        lens.continue_at(clean, clean.x[:, :2], torch.tensor([[0, 12], [1, 2]]))
    families = r"gemma2, gemma3, gpt2, llama, neox, qwen2"
    with pytest.raises(NotImplementedError, match=rf"native model \(families: {families}\)"):
        lens.continue_all_grad(clean, clean.x.unsqueeze(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_spec(models, family: str) -> None:
    lens, hf = models[family]
    spec = lens.spec
    assert (spec.family, spec.n_layers, spec.d_model, spec.vocab_size, spec.n_ctx) == (
        "generic",
        4,
        64,
        50257,
        256,
    )
    assert spec.n_params == sum(p.numel() for p in hf.parameters())
    expected = {  # architecture, norm, heads, kv heads, d_head, d_mlp
        "gpt2": ("GPT2LMHeadModel", "layernorm", 4, 4, 16, 256),
        "llama": ("LlamaForCausalLM", "rmsnorm", 8, 2, 8, 160),
        "neox": ("GPTNeoXForCausalLM", "layernorm", 4, 4, 16, 256),
    }[family]
    got = (spec.architecture, spec.norm, spec.n_heads, spec.n_kv_heads, spec.d_head, spec.d_mlp)
    assert got == expected


def test_parallel_attention_model() -> None:
    """GPT-NeoX (parallel attention, partial rotary): any HF causal LM works through hooks."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(2)
    cfg = GPTNeoXConfig(
        vocab_size=500,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        rotary_pct=0.25,
        use_parallel_residual=True,
    )
    hf = GPTNeoXForCausalLM(cfg).eval()
    lens = GenericLens.from_hf(hf, None)
    assert (lens.spec.n_layers, lens.spec.norm, lens.spec.d_mlp) == (3, "layernorm", 128)
    tokens = torch.randint(0, 500, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True)
    assert_close32(lens.logits(tokens), ref.logits, 3)
    acts = {k: lens.run_to_hook(tokens, f"blocks.1.{k}") for k in HOOK_KINDS}
    assert_close32(acts["hook_resid_pre"], ref.hidden_states[1])
    # parallel residual: resid_post = resid_pre + attn(ln1(x)) + mlp(ln2(x))
    assert_close32(
        acts["hook_resid_pre"] + acts["hook_attn_out"] + acts["hook_mlp_out"],
        acts["hook_resid_post"],
    )
    clean = lens.run_clean(tokens, "blocks.1.hook_mlp_out")
    final, _ = lens.continue_all(clean, clean.x.unsqueeze(1))
    assert_close32(final[:, 0], clean.final)
