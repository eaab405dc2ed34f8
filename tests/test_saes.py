"""SAEs: activations, SAELens folders (and SAELens itself when installed), e2e_sae checkpoints,
training on a known dictionary, statistics against a naive computation, SAE directions."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import EPS32, assert_close32, float32_tol, logit_bound

from perturb_lens.saes import SAE, SAEConfig, SAELoadError, SAEMismatchError, load_sae
from perturb_lens.saes.io import HUB_RELEASES, load_e2e_checkpoint, split_release

REPO = Path(__file__).resolve().parents[1]
HAS_SAELENS = importlib.util.find_spec("sae_lens") is not None


def random_sae(
    d_in: int = 16, d_sae: int = 40, seed: int = 0, **kw: object
) -> SAE:  # weights large enough that some latents fire and some do not
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, hook="blocks.1.hook_resid_pre", **kw))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if sae.threshold is not None:
            sae.threshold.copy_(torch.rand(d_sae, generator=g))
    return sae.requires_grad_(False)


@pytest.mark.parametrize(
    "kw",
    [
        {"activation": "relu"},
        {"activation": "relu", "apply_b_dec_to_input": False},
        {"activation": "topk", "k": 5},
        {"activation": "jumprelu"},
    ],
)
def test_encode_decode_match_formulas(kw: dict) -> None:
    sae = random_sae(**kw)
    x = torch.randn(3, 7, 16)
    xin = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    h = xin @ sae.W_enc + sae.b_enc
    if kw["activation"] == "relu":
        f = torch.relu(h)
    elif kw["activation"] == "jumprelu":
        f = torch.relu(h) * (h > sae.threshold)
    else:
        top = h.topk(5, dim=-1)
        f = torch.zeros_like(h).scatter(-1, top.indices, torch.relu(top.values))
        assert int((sae.encode(x) > 0).sum(-1).max()) <= 5
    # the same formulas, kernels may sum in another order (float32_tol): the encoder is a layer
    # of 16-term dot products, encoder and decoder two layers of at most 40 terms
    assert_close32(sae.encode(x), f, 1, 16)
    assert_close32(sae(x), f @ sae.W_dec + sae.b_dec, 2, 40)
    assert_close32(sae.error(x), sae(x) - x, 2, 40)


def test_normalize_activations_semantics() -> None:
    x = torch.randn(4, 16) * 7 + 3
    sae = random_sae(normalize_activations="constant_norm_rescale")
    c = 16**0.5 / x.norm(dim=-1, keepdim=True)
    plain = random_sae()
    # float32_tol with the input scaling (a norm or mean and std over 16 terms) as one more layer
    assert_close32(sae.encode(x), plain.encode(x * c), 2, 16)
    assert_close32(sae(x), plain(x * c) / c, 3, 40)
    ln = random_sae(normalize_activations="layer_norm")
    mu, std = x.mean(-1, keepdim=True), (x - x.mean(-1, keepdim=True)).std(-1, keepdim=True)
    assert_close32(ln(x), plain((x - mu) / (std + 1e-5)) * std + mu, 3, 40)


@pytest.mark.parametrize("kw", [{}, {"activation": "topk", "k": 4}, {"activation": "jumprelu"}])
def test_save_load_roundtrip(tmp_path: Path, kw: dict) -> None:
    sae = random_sae(frame="centered", model="gpt2", skip_bos=True, **kw)
    sae.save(tmp_path / "s")
    back = load_sae(tmp_path / "s")
    assert (back.cfg.frame, back.cfg.skip_bos, back.hook) == ("centered", True, sae.hook)
    x = torch.randn(5, 16)
    assert torch.equal(back.encode(x), sae.encode(x)) and torch.equal(back(x), sae(x))


def test_legacy_saelens_cfg_is_read(tmp_path: Path) -> None:
    """The pre-6 flat cfg.json (hook_point, activation_fn_str, activation_fn_kwargs)."""
    sae = random_sae(activation="topk", k=3)
    sae.save(tmp_path)
    cfg = {
        "d_in": 16,
        "d_sae": 40,
        "hook_point": "blocks.1.hook_resid_pre",
        "model_name": "gpt2-small",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3},
        "apply_b_dec_to_input": True,
        "normalize_activations": False,
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    back = load_sae(tmp_path)
    assert (back.cfg.activation, back.cfg.k, back.frame) == ("topk", 3, "centered")
    x = torch.randn(6, 16)
    torch.testing.assert_close(back(x), sae(x))


def test_check_compatible_names_the_problem() -> None:
    sae = random_sae(frame="raw")
    sae.check_compatible("blocks.1.hook_resid_pre", 16, "raw")
    with pytest.raises(SAEMismatchError, match=r"d_in=16 differs from d_model=32.*trained at"):
        sae.check_compatible("blocks.2.hook_resid_pre", 32, "raw")
    with pytest.raises(SAEMismatchError, match="reads 'raw' activations"):
        sae.check_compatible("blocks.1.hook_resid_pre", 16, "centered")


def test_release_refs_and_offline_error(monkeypatch: pytest.MonkeyPatch) -> None:
    assert split_release("gpt2-small-res-jb:blocks.6.hook_resid_pre") == (
        "gpt2-small-res-jb",
        "blocks.6.hook_resid_pre",
    )
    assert split_release("gpt2-small-res_scefr-ajt/blocks.6.hook_resid_pre")[0] == (
        "gpt2-small-res_scefr-ajt"
    )
    assert HUB_RELEASES["gpt2-small-res_slefr-ajt"] == (
        "neuronpedia/gpt2-small__res_slefr-ajt",
        "{layer}-res_slefr-ajt",
    )
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # as if not installed
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SAELoadError, match="Could not fetch"):
        load_sae("gpt2-small-res_sle-ajt:blocks.6.hook_resid_pre")
    with pytest.raises(SAELoadError, match="needs sae_lens"):
        load_sae("some-other-release:blocks.6.hook_resid_pre")


# ---- SAELens itself ------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_SAELENS, reason="sae_lens is not installed (pip install sae-lens)")
@pytest.mark.parametrize("kw", [{}, {"activation": "topk", "k": 4}, {"activation": "jumprelu"}])
def test_saelens_reads_ours_and_we_read_saelens(tmp_path: Path, kw: dict) -> None:
    from sae_lens import SAE as LensSAE

    ours = random_sae(**kw)
    ours.save(tmp_path / "ours")
    lens = LensSAE.load_from_disk(str(tmp_path / "ours"))
    x = torch.randn(9, 16)
    # two implementations of the same formulas (float32_tol): an encoder layer of 16-term dot
    # products, a decoder layer of 40; a forward is both
    assert_close32(lens.encode(x), ours.encode(x), 1, 16)
    assert_close32(lens.decode(ours.encode(x)), ours(x), 1, 40)
    assert lens.cfg.metadata.hook_name == ours.hook
    lens.save_model(str(tmp_path / "theirs"))
    back = load_sae(tmp_path / "theirs")
    assert_close32(back.encode(x), lens.encode(x), 1, 16)
    assert_close32(back(x), lens(x), 2, 40)


# ---- e2e_sae checkpoints -------------------------------------------------------------------


def _e2e_state(hooks: list[str], d_in: int = 12, d_sae: int = 30) -> dict[str, torch.Tensor]:
    """A state dict in e2e_sae's SAETransformer.saes layout (random weights)."""
    g = torch.Generator().manual_seed(3)
    state = {}
    for hook in hooks:
        key = hook.replace(".", "-")
        state[f"{key}.encoder.0.weight"] = torch.randn(d_sae, d_in, generator=g)
        state[f"{key}.encoder.0.bias"] = torch.randn(d_sae, generator=g)
        state[f"{key}.decoder.weight"] = torch.randn(d_in, d_sae, generator=g) * 3
        state[f"{key}.decoder.bias"] = torch.randn(d_in, generator=g)
    return state


