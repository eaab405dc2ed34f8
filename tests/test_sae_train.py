"""SAE training recipes and their plumbing: AuxK and resampling revive dead latents, TopK's L0,
unit decoder rows, schedules and the geometric median in closed form, the chunked activation
cache against transformers' own hidden states, held-out evaluation, SAE packs."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import EPS32, assert_close32

from perturb_lens.saes import SAE, SAEConfig, load_sae

D, N_FEAT, N_TOK = 32, 48, 8192


def _dictionary_data(seed: int = 0, n: int = N_TOK) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens made of ~3 of 48 unit features (magnitudes 1-2), and the dictionary."""
    g = torch.Generator().manual_seed(0)
    dictionary = torch.randn(N_FEAT, D, generator=g)
    dictionary = dictionary / dictionary.norm(dim=-1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(n, N_FEAT, generator=g) < 3 / N_FEAT
    return (active * (1 + torch.rand(n, N_FEAT, generator=g))) @ dictionary, dictionary


def _killed_init(kind: str, x: torch.Tensor, folder: Path, d_sae: int = 64) -> SAE:
    """An SAE whose second half of latents never fires: TopK latents with encoder columns 100x
    too small (they never reach the top k, so TopK gives them no gradient); ReLU latents with
    b_enc = -100 (relu passes no gradient)."""
    topk = kind == "topk"
    sae = SAE(
        SAEConfig(
            d_in=D,
            d_sae=d_sae,
            activation="topk" if topk else "relu",
            k=3 if topk else None,
            hook="blocks.0.hook_resid_pre",
        )
    )
    w = torch.randn(d_sae, D, generator=torch.Generator().manual_seed(1))
    w = w / w.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_dec.copy_(x.mean(0))
        if topk:
            sae.W_enc[:, d_sae // 2 :] *= 0.01
        else:
            sae.b_enc[d_sae // 2 :] = -100.0
    sae.save(folder)
    return sae


def _dead_fraction(sae: SAE, x: torch.Tensor) -> float:
    """Latents that fire on no token of ``x`` (computed here, not by the trainer)."""
    with torch.no_grad():
        return float(((sae.encode(x) > 0).sum(0) == 0).float().mean())


def _train(kind: str, tmp: Path, **spec: object) -> tuple[SAE, torch.Tensor, torch.Tensor]:
    from perturb_lens.executors.compute import torch_threads
    from perturb_lens.workflows.sae_training import SAETrainConfig, train_sae

    x, dictionary = _dictionary_data()
    _killed_init(kind, x, tmp / "init")
    base = {"k": 3} if kind == "topk" else {"l1": 2.0}
    cfg = SAETrainConfig(
        model="synthetic",
        d_sae=64,
        lr=3e-3,
        epochs=4,
        batch_tokens=128,
        dead_tokens=2048,
        saes=[{"name": "s", "kind": kind, **base, **spec}],
    )
    with torch_threads(1):  # many small steps: threads only contend here (restored after)
        sae = train_sae(cfg, cfg.saes[0], x, tmp / "s", init=tmp / "init", progress=False)
    return sae, x, dictionary


# ---- dead latents --------------------------------------------------------------------------


def test_auxk_revives_dead_latents_and_topk_l0_is_k(tmp_path: Path) -> None:
    """Half the latents start dead. TopK alone leaves them all dead; with AuxK (1/32) under 10%
    stay dead. The TopK SAE fires exactly k latents on every held-out token."""
    x, _ = _dictionary_data()
    assert _dead_fraction(_killed_init("topk", x, tmp_path / "i"), x) == 0.5
    without, _, _ = _train("topk", tmp_path / "a", aux_coef=0.0)
    with_aux, _, _ = _train("topk", tmp_path / "b")
    assert _dead_fraction(without, x) == 0.5
    assert _dead_fraction(with_aux, x) < 0.1
    held_out, _ = _dictionary_data(seed=1, n=2048)
    with torch.no_grad():
        l0 = (with_aux.encode(held_out) > 0).sum(-1)
    assert bool((l0 == 3).all()), f"L0 per token ranges {int(l0.min())}..{int(l0.max())}"


def test_resampling_revives_dead_relu_latents(tmp_path: Path) -> None:
    """Half the ReLU latents start dead (b_enc = -100): without resampling all stay dead; with
    resampling at 25% and 50% of training under 10% stay dead, and the SAE still recovers most
    of the known dictionary."""
    x, _ = _dictionary_data()
    assert _dead_fraction(_killed_init("local", x, tmp_path / "i"), x) == 0.5
    plain, _, _ = _train("local", tmp_path / "a")
    resampled, _, dictionary = _train("local", tmp_path / "b", resample_at=[0.25, 0.5])
    assert _dead_fraction(plain, x) == 0.5
    assert _dead_fraction(resampled, x) < 0.1
    log = json.loads((tmp_path / "b" / "s" / "train_log.json").read_text())["log"]
    assert next(r["resampled"] for r in log if "resampled" in r) >= 32
    best = (dictionary @ resampled.decoder_directions().T).max(dim=1).values
    assert float((best >= 0.9).float().mean()) >= 0.5


def test_resample_dead_resets_rows_and_adam_moments() -> None:
    """Dead rows get a unit decoder row along a centred input, an encoder column 0.2 x the mean
    alive encoder norm, a zero bias and zero Adam moments; alive rows are untouched."""
    from perturb_lens.saes.recipes import resample_dead

    sae = SAE(SAEConfig(d_in=8, d_sae=6, hook="h"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    opt = torch.optim.Adam(sae.parameters())
    sae(torch.randn(4, 8, generator=g)).pow(2).sum().backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    dead = torch.tensor([False, True, False, False, True, False])
    alive_norm = float(sae.W_enc.detach()[:, ~dead].norm(dim=0).mean())
    x = torch.randn(50, 8, generator=g)
    assert resample_dead(sae, opt, dead, x, torch.Generator().manual_seed(1)) == 2
    for i in (1, 4):
        row = sae.W_dec[i].detach()
        assert abs(float(row.norm()) - 1) < 4 * EPS32  # a unit vector rounded in float32
        centred = x - sae.b_dec.detach()
        cos = (centred @ row) / centred.norm(dim=-1)
        assert float(cos.max()) > 1 - 8 * EPS32  # it is one of the centred inputs, normalised
        enc = sae.W_enc[:, i].detach()
        torch.testing.assert_close(enc, row * 0.2 * alive_norm)
        assert float(sae.b_enc.detach()[i]) == 0.0
        for p, idx in ((sae.W_dec, (i,)), (sae.W_enc, (slice(None), i)), (sae.b_enc, (i,))):
            for key in ("exp_avg", "exp_avg_sq"):
                assert bool((opt.state[p][key][idx] == 0).all())
    for name, p in sae.named_parameters():
        keep = ~dead if name != "b_dec" else slice(None)
        if name == "W_enc":
            assert torch.equal(p.detach()[:, keep], before[name][:, keep])
        else:
            assert torch.equal(p.detach()[keep], before[name][keep])


def test_aux_k_loss_against_a_plain_loop() -> None:
    """AuxK = min(1, n_dead/k_aux) * mean_b ||e_b - sum_{top k_aux dead j} relu(h_bj) W_dec[j]||^2
    with h = (x - b_dec) W_enc + b_enc, written here token by token in float64."""
    from perturb_lens.saes.recipes import aux_k_loss

    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(d_in=5, d_sae=9, hook="h"), dtype=torch.float64)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    e = torch.randn(4, 5, generator=g, dtype=torch.float64)
    dead = torch.tensor([True, False, True, True, False, False, True, False, False])
    w_enc, w_dec = sae.W_enc.detach(), sae.W_dec.detach()
    b_enc, b_dec = sae.b_enc.detach(), sae.b_dec.detach()
    for k_aux in (2, 8):
        total = 0.0
        for b in range(4):
            h = [float((x[b] - b_dec) @ w_enc[:, j] + b_enc[j]) for j in range(9)]
            cand = sorted((h[j], j) for j in range(9) if dead[j])[::-1][:k_aux]
            e_hat = sum(max(v, 0.0) * w_dec[j] for v, j in cand)
            total += float((e[b] - e_hat).pow(2).sum())
        want = min(1.0, 4 / k_aux) * total / 4
        got = float(aux_k_loss(sae, x, e, dead, k_aux).detach())
        assert math.isclose(got, want, rel_tol=1e-12)
    assert float(aux_k_loss(sae, x, e, torch.zeros(9, dtype=torch.bool), 2)) == 0.0


def test_sparse_topk_matches_the_dense_sae_and_its_gradients() -> None:
    """topk_encode + sparse_decode give SAE(x) and, for a loss on it, the same gradients as
    autograd through the dense encode/decode (float64: to 1e-12)."""
    from perturb_lens.saes.recipes import sparse_decode, topk_encode

    g = torch.Generator().manual_seed(0)
    dense = SAE(SAEConfig(d_in=6, d_sae=20, activation="topk", k=4, hook="h"), dtype=torch.float64)
    with torch.no_grad():
        for p in dense.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    sparse = SAE(dense.cfg, dtype=torch.float64)
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(11, 6, generator=g, dtype=torch.float64)
    target = torch.randn(11, 6, generator=g, dtype=torch.float64)
    (dense(x) - target).pow(2).sum().backward()
    vals, idx = topk_encode(sparse, x)
    x_hat = sparse_decode(sparse.W_dec, idx, vals) + sparse.b_dec
    torch.testing.assert_close(x_hat, dense(x), rtol=0, atol=1e-12)
    (x_hat - target).pow(2).sum().backward()
    for (name, p), q in zip(dense.named_parameters(), sparse.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-12, msg=name)


# ---- decoder norm, schedules, init ---------------------------------------------------------


def test_decoder_rows_stay_unit_norm(tmp_path: Path) -> None:
    """After training (saved SAE and the last checkpoint) every decoder row has norm 1 to
    float32 rounding: renormalising sums d squares (error ~ sqrt(d) eps), so sqrt(d) eps x 4."""
    sae, _, _ = _train("topk", tmp_path)
    tol = 4 * math.sqrt(D) * EPS32
    assert float((sae.W_dec.norm(dim=-1) - 1).abs().max()) <= tol
    state = torch.load(tmp_path / "s" / "checkpoint.pt", weights_only=False)["sae"]
    assert float((state["W_dec"].norm(dim=-1) - 1).abs().max()) <= tol


def test_project_decoder_grad_removes_the_radial_part() -> None:
    from perturb_lens.saes.recipes import normalize_decoder, project_decoder_grad

    sae = SAE(SAEConfig(d_in=6, d_sae=4, hook="h"), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(4, 6, generator=g, dtype=torch.float64))
    normalize_decoder(sae)
    sae.W_dec.grad = torch.randn(4, 6, generator=g, dtype=torch.float64)
    project_decoder_grad(sae)
    assert float((sae.W_dec.grad * sae.W_dec).sum(-1).abs().max()) < 1e-15


def test_lr_and_l1_schedules_in_closed_form() -> None:
    """100 steps, 10% warm-up, decay over the last 20%: (s+1)/10 while warming, 1, then
    1 - (s-80)/20 (linear) or (1 + cos(pi (s-80)/20))/2 (cosine)."""
    from perturb_lens.saes.recipes import lr_factor, warmup_factor

    for s, lin, cos in (
        (0, 0.1, 0.1),
        (9, 1.0, 1.0),
        (50, 1.0, 1.0),
        (80, 1.0, 1.0),
        (90, 0.5, 0.5),
        (85, 0.75, (1 + math.cos(math.pi / 4)) / 2),
    ):
        assert math.isclose(lr_factor(s, 100, 0.1, "linear", 0.2), lin)
        assert math.isclose(lr_factor(s, 100, 0.1, "cosine", 0.2), cos)
    assert lr_factor(99, 100, 0.0, "linear", 0.2) == pytest.approx(1 / 20)
    assert [warmup_factor(s, 100, 0.05) for s in (0, 4, 5, 99)] == [0.2, 1.0, 1.0, 1.0]


def test_geometric_median_is_robust() -> None:
    """Collinear points 0, 1, 100 (times a direction): the geometric median is the middle point;
    the symmetric cross around c has median c."""
    from perturb_lens.saes.recipes import geometric_median

    u = torch.tensor([3.0, 4.0]) / 5
    med = geometric_median(torch.stack([0 * u, 1 * u, 100 * u]), iters=500, tol=1e-12)
    assert float((med - u).norm()) < 1e-3  # Weiszfeld converges sublinearly at a data point
    c = torch.tensor([2.0, -1.0])
    cross = c + torch.tensor([[1.0, 0], [-1, 0], [0, 3], [0, -3]])
    torch.testing.assert_close(geometric_median(cross), c)


# ---- activation cache ----------------------------------------------------------------------


def test_split_flagged_closed_form() -> None:
    """BOS goes to ``bos``, tokens above factor x the median norm to ``outlier``, the rest in
    order to ``x``."""
    from perturb_lens.saes.cache import split_flagged

    x = torch.ones(2, 4, 3)
    x[0, 2] *= 50.0  # norm 50 sqrt(3) > 10 x median sqrt(3)
    parts = split_flagged(x, skip_bos=True, outlier_factor=10.0)
    assert parts["bos"].shape == (2, 3) and parts["outlier"].shape == (1, 3)
    assert parts["x"].shape == (5, 3) and torch.equal(parts["outlier"][0], x[0, 2])
    kept = split_flagged(x, skip_bos=False, outlier_factor=None)
    assert kept["x"].shape == (8, 3) and kept["bos"].shape == (0, 3)


def test_cache_matches_transformers_and_streams_every_token_once(
    llama_dir: Path, tmp_path: Path
) -> None:
    """The cache holds transformers' own hidden state at blocks.1 (BOS apart); a shuffled pass
    (buffers of 2 of 4 chunks, batches not dividing the count) visits every token once, a pass
    resumed at batch 3 is that pass's tail, and another seed gives another order."""
    from transformers import AutoModelForCausalLM

    from perturb_lens.models.load import load_model
    from perturb_lens.saes.cache import ActivationCache

    model = load_model(str(llama_dir))
    tokens = torch.randint(3, 1000, (10, 7), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = model.bos_token_id

    def build(rows: torch.Tensor) -> ActivationCache:
        return ActivationCache.build(
            model,
            rows,
            "blocks.1.hook_resid_pre",
            tmp_path / "c",
            batch_seqs=3,
            outlier_factor=None,
            progress=False,
            buffer_chunks=2,
        )

    cache = build(tokens)
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True).hidden_states[1]
    assert cache.counts == [18, 18, 18, 6] and cache.n_tokens == 60
    assert_close32(
        torch.cat([cache.chunk(i)["x"] for i in range(4)]),
        ref[:, 1:].reshape(-1, ref.shape[-1]),
        n_layers=1,
    )
    assert_close32(cache.flagged("bos"), ref[:, 0], n_layers=1)
    all_x = torch.cat([cache.chunk(i)["x"] for i in range(4)])
    batches = list(cache.batches(7, seed=5))
    assert [b.shape[0] for b in batches] == [7] * 8 + [4]
    seen = torch.cat(batches)
    # every token exactly once: match each seen row to its cached row (rows are distinct)
    match = (seen[:, None, :] == all_x[None, :, :]).all(-1)
    assert bool((match.sum(0) == 1).all()) and bool((match.sum(1) == 1).all())
    assert not torch.equal(seen, all_x)  # shuffled
    tail = torch.cat(list(cache.batches(7, seed=5, start=3)))
    assert torch.equal(tail, seen[21:])
    assert not torch.equal(torch.cat(list(cache.batches(7, seed=6))), seen)
    # a second build reads the finished cache; other tokens are refused
    again = build(tokens)
    assert again.counts == cache.counts
    with pytest.raises(ValueError, match="caches other activations"):
        build(tokens[:4])


def test_train_saes_streams_from_disk_and_evaluates_held_out(
    llama_dir: Path, tmp_path: Path
) -> None:
    """train_saes caches to chunks, trains topk with AuxK and local with resampling, and writes
    eval.json whose EV and L0 match a plain computation on transformers' hidden states of the
    held-out rows (BOS reported apart), plus tokens/s in train_log.json."""
    from transformers import AutoModelForCausalLM

    from perturb_lens.models.load import load_model
    from perturb_lens.workflows.sae_training import SAETrainConfig, train_saes

    model = load_model(str(llama_dir))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 1000, (16, 9), generator=g)
    tokens[:, 0] = model.bos_token_id
    held = torch.randint(3, 1000, (6, 9), generator=g)
    held[:, 0] = model.bos_token_id
    cfg = SAETrainConfig(
        model=str(llama_dir),
        hook="blocks.1.hook_resid_pre",
        d_sae=48,
        epochs=2,
        batch_tokens=32,
        cache_batch_seqs=4,
        buffer_chunks=2,
        eval_ce_seqs=3,
        saes=[
            {"name": "t", "kind": "topk", "k": 4},
            {"name": "l", "kind": "local", "l1": 0.05, "resample_at": [0.5]},
        ],
    )
    import perturb_lens.data.text as data_mod

    with pytest.MonkeyPatch.context() as mp:  # held-out rows without a text file
        mp.setattr(data_mod, "dataset_tokens", lambda d, m, progress=True: held)
        cfg = cfg.model_copy(update={"eval_data": cfg.data.model_copy(update={"source": "x"})})
        folders = train_saes(cfg, tmp_path / "o", model=model, tokens=tokens, progress=False)
    assert len(list((tmp_path / "o" / "activations" / cfg.hook).glob("chunk_*.safetensors"))) == 4
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        ref = hf(held, output_hidden_states=True).hidden_states[1]
    for folder in folders.values():
        sae = load_sae(folder)
        ev = json.loads((folder / "eval.json").read_text())
        log = json.loads((folder / "train_log.json").read_text())
        assert log["tokens"] == 2 * 16 * 8 and log["tokens_per_s"] > 0
        for group, xs in (("tokens", ref[:, 1:]), ("bos", ref[:, :1])):
            xs = xs.reshape(-1, ref.shape[-1])
            sse = float((sae.double()(xs) - xs).pow(2).sum())
            sae.float()
            assert ev[group]["n"] == xs.shape[0]
            # float32 activations and SAE against float64 here: each of the 64-term products
            # rounds to ~sqrt(64) eps relative, so 1e-4 relative on sums of squares covers it
            assert math.isclose(ev[group]["mse"], sse / xs.shape[0], rel_tol=1e-4)
            if group == "bos":  # the same activation in every row: no variance to explain
                assert ev[group]["explained_variance"] is None
            else:
                want_ev = 1 - sse / float((xs - xs.mean(0)).pow(2).sum())
                assert abs(ev[group]["explained_variance"] - want_ev) < 1e-4
        assert ev["outlier"]["n"] == 0 and 0 <= ev["dead_fraction"] <= 1
        assert set(ev["ce"]) >= {"ce_increase", "kl"} and ev["ce"]["n"] == 3 * 7
    assert json.loads((folders["t"] / "eval.json").read_text())["tokens"]["l0"] == 4.0


# ---- packs ---------------------------------------------------------------------------------


def _two_saes(folder: Path) -> list[Path]:
    from test_saes import random_sae

    out = []
    for i, kw in enumerate(({"activation": "relu"}, {"activation": "topk", "k": 5})):
        sae = random_sae(seed=i, **kw)
        sae.save(folder / f"sae{i}")
        (folder / f"sae{i}" / "eval.json").write_text(json.dumps({"tokens": {"l0": i}}))
        out.append(folder / f"sae{i}")
    (folder / "train_config.json").write_text(json.dumps({"d_sae": 40}))
    return out


def test_pack_unpack_round_trip_and_refuse_tampering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packed SAEs load (by pack:NAME/ID and by archive path) with identical weights; the
    manifest has hooks, sha256s, training config and held-out metrics; an archive with one
    changed weight byte is refused, naming the file."""
    from perturb_lens.saes.pack import SAEPackError, pack_saes, unpack

    monkeypatch.setenv("PERTURB_LENS_CACHE", str(tmp_path / "cache"))
    folders = _two_saes(tmp_path / "trained")
    archive = pack_saes(folders, tmp_path / "p.tar.gz", name="demo", version="1")
    installed = unpack(archive)
    manifest = json.loads((installed / "manifest.json").read_text())
    assert manifest["saes"]["sae1"]["hook"] == "blocks.1.hook_resid_pre"
    assert manifest["saes"]["sae1"]["train_config"] == {"d_sae": 40}
    assert manifest["saes"]["sae1"]["heldout"] == {"tokens": {"l0": 1}}
    assert set(manifest["saes"]["sae0"]["files"]) == {
        "cfg.json",
        "sae_weights.safetensors",
        "eval.json",
    }
    for i, folder in enumerate(folders):
        want = load_sae(folder).state_dict()
        for ref in (f"pack:demo/sae{i}", f"pack:demo@1/sae{i}", f"{archive}:sae{i}"):
            got = load_sae(ref).state_dict()
            assert all(torch.equal(got[k], v) for k, v in want.items())
    with pytest.raises(SAEPackError, match="holds SAEs"):
        load_sae(str(archive))
    with pytest.raises(SAEPackError, match="no SAE 'nope'"):
        load_sae("pack:demo/nope")
    with pytest.raises(SAEPackError, match="not installed"):
        load_sae("pack:other/sae0")
    # tamper: flip one byte of a weight file inside the archive
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    key = "demo/sae1/sae_weights.safetensors"
    data = bytearray(members[key])
    data[-1] ^= 0x01
    members[key] = bytes(data)
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        import io

        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(SAEPackError, match=r"sae1/sae_weights\.safetensors: sha256 differs"):
        unpack(bad, tmp_path / "elsewhere")
    # a file changed after installing is refused on load too
    (installed / "sae0" / "cfg.json").write_text("{}")
    with pytest.raises(SAEPackError, match=r"cfg\.json: sha256 differs"):
        load_sae("pack:demo/sae0")


def test_cli_pack_and_unpack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from perturb_lens.cli.app import app

    monkeypatch.setenv("PERTURB_LENS_CACHE", str(tmp_path / "cache"))
    folders = [str(f) for f in _two_saes(tmp_path / "trained")]
    archive = tmp_path / "demo-2.tar.gz"
    run = CliRunner().invoke
    res = run(
        app,
        ["sae", "pack", *folders, "--name", "demo", "--version", "2", "--archive", str(archive)],
    )
    assert res.exit_code == 0, res.output
    res = run(app, ["sae", "unpack", str(archive)])
    assert res.exit_code == 0 and "pack:demo@2/sae1" in res.output, res.output
    res = run(app, ["sae", "pack", str(tmp_path), "--name", "x"])
    assert res.exit_code == 1 and "not a trained SAE folder" in res.output
    assert "Traceback" not in res.output


def test_cli_train_reports_throughput_and_held_out_metrics(
    llama_dir: Path, webtext_path: Path, tmp_path: Path
) -> None:
    """`sae train` with eval_data prints tokens/s and the held-out EV, L0, dead fraction and CE
    increase; eval_data equal to the training text is refused without a traceback."""
    import yaml
    from typer.testing import CliRunner

    from perturb_lens.cli.app import app

    data = {"source": str(webtext_path), "seq_len": 8, "n_seqs": 6}
    held = tmp_path / "held.jsonl"  # the last documents: text the training rows do not reach
    held.write_text("".join(webtext_path.read_text().splitlines(keepends=True)[-50:]))
    cfg = {
        "model": str(llama_dir),
        "hook": "blocks.1.hook_resid_pre",
        "data": data,
        "eval_data": {**data, "source": str(held)},
        "eval_ce_seqs": 2,
        "d_sae": 32,
        "batch_tokens": 16,
        "saes": [{"name": "a", "kind": "topk", "k": 3}],
    }
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    run = CliRunner().invoke
    res = run(app, ["sae", "train", str(tmp_path / "t.yaml"), "--out", str(tmp_path / "o"), "-q"])
    assert res.exit_code == 0, res.output
    assert "tokens/s" in res.output and "held-out EV" in res.output and "dCE" in res.output
    same = {**data, "split": "test"}  # a split means nothing to a local file: still the same text
    (tmp_path / "same.yaml").write_text(yaml.safe_dump({**cfg, "eval_data": same}))
    res = run(app, ["sae", "train", str(tmp_path / "same.yaml"), "--out", str(tmp_path / "p")])
    assert res.exit_code == 1 and "held-out metrics need other text" in res.output
    assert "Traceback" not in res.output


def test_unpack_refuses_paths_outside_the_pack(tmp_path: Path) -> None:
    """An archive whose manifest names an SAE '../evil' (so its files would land outside the
    install folder) is refused before anything is written."""
    import hashlib
    import io

    from perturb_lens.saes.pack import SAEPackError, unpack

    blob = b"{}"
    manifest = {
        "format": 1,
        "name": "demo",
        "version": "1",
        "saes": {"../evil": {"files": {"cfg.json": hashlib.sha256(blob).hexdigest()}}},
    }
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in (
            ("demo/manifest.json", json.dumps(manifest).encode()),
            ("demo/../evil/cfg.json", blob),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(SAEPackError, match=r"entry 'demo/\.\./evil/cfg\.json' is not demo/"):
        unpack(archive, tmp_path / "inst")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "inst").exists()


def test_topk_e2e_saes_sit_at_the_local_saes_l0(llama_dir: Path, tmp_path: Path) -> None:
    """e2e and e2e+ds SAEs with ``k`` are TopK SAEs: fine-tuned from a topk SAE of the same k,
    every token has exactly k active latents (L0 matched, not tuned); their KL objective moved
    the weights; specs without a sparsity are refused."""
    from pydantic import ValidationError

    from perturb_lens.models.load import load_model
    from perturb_lens.workflows.sae_training import SAETrainConfig, SAETrainEntry, train_saes

    with pytest.raises(ValidationError, match="needs l1 > 0"):
        SAETrainEntry(name="x", kind="e2e")
    with pytest.raises(ValidationError, match="use kind topk"):
        SAETrainEntry(name="x", kind="local", l1=1.0, k=4)
    model = load_model(str(llama_dir))
    tokens = torch.randint(3, 1000, (8, 10), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = model.bos_token_id
    cfg = SAETrainConfig(
        model=str(llama_dir),
        hook="blocks.1.hook_resid_pre",
        d_sae=48,
        epochs=1,
        batch_tokens=32,
        e2e_seqs=4,
        e2e_batch_seqs=2,
        e2e_epochs=2,
        saes=[
            {"name": "local", "kind": "topk", "k": 5},
            {"name": "e2e", "kind": "e2e", "k": 5, "init_from": "local"},
            {"name": "ds", "kind": "e2e+ds", "k": 5, "init_from": "local"},
        ],
    )
    folders = train_saes(cfg, tmp_path / "o", model=model, tokens=tokens, progress=False)
    x = torch.randn(50, model.spec.d_model, generator=torch.Generator().manual_seed(2))
    local = load_sae(folders["local"])
    for name in ("e2e", "ds"):
        sae = load_sae(folders[name])
        assert sae.cfg.activation == "topk" and sae.cfg.k == 5
        f, _ = sae.encode_decode(x)
        assert torch.equal((f != 0).sum(-1), torch.full((50,), 5))
        assert not torch.equal(sae.W_enc, local.W_enc)  # the e2e objective trained it
        log = json.loads((folders[name] / "train_log.json").read_text())["log"]
        assert log[-1]["l0"] == 5.0 and "kl" in log[-1]
