"""Native Gemma 3, Gemma 2 and Qwen 2 against transformers' own models, and every engine scope
against the naive loop (tests/naive.py), on random small configs whose sequences (32 tokens) run
past the sliding window (8 keys) of their sliding layers.

Every comparison runs in float32, within :func:`conftest.float32_tol` (each of n blocks rounds
dot products over d terms: ~sqrt(n d) eps of the largest value compared, times 8 for kernels that
sum in another order), and in float64 as an exactness test: 1e-10 of the largest value compared
(float64 rounding is ~1e-16 per operation; any real discrepancy is of the order of the values).
Observed on one Xeon: logits equal bit for bit in float32 and float64 (Gemma 2 float64: 8e-16).
In float64 the references compute wholly in float64: transformers rounds inside its RMSNorms and
its eager softmax to float32 even for float64 weights, so those two casts are lifted (norms in the
input dtype; SDPA attention, or for Gemma 2, whose soft-capping SDPA lacks, eager attention with
its softmax in the input dtype), as ``conftest.llama_in_float64`` does for Llama.

Real weights (``gemma3-270m``, ``qwen2.5-0.5b``; slow, skipped unless their GGUF is in the cache):
logits against transformers on the same converted folder, also past Gemma's 512-token window.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from collections.abc import Iterator

import pytest
import torch
from conftest import assert_grad_is_central_difference, float32_tol
from naive import hooked_forward
from torch import Tensor, nn

from perturb_lens.common.hooks import HOOK_KINDS
from perturb_lens.models import registry
from perturb_lens.models.gemma import Gemma2Lens, Gemma3Lens
from perturb_lens.models.generic import GenericLens
from perturb_lens.models.named import named_model
from perturb_lens.models.native import NativeLens
from perturb_lens.models.qwen2 import Qwen2Lens

VOCAB, WINDOW, T = 512, 8, 32  # sequences of T tokens run past the window
FAMILIES = ("gemma3", "gemma2", "qwen2")
LENSES = {"gemma3": Gemma3Lens, "gemma3-softcap": Gemma3Lens, "gemma2": Gemma2Lens}
LENSES["qwen2"] = Qwen2Lens
DTYPES = [torch.float32, pytest.param(torch.float64, marks=pytest.mark.exact)]
SHAPE = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def make_hf(name: str) -> nn.Module:
    """A random small transformers model of ``name`` (weights noised, so every norm weight, bias
    and layer matters), float32, eval mode."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(sorted(LENSES).index(name))
    gemma = {**SHAPE, "head_dim": 16, "sliding_window": WINDOW, "query_pre_attn_scalar": 24}
    if name.startswith("gemma3"):
        rope = {  # local and global bases far apart, so a layer using the other one shows
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
        }
        cap = 2.0 if name == "gemma3-softcap" else None
        cfg = Gemma3TextConfig(
            **gemma, sliding_window_pattern=2, rope_parameters=rope, final_logit_softcapping=cap
        )
        model = Gemma3ForCausalLM(cfg)
    elif name == "gemma2":
        cfg = Gemma2Config(**gemma, attn_logit_softcapping=3.0, final_logit_softcapping=4.0)
        model = Gemma2ForCausalLM(cfg)
    else:  # sliding window on layers >= 2 (Qwen's max_window_layers), untied unembedding
        cfg = Qwen2Config(
            **SHAPE,
            tie_word_embeddings=False,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=2,
        )
        model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.set_attn_implementation("eager" if name == "gemma2" else "sdpa")
    return model.eval()


# ---- float64 references: transformers with its float32 casts lifted -------------------------
def _gemma_norm64(self, x: Tensor) -> Tensor:
    """Gemma's RMSNorm, ``norm(x) * (1 + w)``, in the input dtype (no float32 cast)."""
    return self._norm(x) * (1.0 + self.weight)


def _llama_norm64(self, h: Tensor) -> Tensor:
    """Qwen 2's (Llama's) RMSNorm in the input dtype."""
    var = h.pow(2).mean(-1, keepdim=True)
    return self.weight * (h * torch.rsqrt(var + self.variance_epsilon))


def _eager_attention64(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs
):
    """transformers' Gemma 2 eager attention with its softmax in the input dtype."""
    g = module.num_key_value_groups
    key, value = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.softmax(w, dim=-1)
    return torch.matmul(w, value).transpose(1, 2).contiguous(), w


def in_float64(hf: nn.Module) -> nn.Module:
    """A float64 copy of ``hf`` that computes wholly in float64."""
    hf = copy.deepcopy(hf).to(torch.float64)
    for m in hf.modules():
        if type(m).__name__.endswith("RMSNorm"):
            gemma = type(m).__name__.startswith("Gemma")
            m.forward = types.MethodType(_gemma_norm64 if gemma else _llama_norm64, m)
    return hf