def _e2e_forward(state: dict[str, torch.Tensor], key: str, x: torch.Tensor) -> torch.Tensor:
    """e2e_sae's forward written out: ReLU encoder, decoder with unit-norm columns."""
    c = torch.relu(x @ state[f"{key}.encoder.0.weight"].T + state[f"{key}.encoder.0.bias"])
    w = state[f"{key}.decoder.weight"]
    return c @ (w / w.norm(dim=0, keepdim=True)).T + state[f"{key}.decoder.bias"]


def test_e2e_checkpoint_loads_identically(tmp_path: Path) -> None:
    state = _e2e_state(["blocks.6.hook_resid_pre"])
    torch.save(state, tmp_path / "samples_400000.pt")
    (tmp_path / "final_config.yaml").write_text(
        yaml.safe_dump(
            {
                "tlens_model_name": "gpt2",
                "saes": {
                    "sae_positions": "blocks.6.hook_resid_pre",
                    "dict_size_to_input_ratio": 2.5,
                },
            }
        )
    )
    torch.save(_e2e_state(["blocks.6.hook_resid_pre"]), tmp_path / "samples_1000.pt")
    sae = load_sae(tmp_path)  # the folder: latest checkpoint + its config
    assert (sae.hook, sae.frame, sae.cfg.model, sae.d_sae) == (
        "blocks.6.hook_resid_pre",
        "centered",
        "gpt2",
        30,
    )
    assert sae.cfg.metadata["checkpoint"].endswith("samples_400000.pt")
    x = torch.randn(7, 12)
    expected = _e2e_forward(state, "blocks-6-hook_resid_pre", x)
    # float32_tol: encoder (12 terms) and decoder (30) as two layers; 9.4e-5 (measured 1.9e-6)
    assert_close32(sae(x), expected, 2, 30)
    torch.testing.assert_close(sae.decoder_directions().norm(dim=-1), torch.ones(30))


