"""Objects from the notebook: TransformerLens HookedTransformers, transformers PreTrainedModels
and SAELens SAEs in; the reference is each library's own forward (``run_with_hooks``)."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import EPS32, SMALL_CONFIG, save_random_model

from perturb_lens import load_model, run_experiment
from perturb_lens.engine.sweep import SweepPlan, clean_pass, sweep
from perturb_lens.models.hooked import HookedGenericLens, HookedTransformerLens
from perturb_lens.results import load_manifest, load_results
from perturb_lens.saes import load_sae

HAS_TL = importlib.util.find_spec("transformer_lens") is not None
HAS_SAELENS = importlib.util.find_spec("sae_lens") is not None
needs_tl = pytest.mark.skipif(
    not HAS_TL, reason="transformer_lens is not installed (pip install 'perturb-lens[tl]')"
)
needs_saelens = pytest.mark.skipif(
    not HAS_SAELENS, reason="sae_lens is not installed (pip install 'perturb-lens[sae]')"
)
SCOPES = ["all-positions", "single-position", "last-position"]
LENGTHS = [0.0, 1.0, 4.0]
VOCAB = 61
# small HookedTransformer layouts: which lens each should land on
LAYOUTS: dict[str, tuple[dict, type | None]] = {
    "gpt2-processed": ({"act_fn": "gelu_new"}, None),  # LN, learned positions; processed below
    "llama": (
        {
            "act_fn": "silu",
            "normalization_type": "RMS",
            "positional_embedding_type": "rotary",
            "rotary_dim": 8,
            "gated_mlp": True,
            "n_key_value_heads": 2,
        },
        None,
    ),
    "neox": (
        {
            "act_fn": "gelu",
            "positional_embedding_type": "rotary",
            "rotary_dim": 4,  # partial rotary
            "parallel_attn_mlp": True,
        },
        None,
    ),
    "shortformer": ({"positional_embedding_type": "shortformer"}, HookedGenericLens),
}


def make_ht(layout: str, dtype: torch.dtype = torch.float64):
    """A random 3-layer HookedTransformer from a config (no hub); weights get extra noise so every
    layer matters. ``gpt2-processed`` is then processed as ``from_pretrained`` does by default
    (fold_ln, center_writing_weights, center_unembed, fold_value_biases)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    kw, _ = LAYOUTS[layout]
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=32, d_head=8, n_heads=4, d_mlp=64, n_ctx=32, d_vocab=VOCAB,
        dtype=dtype, seed=0, **kw,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ht = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ht.named_parameters():
            if not (cfg.gated_mlp and name.endswith("mlp.b_in")):  # TL adds it after the gate
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    if layout == "gpt2-processed":
        ht.load_and_process_state_dict(
            ht.state_dict(),
            fold_ln=True,
            center_writing_weights=True,
            center_unembed=True,
            fold_value_biases=True,
        )
    return ht.eval()


def tl_reference(ht, tokens, hook: str, dirs, scope: str, read: str) -> dict:
    """{(seq, pos, length): (kl, l2)} written plainly: one ``run_with_hooks`` per length (and per
    position) with a hook that adds ``length * direction`` to the activation at ``hook``."""

    def run(add):
        seen = {}

        def perturb(act, hook):
            return act + add.to(act.dtype)

        def keep(act, hook):
            seen["read"] = act.detach().double()

        with torch.no_grad():
            logits = ht.run_with_hooks(tokens, fwd_hooks=[(hook, perturb), (read, keep)])
        return logits.double().log_softmax(-1), seen["read"]

    lp0, read0 = run(torch.zeros_like(dirs))
    b, t, _ = dirs.shape
    out = {}
    for alpha in LENGTHS:
        if scope == "all-positions":
            lp, rd = run(alpha * dirs)
            kl = (lp0.exp() * (lp0 - lp)).sum(-1)
            l2 = (rd - read0).norm(dim=-1)
            for s in range(b):
                out |= {(s, p, alpha): (float(kl[s, p]), float(l2[s, p])) for p in range(t)}
            continue
        for s in range(b):
            for p in range(t) if scope == "single-position" else [t - 1]:
                add = torch.zeros_like(dirs)
                add[s, p] = alpha * dirs[s, p]
                lp, rd = run(add)
                kl = (lp0[s, p].exp() * (lp0[s, p] - lp[s, p])).sum()
                out[(s, p, alpha)] = (float(kl), float((rd[s, p] - read0[s, p]).norm()))
    return out