@pytest.fixture(scope="module", params=DTYPES, ids=["float32", "float64"])
def pairs(request) -> Iterator[dict[str, tuple[nn.Module, NativeLens]]]:
    """name -> (transformers' model, the native lens of its weights), in float32, then float64."""
    dtype = request.param
    with pytest.MonkeyPatch.context() as mp:
        if dtype == torch.float64:
            from transformers.models.gemma2 import modeling_gemma2

            mp.setattr(modeling_gemma2, "eager_attention_forward", _eager_attention64)
        out = {}
        for name, lens_cls in LENSES.items():
            hf = make_hf(name)
            hf = in_float64(hf) if dtype == torch.float64 else hf
            out[name] = (hf, lens_cls.from_hf(hf, None, dtype=dtype))
        yield out


def tol(ref: Tensor, model: NativeLens) -> float:
    """float64: 1e-10 of the largest value compared; float32: conftest.float32_tol."""
    if ref.dtype == torch.float64:
        return 1e-10 * ref.abs().max().item()
    return float32_tol(ref, model.spec.n_layers, model.spec.d_model)


def tokens(b: int = 2, t: int = T, seed: int = 0) -> Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def err(got: Tensor, ref: Tensor) -> float:
    return (got.double() - ref.double()).abs().max().item()


# ---- the forward --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LENSES))
def test_hidden_states_and_logits_match_transformers(pairs, name: str) -> None:
    """Every resid_pre, the final normed state and the logits (soft-capped where the config says)
    equal transformers' own, over 32 tokens: past the window of the sliding layers."""
    hf, model = pairs[name]
    toks = tokens()
    with torch.no_grad():
        out = hf(toks, output_hidden_states=True)
    for layer in range(model.spec.n_layers):
        x = model.run_to_hook(toks, f"blocks.{layer}.hook_resid_pre")
        assert err(x, out.hidden_states[layer]) <= tol(out.hidden_states[layer], model), layer
    final = model.run_clean(toks, "blocks.0.hook_resid_pre").final
    assert err(final, out.hidden_states[-1]) <= tol(out.hidden_states[-1], model)
    logits = model.logits(toks)
    assert logits.dtype == model.w_unembed.dtype
    assert err(logits, out.logits) <= tol(out.logits, model)


def test_sliding_windows_and_layout(pairs) -> None:
    """What the lenses read from the configs: windows per layer, scales, soft-caps, tying."""
    g3, g2, qw = (pairs[n][1] for n in ("gemma3", "gemma2", "qwen2"))
    assert g3.windows == [WINDOW, None, WINDOW, None] == g2.windows
    assert qw.windows == [None, None, WINDOW, WINDOW]
    assert g3.attn_scale == g2.attn_scale == 24**-0.5 and qw.attn_scale is None
    assert (g3.attn_softcap, g3.final_softcap) == (None, None)
    assert (g2.attn_softcap, g2.final_softcap) == (3.0, 4.0)
    assert pairs["gemma3-softcap"][1].final_softcap == 2.0
    assert g3.linear_unembedding() is not None and g2.linear_unembedding() is None
    # per-layer rotary bases (Gemma 3): local 100, global 10000
    local, glob = g3.rope[0][0], g3.rope[1][0]  # type: ignore[index]
    assert local[1].item() == pytest.approx(100 ** (-2 / 16)) and glob[1].item() == pytest.approx(
        10000 ** (-2 / 16)
    )
    hf_q = pairs["qwen2"][0]
    assert not torch.equal(hf_q.lm_head.weight, hf_q.model.embed_tokens.weight)  # untied
    assert err(qw.w_unembed, hf_q.lm_head.weight) == 0.0
    spec = {n: pairs[n][1].spec for n in FAMILIES}
    flags = {
        n: (s.family, s.norm, s.rotary_dim, s.activation, s.gated_mlp) for n, s in spec.items()
    }
    assert flags == {
        "gemma3": ("gemma3", "rmsnorm", 16, "gelu_pytorch_tanh", True),
        "gemma2": ("gemma2", "rmsnorm", 16, "gelu_pytorch_tanh", True),
        "qwen2": ("qwen2", "rmsnorm", 16, "silu", True),
    }