def test_e2e_checkpoint_with_several_saes_needs_a_hook(tmp_path: Path) -> None:
    state = _e2e_state(["blocks.2.hook_resid_pre", "blocks.6.hook_resid_pre"])
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(SAELoadError, match="pick one with hook="):
        load_e2e_checkpoint(tmp_path / "ckpt.pt")
    sae = load_e2e_checkpoint(tmp_path / "ckpt.pt", hook="blocks.2.hook_resid_pre")
    x = torch.randn(4, 12)
    expected = _e2e_forward(state, "blocks-2-hook_resid_pre", x)
    assert_close32(sae(x), expected, 2, 30)  # as above (measured 9.5e-7)


# ---- training ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", [{"kind": "local", "l1": 2.0}, {"kind": "topk", "k": 3}], ids=["local", "topk"]
)
def test_training_recovers_a_known_dictionary(tmp_path: Path, spec: dict) -> None:
    """Activations made from 48 unit features (about 3 active per token, magnitudes 1-2):
    >= 90% of the true features have a decoder row at cosine >= 0.9."""
    from perturb_lens.executors.compute import torch_threads
    from perturb_lens.workflows.sae_training import SAETrainConfig, train_sae

    g = torch.Generator().manual_seed(0)
    d, n_feat, n = 32, 48, 8192
    dictionary = torch.randn(n_feat, d, generator=g)
    dictionary = dictionary / dictionary.norm(dim=-1, keepdim=True)
    active = torch.rand(n, n_feat, generator=g) < 3 / n_feat
    x = (active * (1 + torch.rand(n, n_feat, generator=g))) @ dictionary
    cfg = SAETrainConfig(
        model="synthetic",
        d_sae=64,
        lr=3e-3,
        epochs=16,
        batch_tokens=128,
        saes=[{"name": "s", **spec}],
    )
    with torch_threads(1):  # many small steps: threads only contend here (restored after)
        sae = train_sae(cfg, cfg.saes[0], x, tmp_path / "s", progress=False)
    best = (dictionary @ sae.decoder_directions().T).max(dim=1).values
    assert float((best >= 0.9).float().mean()) >= 0.9
    assert load_sae(tmp_path / "s").cfg.activation == ("topk" if spec["kind"] == "topk" else "relu")