def compare_to_tl(ht, lens, hook: str, scope: str) -> tuple[float, float]:
    """Largest |KL diff| and largest |L2 diff| / ||clean read|| between the engine's rows and
    :func:`tl_reference`, for random unit directions."""
    tokens = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    plan = SweepPlan(hook=hook, lengths=LENGTHS, scope=scope)
    clean = clean_pass(lens, tokens, plan)
    g = torch.Generator().manual_seed(3)
    d = F.normalize(torch.randn(clean.x.shape, generator=g, dtype=torch.float64), dim=-1)
    df = sweep(lens, clean, {"random": d.to(clean.x.dtype)}, plan)
    read = lens.default_read
    ref = tl_reference(ht, tokens, hook, d.to(clean.x.dtype), scope, read)
    norm = clean.reads[read].double().norm(dim=-1)
    assert len(df) == len(ref)
    kl_err = l2_err = 0.0
    for r in df.itertuples():
        kl_ref, l2_ref = ref[(r.seq, r.pos, float(r.length))]
        kl_err = max(kl_err, abs(r.kl - kl_ref))
        l2_err = max(l2_err, abs(r.l2 - l2_ref) / float(norm[r.seq, r.pos]))
    return kl_err, l2_err


@needs_tl
@pytest.mark.exact
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hooked_transformer_matches_run_with_hooks(layout: str, scope: str) -> None:
    """float64 through and through: the lens (native for supported layouts, TL hooks for the
    rest) and TransformerLens agree to float64 rounding (measured ~1e-15), far below 1e-9."""
    ht = make_ht(layout)
    lens = load_model(ht)
    assert isinstance(lens, LAYOUTS[layout][1] or HookedTransformerLens)
    kl_err, l2_err = compare_to_tl(ht, lens, "blocks.1.hook_resid_pre", scope)
    assert kl_err <= 1e-9 and l2_err <= 1e-9


@needs_tl
@pytest.mark.exact
@pytest.mark.parametrize("kind", ["hook_attn_out", "hook_mlp_out", "hook_resid_post"])
def test_hooked_transformer_other_hooks(kind: str) -> None:
    """Every hook kind, on the processed GPT-2 layout and the parallel (NeoX) one."""
    for layout in ("gpt2-processed", "neox"):
        ht = make_ht(layout)
        for scope in ("all-positions", "single-position"):
            kl_err, l2_err = compare_to_tl(ht, load_model(ht), f"blocks.1.{kind}", scope)
            assert kl_err <= 1e-9 and l2_err <= 1e-9, (layout, scope)


@needs_tl
@pytest.mark.parametrize("scope", SCOPES)
def test_hooked_transformer_float32(scope: str) -> None:
    """float32: the native forward and TransformerLens' round differently. Each of the n = 2
    blocks after the hook rounds dot products over d = 32 terms (relative sqrt(d) eps each), so
    reads differ by ~sqrt(n d) eps relative and their L2 by at most n sqrt(d) eps; a logit errs by
    sqrt(n d) eps max|logit| and KL by 4 sqrt(n d) eps max|logit| (as in test_engine's
    float32_tolerances). Both stay below the issue's 1e-4."""
    ht = make_ht("gpt2-processed", torch.float32)
    lens = load_model(ht)
    kl_err, l2_err = compare_to_tl(ht, lens, "blocks.1.hook_resid_pre", scope)
    n, d = 2, 32
    tokens = torch.arange(8).unsqueeze(0)
    max_logit = ht(tokens).abs().max().item()
    assert kl_err <= min(1e-4, 4 * (n * d) ** 0.5 * EPS32 * max_logit)
    assert l2_err <= min(1e-4, n * d**0.5 * EPS32)


