"""Native GPT-2 / Llama forward against transformers itself and against plain hooked HF forwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import float32_tol, llama_in_float64
from transformers import AutoModelForCausalLM, AutoTokenizer

from perturb_lens.models.gpt2 import GPT2Lens
from perturb_lens.models.hooks import UnknownHookError
from perturb_lens.models.llama import LlamaLens
from perturb_lens.models.native import NativeLens

FAMILIES = {"gpt2": GPT2Lens, "llama": LlamaLens}
# every comparison in float32 (derived tolerance) and as an exactness test in float64
DTYPES = [torch.float32, pytest.param(torch.float64, marks=pytest.mark.exact)]


def _hf(folder: Path, dtype: torch.dtype):
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    model = model.to(dtype)
    if dtype == torch.float64 and model.config.model_type == "llama":
        model = llama_in_float64(model)
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module", params=DTYPES, ids=["float32", "float64"])
def hf_models(request, gpt2_dir: Path, llama_dir: Path):
    """transformers' models in float32, then in float64 (exact)."""
    return {"gpt2": _hf(gpt2_dir, request.param), "llama": _hf(llama_dir, request.param)}


def _native(hf_models, family: str, frame: str | None = None) -> NativeLens:
    model, tok = hf_models[family]
    return FAMILIES[family].from_hf(model, tok, frame=frame, dtype=model.dtype)


def tol(ref: torch.Tensor, model: NativeLens) -> float:
    """Largest allowed |difference| from ``ref``: float64 results agree to rounding (~1e-16 per
    operation; 1e-9 relative leaves room for 10^7 of them, while any real discrepancy is of the
    order of the values); float32 ones to :func:`conftest.float32_tol`."""
    if ref.dtype == torch.float64:
        return 1e-9 * ref.abs().max().item()
    return float32_tol(ref, model.spec.n_layers, model.spec.d_model)


def _tokens(b: int = 3, t: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50257, (b, t), generator=g)


def _blocks(hf):
    return hf.transformer.h if hasattr(hf, "transformer") else hf.model.layers