def test_train_saes_all_objectives_and_resume(llama_dir: Path, tmp_path: Path) -> None:
    """local, topk, e2e and e2e+ds train on a tiny model; a finished set is skipped; an
    interrupted SAE resumes from its checkpoint to the same weights."""
    from perturb_lens.models.load import load_model
    from perturb_lens.workflows.sae_training import SAETrainConfig, train_saes

    model = load_model(str(llama_dir))
    tokens = torch.randint(3, 1000, (12, 10), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = model.bos_token_id
    cfg = SAETrainConfig(
        model=str(llama_dir),
        hook="blocks.1.hook_resid_pre",
        d_sae=48,
        epochs=2,
        batch_tokens=32,
        e2e_seqs=4,
        e2e_batch_seqs=2,
        e2e_epochs=1,
        checkpoint_every=2,
        saes=[
            {"name": "local", "kind": "local", "l1": 0.05},
            {"name": "topk", "kind": "topk", "k": 4},
            {"name": "e2e", "kind": "e2e", "l1": 0.01},
            {"name": "ds", "kind": "e2e+ds", "l1": 0.01, "init_from": "local"},
            {"name": "l2", "kind": "local", "l1": 0.05, "hook": "blocks.2.hook_resid_pre"},
        ],
    )
    folders = train_saes(cfg, tmp_path / "a", model=model, tokens=tokens, progress=False)
    for name, folder in folders.items():
        sae = load_sae(folder)
        assert sae.hook == f"blocks.{2 if name == 'l2' else 1}.hook_resid_pre" and sae.cfg.skip_bos
        log = json.loads((folder / "train_log.json").read_text())["log"]
        assert ("kl" in log[-1]) == (name in ("e2e", "ds")) and ("ds" in log[-1]) == (name == "ds")
    # interrupt "local" after its first checkpoint, then resume: same weights as uninterrupted
    from perturb_lens.workflows import sae_training as train_mod

    calls = {"n": 0}
    real = train_mod._Step.__call__

    def crash_after_two(self, sae, idx):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(self, sae, idx)

    one = cfg.model_copy(update={"saes": cfg.saes[:1]})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod._Step, "__call__", crash_after_two)
        with pytest.raises(KeyboardInterrupt):
            train_saes(one, tmp_path / "b", model=model, tokens=tokens, progress=False)
    assert (tmp_path / "b" / "local" / "checkpoint.pt").is_file()
    train_saes(one, tmp_path / "b", model=model, tokens=tokens, progress=False)
    a, b = load_sae(tmp_path / "a" / "local"), load_sae(tmp_path / "b" / "local")
    for name, p in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], p)


# ---- statistics ----------------------------------------------------------------------------