@needs_tl
def test_frame_follows_processing(tmp_path: Path) -> None:
    """center_writing_weights -> centered, recorded in the run's meta with the processing;
    unprocessed -> raw; asking for the other frame is refused with the fix."""
    processed, raw = make_ht("gpt2-processed"), make_ht("neox")
    assert load_model(processed).frame == "centered" and load_model(raw).frame == "raw"
    with pytest.raises(ValueError, match="center_writing_weights=False"):
        load_model(processed, frame="raw")
    tokens = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
    cfg = {"hook": "blocks.1.hook_resid_pre", "lengths": [0, 1], "dtype": "float64",
           "directions": ["isotropic"], "stats": {"n_seqs": 4, "pool_size": 8}}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fit-size warning: a tiny fit on purpose
        run = run_experiment(cfg, tmp_path / "run", model=processed, tokens=tokens, progress=False)
    meta = load_manifest(run)["meta"]
    assert meta["frame"] == "centered"
    assert "HookedTransformer" in meta["model_source"]
    assert "center_writing_weights=True" in meta["model_source"]


@needs_tl
def test_hooked_transformer_without_tokenizer_needs_tokens(tmp_path: Path) -> None:
    cfg = {"hook": "blocks.1.hook_resid_pre", "lengths": [1], "directions": ["isotropic"],
           "data": {"seq_len": 16}}  # fmt: skip
    with pytest.raises(ValueError, match="no tokenizer"):
        run_experiment(cfg, tmp_path / "run", model=make_ht("neox"), progress=False)


def test_unknown_object_is_refused() -> None:
    with pytest.raises(TypeError, match="HookedTransformer"):
        load_model(object())


# ---- transformers objects ------------------------------------------------------------------


def _hf_object(arch: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64))
    return LlamaForCausalLM(
        LlamaConfig(**{**SMALL_CONFIG, "hidden_size": 32}, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    )  # fmt: skip


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_object_equals_its_saved_folder(arch: str, tmp_path: Path) -> None:
    """A PreTrainedModel object runs on the same lens as its saved folder, with identical rows."""
    obj = _hf_object(arch)
    folder = save_random_model(obj, tmp_path / "model")  # noise added in place, then saved
    tokens = torch.randint(0, 50257, (4, 12), generator=torch.Generator().manual_seed(0))
    cfg = {"model": str(folder), "hook": "blocks.1.hook_resid_pre", "lengths": [0, 1, 4],
           "directions": ["isotropic", "cov-random-mixture"], "scope": "single-position",
           "stats": {"n_seqs": 4, "pool_size": 16}}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_path = run_experiment(cfg, tmp_path / "path", tokens=tokens, progress=False)
        by_obj = run_experiment(cfg, tmp_path / "obj", model=obj, tokens=tokens, progress=False)
    assert type(load_model(obj)) is type(load_model(folder))
    assert load_model(obj).tokenizer is None  # built in memory: no folder to read one from
    from transformers import AutoModelForCausalLM

    reloaded = load_model(AutoModelForCausalLM.from_pretrained(folder))
    assert reloaded.tokenizer is not None and str(folder) in reloaded.source  # its folder's
    pd.testing.assert_frame_equal(load_results(by_obj), load_results(by_path))


# ---- SAELens objects -----------------------------------------------------------------------


def _saelens_sae(kind: str, d_in: int, hook: str):
    """A sae_lens SAE of ``kind`` built from its config, random weights (no hub)."""
    import sae_lens

    cls, cfg_cls, kw = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 8}),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {}),
    }[kind]
    cfg = cfg_cls(d_in=d_in, d_sae=96, **kw)
    cfg.metadata.hook_name = hook
    sae = cls(cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / d_in**0.5)
    return sae


