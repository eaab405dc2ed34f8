"""Native GPT-2 / Llama / GPT-NeoX forward against transformers itself and plain hooked HF forwards.

Every comparison runs twice: in float32 with the tolerance :func:`tol` derives from machine
epsilon, depth, width and the magnitudes compared (see :func:`conftest.float32_tol`), and in
float64 as an exactness test (1e-9 of the magnitudes; observed <= 3e-15).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_grad_is_central_difference, float32_tol, llama_in_float64
from naive import forward_with_edit, hooked_forward
from transformers import AutoModelForCausalLM, AutoTokenizer

from perturb_lens.common.hooks import HOOK_KINDS, UnknownHookError
from perturb_lens.models.gpt2 import GPT2Lens
from perturb_lens.models.llama import LlamaLens
from perturb_lens.models.native import NativeLens
from perturb_lens.models.neox import GPTNeoXLens

FAMILIES = {"gpt2": GPT2Lens, "llama": LlamaLens, "neox": GPTNeoXLens}
# every comparison in float32 (derived tolerance) and as an exactness test in float64
DTYPES = [torch.float32, pytest.param(torch.float64, marks=pytest.mark.exact)]


def _hf(folder: Path, dtype: torch.dtype = torch.float32):
    """transformers' model in ``dtype``; in float64 with SDPA attention (the eager one rounds its
    softmax to float32) and, for Llama, RMSNorm without its float32 cast."""
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    model = model.to(dtype)
    if dtype == torch.float64:
        model.set_attn_implementation("sdpa")
        if model.config.model_type == "llama":
            model = llama_in_float64(model)
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module", params=DTYPES, ids=["float32", "float64"])
def hf_models(request, gpt2_dir: Path, llama_dir: Path, neox_dir: Path):
    """transformers' models in float32, then in float64 (exact)."""
    dirs = {"gpt2": gpt2_dir, "llama": llama_dir, "neox": neox_dir}
    return {name: _hf(folder, request.param) for name, folder in dirs.items()}


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


def _hf_logits_with_edit(hf, tokens, layer: int, edit) -> torch.Tensor:
    """Plain reference: a forward pre-hook on block `layer` that edits its input residual."""
    return forward_with_edit(hf, tokens, layer, edit, layer)[0].to(hf.dtype)


@pytest.mark.parametrize(
    ("family", "frame"),
    [
        ("gpt2", "centered"),
        ("gpt2", "raw"),
        ("llama", "raw"),
        ("neox", "centered"),
        ("neox", "raw"),
    ],
)
def test_logits_match_transformers(hf_models, family: str, frame: str) -> None:
    hf, _ = hf_models[family]
    model = _native(hf_models, family, frame)
    tokens = _tokens()
    with torch.no_grad():
        ref = hf(tokens).logits
    assert (model.logits(tokens) - ref).abs().max().item() <= tol(ref, model)


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_pre_matches_hidden_states(hf_models, family: str) -> None:
    hf, _ = hf_models[family]
    model = _native(hf_models, family, "raw")
    tokens = _tokens()
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    for layer in range(model.spec.n_layers):
        x = model.run_to_hook(tokens, f"blocks.{layer}.hook_resid_pre")
        assert (x - hidden[layer]).abs().max().item() <= tol(hidden[layer], model)


@pytest.mark.parametrize("family", FAMILIES)
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


@pytest.mark.parametrize("family", FAMILIES)
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


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", HOOK_KINDS)
def test_every_hook_kind_matches_hooked_transformers(hf_models, family: str, kind: str) -> None:
    """Perturb each kind of hook (for NeoX's parallel block attn_out and mlp_out both leave the
    other branch alone): all positions, and single positions, against HF module hooks."""
    hf, _ = hf_models[family]
    model = _native(hf_models, family, "raw")
    tokens = _tokens(b=2, t=12, seed=6)
    clean = model.run_clean(tokens, f"blocks.1.{kind}", keep_kv=True)
    g = torch.Generator().manual_seed(7)
    delta = torch.randn(clean.x.shape, generator=g, dtype=clean.x.dtype) * 2.0
    final, _ = model.continue_all(clean, (clean.x + delta).unsqueeze(1))
    _, ref, _ = hooked_forward(hf, tokens, 1, kind, lambda h: h + delta)
    assert (final[:, 0] - ref).abs().max().item() <= tol(ref, model)
    positions = torch.tensor([[0, 7], [11, 4]])
    rows = torch.arange(2)[:, None], positions
    final_at, _ = model.continue_at(clean, clean.x[rows] + delta[rows], positions)
    for b in range(2):
        for i, p in enumerate(positions[b].tolist()):

            def add_one(h: torch.Tensor, b: int = b, p: int = p) -> torch.Tensor:
                h[b, p] += delta[b, p]
                return h

            _, ref, _ = hooked_forward(hf, tokens, 1, kind, add_one)
            assert (final_at[b, i] - ref[b, p]).abs().max().item() <= tol(ref, model)
    assert not torch.allclose(final_at[0, 0], clean.final[0, 0], atol=1e-3)  # it did change