def test_sae_stats_against_naive(llama_dir: Path) -> None:
    """L0, EV, CE and KL against one plain HF forward with SAE(x) patched in."""
    from naive import forward_with_edit, kl
    from transformers import AutoModelForCausalLM

    from perturb_lens.models.load import load_model
    from perturb_lens.saes.quality import sae_stats

    model = load_model(str(llama_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir)).float().eval()
    d = model.spec.d_model
    sae = random_sae(d_in=d, d_sae=80, seed=1)
    with torch.no_grad():
        sae.W_enc.mul_(0.3)
        sae.W_dec.mul_(0.2)
    tokens = torch.randint(3, 1000, (3, 9), generator=torch.Generator().manual_seed(2))
    tokens[:, 0] = model.bos_token_id
    (st,) = sae_stats(sae, model, tokens, batch_seqs=2, progress=False)

    x = model.run_to_hook(tokens, sae.hook).float()
    keep = slice(1, 8)  # no BOS, no last position

    def edit(hidden: torch.Tensor) -> None:
        hidden[:, keep] = sae(hidden[:, keep].float()).to(hidden.dtype)

    logits_c, _ = forward_with_edit(hf, tokens, 1, lambda h: None, 3)
    logits_s, _ = forward_with_edit(hf, tokens, 1, edit, 3)
    xs, f = x[:, keep], sae.encode(x[:, keep])
    err = sae(xs) - xs
    lp_c, lp_s = logits_c.log_softmax(-1), logits_s.log_softmax(-1)
    tgt = tokens[:, 2:9, None]
    ce_c = -lp_c[:, keep].gather(-1, tgt).mean()
    ce_s = -lp_s[:, keep].gather(-1, tgt).mean()
    ev = 1 - err.pow(2).sum() / (xs - xs.reshape(-1, d).mean(0)).pow(2).sum()
    assert st.n_tokens == 21 and st.alive + st.dead == 80
    assert st.l0 == pytest.approx(float((f > 0).float().sum(-1).mean()))
    assert st.alive == int((f > 1e-8).reshape(-1, 80).any(0).sum())
    # x comes from the native model in other batches: per token x and SAE(x) err by float32_tol in
    # norm (block 0 of width 64, the SAE of 80: 2 layers), |err| by e, |err|^2 by 2 |err| e + e^2;
    # SST likewise from x alone (1 layer), doubled by the centring. MSE: 1.9e-5 (measured 2.5e-8)
    xc = xs - xs.reshape(-1, d).mean(0)
    e = float32_tol(torch.cat([xs.norm(dim=-1), sae(xs).norm(dim=-1)]), 2, 80)
    mse_tol = (2 * err.norm(dim=-1).max().item() * e + e**2) / d
    e_x = 2 * float32_tol(xs.norm(dim=-1), 1, d)
    sst_rel = (2 * xc.norm(dim=-1).max().item() * e_x + e_x**2) / float(xc.pow(2).sum(-1).mean())
    assert st.mse == pytest.approx(float(err.pow(2).mean()), rel=0, abs=mse_tol)
    # EV = 1 - SSE / SST: the relative errors of SSE and SST add, times SSE / SST = 1 - EV
    # (measured 8.9e-6)
    ev_tol = (1 - float(ev)) * (mse_tol / float(err.pow(2).mean()) + sst_rel)
    assert st.explained_variance == pytest.approx(float(ev), rel=0, abs=ev_tol)
    # as test_engine's float32_tolerances: a logit errs by sqrt(n d) eps max|logit| (n = 4 blocks
    # + the SAE, d <= 80), a CE or KL by 2 such per distribution: 2.0e-5 (measured CE 2.5e-7,
    # KL 7.8e-8)
    max_logit = max(logits_c.abs().max().item(), logits_s.abs().max().item())
    out_tol = 4 * (5 * 80) ** 0.5 * EPS32 * max_logit
    assert st.ce_increase == pytest.approx(float(ce_s - ce_c), rel=0, abs=out_tol)
    assert st.kl == pytest.approx(float(kl(logits_c, logits_s)[:, keep].mean()), rel=0, abs=out_tol)


# ---- directions and the engine -------------------------------------------------------------


def _dctx(sae: SAE, x: torch.Tensor, seqs: torch.Tensor, seq_of_row: torch.Tensor, **opt):
    from perturb_lens.directions.base import DirectionContext

    g = torch.Generator().manual_seed(7)
    return DirectionContext(
        x, None, None, g, options=opt, sae=sae, sequences=seqs, seq_of_row=seq_of_row
    )