@needs_tl
@needs_saelens
@pytest.mark.parametrize("kind", ["standard", "topk", "jumprelu"])
def test_saelens_object_equals_its_saved_folder(kind: str, tmp_path: Path) -> None:
    hook = "blocks.1.hook_resid_pre"
    ht = make_ht("gpt2-processed", torch.float32)  # centered, as SAEs on processed GPT-2 read
    sae = _saelens_sae(kind, 32, hook)
    sae.save_model(str(tmp_path / "sae"))
    ours, back = load_sae(sae), load_sae(tmp_path / "sae")
    assert ours.cfg == back.cfg
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    tokens = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
    cfg = {"hook": hook, "lengths": [0, 1, 4], "directions": ["sae-feature", "isotropic"],
           "stats": {"n_seqs": 4, "pool_size": 16}}  # fmt: skip
    runs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, ref in (("obj", sae), ("path", str(tmp_path / "sae"))):
            runs[name] = run_experiment(
                {**cfg, "sae": None}, tmp_path / name, model=ht, tokens=tokens, sae=ref,
                progress=False,
            )  # fmt: skip
    pd.testing.assert_frame_equal(load_results(runs["obj"]), load_results(runs["path"]))


# ---- the run handle ------------------------------------------------------------------------


@needs_tl
def test_run_handle(tmp_path: Path) -> None:
    """run_experiment returns a Run: still the Path it wrote to, with the results one call away
    and an inline view (summary table, verdicts, main figure)."""
    from matplotlib.figure import Figure

    from perturb_lens import Run, open_run
    from perturb_lens.analysis import curves
    from perturb_lens.analysis.tables import summary_table
    from perturb_lens.results.sketch import DEFAULT_ALPHA
    from perturb_lens.results.summary import summary_rows

    tokens = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
    cfg = {"hook": "blocks.1.hook_resid_pre", "lengths": [0, 1, 4],
           "directions": ["isotropic", "real-difference", "real-mixture"],
           "stats": {"n_seqs": 4, "pool_size": 16}}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_experiment(
            cfg, tmp_path / "run", model=make_ht("neox", torch.float32), tokens=tokens,
            progress=False,
        )  # fmt: skip
    assert isinstance(run, Run) and isinstance(run, Path) and run == tmp_path / "run"
    assert (run / "manifest.json").is_file() and str(run) == str(tmp_path / "run")
    assert run.meta["model"] == "HookedTransformer:custom"  # not the default model's name
    pd.testing.assert_frame_equal(run.rows(), load_results(tmp_path / "run"))
    # the handle's curves are streamed (exact means, sketch quantiles): against pandas on the rows
    got = run.curves("l2").set_index(["direction", "length"])
    ref = curves(summary_rows(run), "l2").set_index(["direction", "length"]).loc[got.index]
    assert (got["n"] == ref["n"]).all()
    # the same float64 sums in another order: relative error <= n terms x 2^-53
    np.testing.assert_allclose(got["mean"], ref["mean"], rtol=int(got["n"].max()) * 2.0**-53)
    # medians from the sketch: within its relative accuracy alpha
    assert (
        np.abs(got["median"] - ref["median"]) <= DEFAULT_ALPHA * ref["median"].abs() * (1 + 1e-12)
    ).all()
    assert list(run.summary("l2").columns) == list(
        summary_table(summary_rows(run), metrics=("l2",)).columns
    )
    assert set(run.verdicts().claim) >= {"real-difference > real-mixture"}
    html = open_run(tmp_path / "run")._repr_html_()
    assert "Verdicts" in html and "<svg" in html and "real-mixture" in html
    assert isinstance(run.figure("fig1"), Figure) and isinstance(run.figure("all_l2"), Figure)
    with pytest.raises(ValueError, match="its figures are: fig1_kl"):
        run.figure("fig9")
    with pytest.raises(Exception, match="manifest"):
        open_run(tmp_path)