@pytest.mark.exact
@pytest.mark.parametrize(
    ("family", "frame"), [("gpt2", "raw"), ("llama", "raw"), ("neox", "raw"), ("neox", "centered")]
)
def test_float64_matches_transformers_tightly(request, family: str, frame: str) -> None:
    """In float64 the native path and transformers (SDPA attention, float64 throughout) agree to
    rounding: every resid_pre, and the final normed hidden state (the centered frame too)."""
    hf, _ = _hf(request.getfixturevalue(f"{family}_dir"), torch.float64)
    model = FAMILIES[family].from_hf(hf, None, frame=frame, dtype=torch.float64)
    tokens = _tokens()
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    for layer in range(model.spec.n_layers):
        x = model.run_to_hook(tokens, f"blocks.{layer}.hook_resid_pre")
        assert x.dtype == torch.float64
        ref = hidden[layer]
        if frame == "centered":  # the residual minus its mean over d_model
            ref = ref - ref.mean(-1, keepdim=True)
        assert (x - ref).abs().max().item() <= 1e-12
    final = model.run_clean(tokens, "blocks.0.hook_resid_pre").final
    assert (final - hidden[-1]).abs().max().item() <= 1e-12


@pytest.mark.parametrize("scope", ["all-positions", "single-position", "last-position"])
@pytest.mark.parametrize("family", FAMILIES)
def test_engine_scopes_match_naive(hf_models, family: str, scope: str) -> None:
    """Every engine scope on every native family against the naive loop (tests/naive.py)."""
    from test_engine import compare_to_naive, float32_tolerances  # shared with test_engine

    hf, _ = hf_models[family]
    tokens = torch.randint(0, 50257, (2, 10), generator=torch.Generator().manual_seed(1))
    model = _native(hf_models, family, "raw")
    kl_err, l2_err = compare_to_naive(hf, model, tokens, 2, scope, [0.0, 1.0, 4.0, 15.0])
    if model.dtype == torch.float64:  # exact: see test_engine's float64 tests
        assert kl_err <= 1e-9 and l2_err <= 1e-9
    else:
        kl_tol, l2_tol = float32_tolerances(model, tokens, 2)
        assert kl_err <= kl_tol and l2_err <= l2_tol


@pytest.mark.parametrize("frame", ["raw", "centered"])
def test_sequential_neox_matches_transformers(tmp_path: Path, frame: str) -> None:
    """use_parallel_residual=False (and full rotary): the GPT-2 block layout, still native."""
    from conftest import make_neox_folder

    hf, tok = _hf(make_neox_folder(tmp_path, n_layers=2, parallel=False, rotary_pct=1.0))
    model = GPTNeoXLens.from_hf(hf, tok, frame=frame)
    assert not model.spec.parallel_attn_mlp and model.spec.rotary_dim == model.spec.d_head
    tokens = _tokens()
    with torch.no_grad():
        ref = hf(tokens).logits
    assert (model.logits(tokens) - ref).abs().max().item() <= tol(ref, model)
    clean = model.run_clean(tokens, "blocks.0.hook_attn_out")
    delta = torch.randn(clean.x.shape, generator=torch.Generator().manual_seed(8))
    final, _ = model.continue_all(clean, (clean.x + delta).unsqueeze(1))
    _, ref_final, _ = hooked_forward(hf, tokens, 0, "hook_attn_out", lambda h: h + delta)
    # centered: the residual is off by a multiple of (1, ..., 1), which no LayerNorm sees
    assert (final[:, 0] - ref_final).abs().max().item() <= tol(ref_final, model)


@pytest.mark.parametrize("kind", ["hook_resid_pre", "hook_attn_out"])
def test_continue_all_grad_reaches_x_new(hf_models, kind: str) -> None:
    """NeoX is differentiable like the other native families (end-to-end SAE training): the
    gradient of the final state reaches x_new and equals a central difference."""
    model = _native(hf_models, "neox", "raw")
    clean = model.run_clean(_tokens(b=1, t=6), f"blocks.1.{kind}")
    assert_grad_is_central_difference(model, clean, (2, 5))


def test_layout_flags(hf_models) -> None:
    """The block layout each family declares in its spec."""
    spec = {f: _native(hf_models, f).spec for f in FAMILIES}
    flags = {
        f: (s.parallel_attn_mlp, s.rotary_dim, s.activation, s.gated_mlp) for f, s in spec.items()
    }
    assert flags == {
        "gpt2": (False, 0, "gelu_new", False),
        "llama": (False, 8, "silu", True),
        "neox": (True, 4, "gelu", False),  # rotary_pct 0.25 of d_head 16
    }
    assert spec["neox"].family == "neox" and spec["neox"].architecture == "GPTNeoXForCausalLM"


@pytest.mark.parametrize("family", ["gpt2", "neox"])  # the LayerNorm families
def test_centered_frame_is_raw_minus_mean(hf_models, family: str) -> None:
    raw = _native(hf_models, family, "raw")
    cen = _native(hf_models, family, "centered")
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