# ---- hooks: what is added to the residual ---------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_branch_outputs_sum_to_the_residual(pairs, name: str) -> None:
    """hook_attn_out and hook_mlp_out are transformers' branch outputs after Gemma's post-norms
    (the outputs of post_attention_layernorm / post_feedforward_layernorm; Qwen 2: of self_attn
    and mlp), and resid_post = resid_pre + attn_out + mlp_out."""
    hf, model = pairs[name]
    toks = tokens()
    with torch.no_grad():
        hidden = hf(toks, output_hidden_states=True).hidden_states
    reads = [f"blocks.{layer}.{k}" for layer in range(model.spec.n_layers) for k in HOOK_KINDS]
    got = model.run_clean(toks, "blocks.0.hook_resid_pre", reads=reads).reads
    for layer in range(model.spec.n_layers):
        for kind in ("hook_attn_out", "hook_mlp_out"):
            ref, _, _ = hooked_forward(hf, toks, layer, kind, None)
            assert err(got[f"blocks.{layer}.{kind}"], ref) <= tol(ref, model), (layer, kind)
        pre, a, m, post = (got[f"blocks.{layer}.{k}"] for k in HOOK_KINDS)
        assert err(pre + a + m, post) <= tol(post, model)
        if layer + 1 < model.spec.n_layers:  # transformers' last hidden state is final-normed
            assert err(post, hidden[layer + 1]) <= tol(hidden[layer + 1], model)


@pytest.mark.parametrize("kind", HOOK_KINDS)
@pytest.mark.parametrize("name", FAMILIES)
def test_every_hook_kind_matches_hooked_transformers(pairs, name: str, kind: str) -> None:
    """Perturb each kind of hook at block 1 (a full-attention layer after a sliding one): all
    positions, and single positions alone (before and past the window), against module hooks
    on transformers' model."""
    hf, model = pairs[name]
    toks = tokens(seed=6)
    clean = model.run_clean(toks, f"blocks.1.{kind}", keep_kv=True)
    g = torch.Generator().manual_seed(7)
    delta = torch.randn(clean.x.shape, generator=g, dtype=clean.x.dtype) * 2.0
    final, _ = model.continue_all(clean, (clean.x + delta).unsqueeze(1))
    _, ref, _ = hooked_forward(hf, toks, 1, kind, lambda h: h + delta)
    assert err(final[:, 0], ref) <= tol(ref, model)
    positions = torch.tensor([[0, 9, 31], [20, 4, 30]])
    rows = torch.arange(2)[:, None], positions
    final_at, _ = model.continue_at(clean, clean.x[rows] + delta[rows], positions)
    for b in range(2):
        for i, p in enumerate(positions[b].tolist()):

            def add_one(h: Tensor, b: int = b, p: int = p) -> Tensor:
                h[b, p] += delta[b, p]
                return h

            _, ref, _ = hooked_forward(hf, toks, 1, kind, add_one)
            assert err(final_at[b, i], ref[b, p]) <= tol(ref, model), (b, p)
    assert err(final_at[0, 2], clean.final[0, 31]) > 1e-3  # it did change


def test_single_position_sees_only_its_window(pairs) -> None:
    """A row at a sliding layer attends to the WINDOW clean keys ending at itself: changing the
    clean key just outside the window of the last position leaves that row's output of the layer
    unchanged, bit for bit; changing the oldest key inside it does not."""
    _, model = pairs["gemma3"]
    clean = model.run_clean(tokens(b=1, seed=2), "blocks.2.hook_resid_pre", keep_kv=True)
    at, read = torch.tensor([[T - 1]]), ["blocks.2.hook_resid_post"]  # layer 2 is sliding
    x = clean.x[:, T - 1 :] + 1.0
    ref = model.continue_at(clean, x, at, reads=read)[1][read[0]]
    for key_pos, inside in ((T - 1 - WINDOW, False), (T - WINDOW, True)):
        k, v = clean.cache.kv[2]
        k = k.clone()
        k[:, :, key_pos] += 5.0
        moved = dataclasses.replace(
            clean, cache=dataclasses.replace(clean.cache, kv={**clean.cache.kv, 2: (k, v)})
        )
        got = model.continue_at(moved, x, at, reads=read)[1][read[0]]
        assert (err(got, ref) > 0.0) == inside, key_pos


# ---- every engine scope against the naive loop ---------------------------------------------
@pytest.mark.parametrize("scope", ["all-positions", "single-position", "last-position"])
@pytest.mark.parametrize("name", FAMILIES)
def test_engine_scopes_match_naive(pairs, name: str, scope: str) -> None:
    """The engine on each family, 32-token sequences (past the 8-key window), perturbing block 1's
    resid_pre, against one transformers forward per length and per position (single-position:
    every position, most of them past the window; Gemma 2's soft-capped logits take the engine's
    full-distribution KL)."""
    from test_engine import compare_to_naive, float32_tolerances  # shared with test_engine

    hf, model = pairs[name]
    toks = tokens(seed=1)
    kl_err, l2_err = compare_to_naive(hf, model, toks, 1, scope, [0.0, 1.0, 4.0, 15.0])
    if model.dtype == torch.float64:
        assert kl_err <= 1e-10 and l2_err <= 1e-10
    else:
        kl_tol, l2_tol = float32_tolerances(model, toks, 1)
        assert kl_err <= kl_tol and l2_err <= l2_tol