def test_sae_feature_is_alive_and_inactive_in_the_sequence() -> None:
    from perturb_lens.directions.base import make_directions

    sae = random_sae(d_in=16, d_sae=60, seed=4)
    with torch.no_grad():
        sae.b_enc.sub_(2.0)  # sparse: most latents silent on most tokens
    seqs = torch.randn(4, 6, 16)
    f = sae.encode(seqs)
    alive = torch.zeros(60, dtype=torch.bool)
    alive[:45] = True
    alive |= (f > 1e-8).reshape(-1, 60).any(0)  # whatever fires here is alive
    sae.alive = alive
    rows = seqs.reshape(-1, 16)
    seq_of_row = torch.arange(4).repeat_interleave(6)
    dirs = make_directions("sae-feature", _dctx(sae, rows, seqs, seq_of_row))
    unit = sae.decoder_directions()
    latent = (dirs @ unit.T).argmax(-1)
    torch.testing.assert_close(dirs, unit[latent])
    active_in_seq = (f > 1e-8).any(1)  # [4, 60]
    assert bool(alive[latent].all())
    assert not bool(active_in_seq[seq_of_row, latent].any())
    assert len(set(latent.tolist())) > 5  # random latents, not one
    act = make_directions("sae-feature", _dctx(sae, rows, seqs, seq_of_row, which="active"))
    lat_a = (act @ unit.T).argmax(-1)
    has = (f.reshape(-1, 60) > 1e-8).any(-1)
    assert bool((f.reshape(-1, 60)[has.nonzero().flatten(), lat_a[has]] > 1e-8).all())
    dead = make_directions("sae-feature", _dctx(sae, rows, seqs, seq_of_row, which="dead"))
    assert not bool(alive[(dead @ unit.T).argmax(-1)].any())


def test_substitution_sweep_reaches_sae_x_and_matches_stats(llama_dir: Path, tmp_path) -> None:
    """sae-error at scale raw, length 1 = SAE(x): its KL equals the stats' KL; the epsilon
    baselines have size ||SAE(x) - x|| per token; BOS is left alone by a skip_bos SAE."""
    import numpy as np

    from perturb_lens import run_experiment
    from perturb_lens.models.load import load_model
    from perturb_lens.results import load_results
    from perturb_lens.saes.quality import sae_stats

    model = load_model(str(llama_dir))
    sae = random_sae(d_in=model.spec.d_model, d_sae=80, seed=1, skip_bos=True)
    with torch.no_grad():
        sae.W_enc.mul_(0.3)
        sae.W_dec.mul_(0.2)
    sae.save(tmp_path / "sae")
    tokens = torch.randint(3, 1000, (4, 8), generator=torch.Generator().manual_seed(2))
    tokens[:, 0] = model.bos_token_id
    cfg = {
        "model": str(llama_dir),
        "hook": "blocks.1.hook_resid_pre",
        "sae": str(tmp_path / "sae"),
        "lengths": [1.0],
        "metrics": ["kl"],
        "data": {"n_seqs": 4, "seq_len": 8},
        "stats": {"pool_size": 16},
        "shard_seqs": 2,
        "directions": [
            {"name": "sae-error", "scale": "raw", "label": "SAE(x)"},
            {"name": "isotropic", "scale": "sae-error"},
            {"name": "real-mixture", "scale": "sae-error"},
        ],
    }
    out = run_experiment(cfg, tmp_path / "run", model=model, tokens=tokens, progress=False)
    df = load_results(out)
    x = model.run_to_hook(tokens, sae.hook).float()
    eps = sae.error(x).norm(dim=-1)
    eps[:, 0] = 0.0
    # |SAE(x) - x| from x of another batch: both x and SAE(x) err by float32_tol in norm (block 0,
    # the SAE: 2 layers, width <= 80): 1.2e-5 of the largest norm (measured 4.8e-7)
    size_tol = float32_tol(torch.cat([x.norm(dim=-1), sae(x).norm(dim=-1)]), 2, 80)
    for _, g in df.groupby("direction"):
        g = g.sort_values(["seq", "pos"])
        np.testing.assert_allclose(g["size"], eps.reshape(-1).numpy(), rtol=0, atol=size_tol)
    sub = df[(df["direction"] == "SAE(x)") & (df["pos"] > 0) & (df["pos"] < 7)]
    (st,) = sae_stats(sae, model, tokens, progress=False)
    # the sweep's KL against the stats' (two code paths): as in test_sae_stats_against_naive,
    # 4 sqrt(5 * 80) eps max|logit|, with logit_bound for |logit| (measured 1.0e-7)
    from transformers import AutoModelForCausalLM

    max_logit = logit_bound(AutoModelForCausalLM.from_pretrained(str(llama_dir)))
    kl_tol = 4 * (5 * 80) ** 0.5 * EPS32 * max_logit
    assert float(sub["kl"].mean()) == pytest.approx(st.kl, rel=0, abs=kl_tol)
    assert (out / "sae_alive.pt").exists() is False  # only sae-feature needs the alive set