def _hf_logits_with_edit(hf, tokens, layer: int, edit) -> torch.Tensor:
    """Plain reference: a forward pre-hook on block `layer` that edits its input residual."""

    def pre_hook(module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).clone()
        edit(hidden)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = _blocks(hf)[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            return hf(tokens).logits
    finally:
        handle.remove()


@pytest.mark.parametrize(
    ("family", "frame"), [("gpt2", "centered"), ("gpt2", "raw"), ("llama", "raw")]
)
def test_logits_match_transformers(hf_models, family: str, frame: str) -> None:
    hf, _ = hf_models[family]
    model = _native(hf_models, family, frame)
    tokens = _tokens()
    with torch.no_grad():
        ref = hf(tokens).logits
    assert (model.logits(tokens) - ref).abs().max().item() <= tol(ref, model)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_resid_pre_matches_hidden_states(hf_models, family: str) -> None:
    hf, _ = hf_models[family]
    model = _native(hf_models, family, "raw")
    tokens = _tokens()
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    for layer in range(model.spec.n_layers):
        x = model.run_to_hook(tokens, f"blocks.{layer}.hook_resid_pre")
        assert (x - hidden[layer]).abs().max().item() <= tol(hidden[layer], model)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_continue_unchanged_reproduces_full_forward(hf_models, family: str) -> None:
    model = _native(hf_models, family)
    tokens = _tokens()
    full = model.logits(tokens)
    n = model.spec.n_layers
    b, t = tokens.shape
    positions = torch.tensor([[0, 1, t // 2, t - 1]] * b)
    at = torch.gather(full, 1, positions.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    for layer in sorted({0, n // 2, n - 1}):
        for kind in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post"):
            clean = model.run_clean(tokens, f"blocks.{layer}.{kind}", keep_kv=True)
            assert (model.unembed(clean.final) - full).abs().max().item() <= tol(full, model)
            final, _ = model.continue_all(clean, clean.x.unsqueeze(1).repeat(1, 2, 1, 1))
            err = (model.unembed(final) - full.unsqueeze(1)).abs().max().item()
            assert err <= tol(full, model), kind
            xs = torch.gather(clean.x, 1, positions.unsqueeze(-1).expand(-1, -1, clean.x.shape[-1]))
            final_at, _ = model.continue_at(clean, xs, positions)
            assert (model.unembed(final_at) - at).abs().max().item() <= tol(at, model), kind


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("layer", [0, 2])
def test_perturbed_continuations_match_hooked_transformers(
    hf_models, family: str, layer: int
) -> None:
    """All positions perturbed, and one position perturbed alone, against plain HF hooks."""
    hf, _ = hf_models[family]
    model = _native(hf_models, family, "raw")
    tokens = _tokens(b=2, t=16, seed=3)
    clean = model.run_clean(tokens, f"blocks.{layer}.hook_resid_pre", keep_kv=True)
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(clean.x.shape, generator=g, dtype=clean.x.dtype) * 4.0

    def add_all(h: torch.Tensor) -> None:
        h += delta

    ref_all = _hf_logits_with_edit(hf, tokens, layer, add_all)
    final, _ = model.continue_all(clean, (clean.x + delta).unsqueeze(1))
    assert (model.unembed(final[:, 0]) - ref_all).abs().max().item() <= tol(ref_all, model)

    positions = torch.tensor([[0, 5, 15], [3, 9, 14]])
    xs = torch.stack([clean.x[b, positions[b]] + delta[b, positions[b]] for b in range(2)])
    final_at = model.unembed(model.continue_at(clean, xs, positions)[0])
    for b in range(2):
        for i, p in enumerate(positions[b].tolist()):

            def add_one(h: torch.Tensor, b: int = b, p: int = p) -> None:
                h[b, p] += delta[b, p]

            ref = _hf_logits_with_edit(hf, tokens, layer, add_one)[b, p]
            assert (final_at[b, i] - ref).abs().max().item() <= tol(ref, model)


def test_centered_frame_is_raw_minus_mean(hf_models) -> None:
    raw = _native(hf_models, "gpt2", "raw")
    cen = _native(hf_models, "gpt2", "centered")
    tokens = _tokens()
    for hook in ("blocks.0.hook_resid_pre", "blocks.2.hook_resid_post", "blocks.3.hook_mlp_out"):
        xr, xc = raw.run_to_hook(tokens, hook), cen.run_to_hook(tokens, hook)
        assert (xc - (xr - xr.mean(-1, keepdim=True))).abs().max().item() <= tol(xr, raw)
        assert xc.mean(-1).abs().max().item() <= tol(xr, raw)
    full = raw.logits(tokens)
    assert (full - cen.logits(tokens)).abs().max().item() <= tol(full, raw)


def test_reads_downstream_hooks(hf_models) -> None:
    model = _native(hf_models, "gpt2", "raw")
    hf, _ = hf_models["gpt2"]
    tokens = _tokens()
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states  # last one has ln_f applied
    clean = model.run_clean(
        tokens, "blocks.1.hook_resid_pre", reads=["blocks.2.hook_resid_post", model.default_read]
    )
    got = clean.reads["blocks.2.hook_resid_post"]
    assert (got - hidden[3]).abs().max().item() <= tol(hidden[3], model)
    last = model.norm_final(clean.reads[model.default_read])
    assert (last - hidden[-1]).abs().max().item() <= tol(hidden[-1], model)
    with pytest.raises(ValueError, match="at or after"):
        model.run_clean(tokens, "blocks.2.hook_resid_pre", reads=["blocks.1.hook_resid_post"])


def test_clear_errors(hf_models) -> None:
    model = _native(hf_models, "gpt2")
    with pytest.raises(UnknownHookError, match=r"blocks\.0\.hook_resid_pre"):
        model.run_to_hook(_tokens(), "blocks.9.hook_resid_pre")
    with pytest.raises(UnknownHookError, match="Valid hook names"):
        model.run_to_hook(_tokens(), "blocks.0.resid")
    with pytest.raises(ValueError, match="context"):
        model.run_to_hook(_tokens(t=300), "blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="raw"):
        _native(hf_models, "llama", "centered")
    clean = model.run_clean(_tokens(), "blocks.1.hook_resid_pre")
    with pytest.raises(ValueError, match="keep_kv"):
        model.continue_at(clean, clean.x[:, :1], torch.zeros(3, 1, dtype=torch.long))


def test_smollm2_native_matches_transformers(smollm2, smollm2_hf) -> None:
    """Real pretrained weights: native Llama path vs transformers' LlamaForCausalLM."""
    tokens = smollm2.to_tokens(["The capital of France is Paris, and the capital of Italy is"])
    with torch.no_grad():
        ref = smollm2_hf(tokens).logits
    out = smollm2.logits(tokens)
    # float32_tol: 8 sqrt(30 * 576) eps max|logit| = 4e-3 (measured 5e-5 on one Xeon)
    assert (out - ref).abs().max().item() <= tol(ref, smollm2)
    paris = smollm2.logits(smollm2.to_tokens("The capital of France is"))[0, -1].argmax()
    assert smollm2.tokenizer.decode(paris) == " Paris"


@pytest.mark.slow
@pytest.mark.exact
def test_smollm2_native_matches_transformers_float64(smollm2_float64) -> None:
    """Exactness on real weights: both in float64 agree to rounding (measured: 0.0)."""
    hf, model = smollm2_float64
    tokens = model.to_tokens(["The capital of France is Paris, and the capital of Italy is"])
    with torch.no_grad():
        ref = hf(tokens).logits
    assert (model.logits(tokens) - ref).abs().max().item() <= tol(ref, model)