def test_continue_all_grad_reaches_x_new(pairs) -> None:
    """Gemma 3 is differentiable like the other native families (end-to-end SAE training): the
    gradient of a final state equals a central difference."""
    _, model = pairs["gemma3"]
    clean = model.run_clean(tokens(b=1, t=12), "blocks.1.hook_attn_out")
    assert_grad_is_central_difference(model, clean, (5, 3))


@pytest.mark.parametrize("name", ["gemma3", "gemma2"])
def test_generic_path_reads_the_same_hooks(pairs, name: str) -> None:
    """native=False (hooks on transformers' model) reads attn_out and mlp_out after the
    post-norms too, and a perturbation there continues the same way."""
    hf, model = pairs[name]
    if model.dtype == torch.float64:
        pytest.skip("the generic path's own exactness is tested in test_generic")
    generic = GenericLens.from_hf(copy.deepcopy(hf), None)
    toks = tokens(seed=4)
    for kind in ("hook_attn_out", "hook_mlp_out"):
        a = model.run_clean(toks, f"blocks.2.{kind}")
        b = generic.run_clean(toks, f"blocks.2.{kind}")
        assert err(a.x, b.x) <= tol(b.x, model)
        x_new = (a.x * 1.5).unsqueeze(1)
        fa, _ = model.continue_all(a, x_new)
        fb, _ = generic.continue_all(b, x_new)
        assert err(fa, fb) <= tol(fb, model)


def test_registered_families() -> None:
    """Architectures route to the new families; GGUF architectures load natively."""
    assert registry.family_for("Gemma3ForCausalLM").name == "gemma3"
    assert registry.family_for("Gemma2ForCausalLM").name == "gemma2"
    assert registry.family_for("Qwen2ForCausalLM").name == "qwen2"
    assert {"gemma3", "gemma2", "qwen2"} <= set(registry.native_gguf_archs())
    for name in ("gemma3", "gemma2", "qwen2"):
        assert registry.get_family(name).lens_class().family == name


def test_bidirectional_gemma_is_refused() -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(**SHAPE, head_dim=16, use_bidirectional_attention=True)
    with pytest.raises(ValueError, match="native=False"):
        Gemma3Lens.from_hf(Gemma3ForCausalLM(cfg), None)


# ---- real weights ---------------------------------------------------------------------------
def _cached(name: str) -> None:
    model = named_model(name)
    assert model is not None
    if not model.cache_path().is_file():
        pytest.skip(
            f"{name}'s GGUF is not in the cache ({model.cache_path()}); fetch it once: "
            f"python -m perturb_lens.models.named {name}"
        )


# Gemma 3 base needs its BOS; Qwen 2.5 is trained without one (the project's rows start with
# <|endoftext|>, after which it answers " the")
REAL = [
    ("gemma3-270m", "gemma3", "The capital of France is the city of", True),
    ("qwen2.5-0.5b", "qwen2", "The capital of France is", False),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "family", "prompt", "bos"), REAL)
def test_real_weights_match_transformers(name: str, family: str, prompt: str, bos: bool) -> None:
    """The real files: native logits equal transformers' on the same converted folder (float32
    tolerance: 8 sqrt(n d) eps max|logit|), the capital of France is Paris, and for Gemma 3 a
    600-token sequence (past its 512-token window) agrees at every position past 500."""
    _cached(name)
    from perturb_lens import load_model

    lens = load_model(name, device="cpu")
    hf = load_model(name, native=False, device="cpu").model
    hf.set_attn_implementation("sdpa")
    assert lens.spec.family == family
    toks = lens.to_tokens(["The capital of France is Paris, and the capital of Italy is"])
    with torch.no_grad():
        ref = hf(toks).logits
    assert err(lens.logits(toks), ref) <= float32_tol(ref, lens.spec.n_layers, lens.spec.d_model)
    top = lens.logits(lens.to_tokens(prompt, prepend_bos=bos))[0, -1].argmax()
    assert lens.tokenizer.decode(top) == " Paris"
    if family == "gemma3":
        long = torch.randint(0, 20000, (1, 600), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = hf(long).logits[0, 500:]
        got = lens.logits(long)[0, 500:]
        assert err(got, ref) <= float32_tol(ref, lens.spec.n_layers, lens.spec.d_model)