def test_run_refuses_an_sae_of_another_hook_before_work(llama_dir: Path, tmp_path) -> None:
    from perturb_lens import run_experiment

    random_sae(d_in=64, d_sae=8).save(tmp_path / "sae")
    cfg = {
        "model": str(llama_dir),
        "hook": "blocks.2.hook_resid_pre",
        "sae": str(tmp_path / "sae"),
        "data": {"n_seqs": 2, "seq_len": 8},
        "directions": [{"name": "sae-error"}],
    }
    with pytest.raises(SAEMismatchError, match=r"trained at 'blocks\.1\.hook_resid_pre'"):
        run_experiment(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "stats.safetensors").exists()


# ---- presets -------------------------------------------------------------------------------


# ---- command line --------------------------------------------------------------------------


def test_cli_train_stats_and_suite(llama_dir: Path, webtext_path: Path, tmp_path: Path) -> None:
    """`sae train` (then refusing to overwrite), `sae stats`, `sae run` on a tiny model."""
    from typer.testing import CliRunner

    from perturb_lens.cli.app import app

    data = {"source": str(webtext_path), "seq_len": 8, "n_seqs": 6}
    train_cfg = {
        "model": str(llama_dir),
        "hook": "blocks.1.hook_resid_pre",
        "data": data,
        "d_sae": 32,
        "epochs": 1,
        "batch_tokens": 16,
        "saes": [{"name": "a", "kind": "local", "l1": 0.05}, {"name": "b", "kind": "topk", "k": 3}],
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train_cfg))
    out = tmp_path / "saes"
    run = CliRunner().invoke
    res = run(app, ["sae", "train", str(tmp_path / "train.yaml"), "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert (out / "a" / "cfg.json").is_file() and (out / "b" / "cfg.json").is_file()
    res = run(app, ["sae", "train", str(tmp_path / "train.yaml"), "--out", str(out), "-q"])
    assert res.exit_code == 1 and "--resume" in res.output
    csv = tmp_path / "stats.csv"
    args = ["sae", "stats", str(out / "a"), str(out / "b"), "--model", str(llama_dir)]
    args += ["--data", str(webtext_path), "--n-seqs", "3", "--seq-len", "8", "--csv", str(csv)]
    res = run(app, [*args, "-q"])
    assert res.exit_code == 0, res.output
    assert "SAE statistics" in res.output and csv.read_text().count("\n") == 3
    assert "explained_variance" in csv.read_text()
    suite = {
        "name": "s",
        "base": {
            "model": str(llama_dir),
            "lengths": [1.0],
            "metrics": ["kl"],
            "data": {**data, "n_seqs": 2},
            "stats": {"pool_size": 8},
            "directions": [
                {"name": "sae-error", "scale": "raw", "label": "SAE(x)"},
                {"name": "isotropic", "scale": "sae-error"},
            ],
        },
        "saes": [{"label": "a", "sae": str(out / "a")}, {"label": "b", "sae": str(out / "b")}],
    }
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    res = run(app, ["sae", "run", str(tmp_path / "suite.yaml"), "--out", str(tmp_path / "r"), "-q"])
    assert res.exit_code == 0, res.output
    import pandas as pd

    summary = pd.read_csv(tmp_path / "r" / "summary.csv")
    assert set(summary["sae"]) == {"a", "b"} and set(summary["direction"]) == {
        "SAE(x)",
        "isotropic",
    }
    sub = summary[summary["direction"] == "SAE(x)"]
    assert (sub["ratio_kl"] == 1.0).all()
