"""Replication table: every evaluator on synthetic runs with known outcomes (clear replication,
clear non-replication, a sample too small to decide), missing runs, and numbers that come from
the runs (computed independently here with pandas / closed forms)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synthetic_runs import REPO, make_run
from test_verdicts import SEQ_LEN, _config, _rows, _set_meta
from typer.testing import CliRunner

from perturb_lens.cli.app import app
from perturb_lens.config.schema import load_config
from perturb_lens.replication import (
    CANNOT_JUDGE,
    NOT_RUN,
    RUNS,
    Row,
    evaluate_claim,
    register_replication,
    replication_results,
    write_replication,
)
from perturb_lens.replication.evaluators import STEEP
from perturb_lens.replication.inference import ks_statistic, sign_test
from perturb_lens.replication.registry import CLAIMS

N_LEN = 21  # curve grid t = 0, 0.05, ..., 1
LEE_PAIR = {"real-difference": 2.0, "real-mixture": 1.0}


def _claims() -> dict:
    """The registered claims by id (registering them first)."""
    return dict(CLAIMS.items())


def _verdict(root: Path, claim_id: str):
    return evaluate_claim(_claims()[claim_id], root)


# -- run builders -------------------------------------------------------------------------------


def _lee_run(root: Path, factors: dict[str, float], n_seq: int = 40, seed: int = 0) -> Path:
    directions = [{"name": d} for d in factors]
    rows = _rows(factors, n_seq=n_seq, seed=seed)
    return make_run(root / "sensitive_directions_lee", _config(directions), rows=rows)


def _step_rows(steps: dict[str, list[int]], column: str = "direction") -> pd.DataFrame:
    """A 0 -> 1 step curve per prompt and label: prompt i of label k jumps at grid step
    ``steps[k][i]``, so its max-slope step and its plateau length (first step above 10% of the
    end value) are exactly that step, and its sharpness is 1."""
    t = np.linspace(0.0, 1.0, N_LEN)
    frames = []
    for label, where in steps.items():
        for seq, s in enumerate(where):
            y = (np.arange(N_LEN) >= s).astype(np.float32)
            frames.append(pd.DataFrame({"seq": seq, "pos": 9, column: label, "length": t, "l2": y}))
    out = pd.concat(frames, ignore_index=True)
    if column == "base":
        out.insert(3, "direction", "isotropic")
    return out


def _curve_run(root: Path, name: str, preset: str, rows: pd.DataFrame) -> Path:
    cfg = load_config(REPO / "configs" / f"{preset}.yaml").model_dump(mode="json")
    return make_run(root / name, {**cfg, "metrics": ["l2"]}, rows=rows)


def _steps(center: int, n: int, seed: int) -> list[int]:
    """``n`` steps spread +-2 around ``center``."""
    return (center + np.random.default_rng(seed).integers(-2, 3, n)).tolist()


def _synthetic_run(root: Path, real: int, cov: int, synth: int, n: int = 40) -> Path:
    steps = {"real": _steps(real, n, 1), "cov-random": _steps(cov, n, 2)}
    steps |= {"synthetic-bag": _steps(synth, n, 3)}
    cfg = load_config(REPO / "configs" / "synthetic_activations_smollm2.yaml")
    keep = [d for d in cfg.model_dump(mode="json")["directions"] if d["label"] in steps]
    run = make_run(
        root / "synthetic_activations",
        {**cfg.model_dump(mode="json"), "metrics": ["l2"], "directions": keep},
        rows=_step_rows(steps),
    )
    return run


def _sae(folder: Path, name: str, kind: str, l0: float, kl: float) -> None:
    folder.joinpath(name).mkdir(parents=True)
    ev = {"tokens": {"n": 100, "l0": l0}, "ce": {"n": 500, "kl": kl, "ce_increase": kl / 2}}
    (folder / name / "eval.json").write_text(json.dumps(ev))
    (folder / name / "cfg.json").write_text(json.dumps({"metadata": {"objective": kind}}))


# -- Lee & Heimersheim: the verdicts' paired bootstrap -------------------------------------------


@pytest.mark.parametrize(
    ("factor", "n_seq", "word"),
    [(2.0, 40, "replicated"), (0.5, 40, "not replicated"), (2.0, 4, "inconclusive")],
)
def test_ordering_claim(tmp_path: Path, factor: float, n_seq: int, word: str) -> None:
    _lee_run(tmp_path, {"real-difference": factor, "real-mixture": 1.0}, n_seq=n_seq)
    res = _verdict(tmp_path, "lee-difference-lee")
    assert res.verdict == word
    assert f"{n_seq} seqs x {SEQ_LEN} tokens" in res.sample


def test_ordering_numbers_are_the_runs(tmp_path: Path) -> None:
    """The ratio range shown is the ratio of the published means, computed here with pandas on
    the rows written (last position dropped; length 0, the noise floor, skipped)."""
    shown = []
    for seed, root in enumerate((tmp_path / "a", tmp_path / "b")):
        factors = {"real-difference": 2.0 + seed, "real-mixture": 1.0}
        rows = _rows(factors, seed=seed)
        rows = rows[(rows["pos"] < SEQ_LEN - 1) & (rows["length"] > 0)]
        means = rows.groupby(["length", "direction"])["kl"].mean().unstack()
        ratio = means["real-difference"] / means["real-mixture"]
        _lee_run(root, factors, seed=seed)
        res = _verdict(root, "lee-difference-lee")
        assert f"{ratio.min():.3g}-{ratio.max():.3g} over" in res.ours
        shown.append(res.ours)
    assert shown[0] != shown[1]


# -- Gurnee: per SAE of a substitution suite ----------------------------------------------------


SUBSTITUTION = [
    {"name": "sae-error", "scale": "raw", "label": "SAE(x)"},
    {"name": "isotropic", "scale": "sae-error"},
]


def _suite(
    root: Path,
    factors: dict[str, float | dict[str, float]],
    n_seq: int = 40,
    *,
    folder: str = "sae_substitution_smollm2",
    directions: list[dict] = SUBSTITUTION,
    lengths: list[float] = [1.0],  # noqa: B006 (read only)
    saes: dict[str, Path] | None = None,
) -> Path:
    """An ``sae run`` suite: one run per SAE label; ``factors[label]`` is the KL factor of the
    first direction (or one per direction label), every other direction's is 1. L0 10, 20, ...
    in saes.json; ``saes``: the SAE folder each label's run config names."""
    labels = [d.get("label", d["name"]) for d in directions]
    for i, (label, f) in enumerate(factors.items()):
        per = f if isinstance(f, dict) else {labels[0]: f}
        rows = _rows({k: per.get(k, 1.0) for k in labels}, n_seq=n_seq, seed=i, lengths=lengths)
        cfg = _config(directions) | ({"sae": str(saes[label])} if saes else {})
        make_run(root / folder / label, cfg, rows=rows)
    l0 = [{"label": k, "l0": 10.0 * (i + 1)} for i, k in enumerate(factors)]
    (root / folder / "saes.json").write_text(json.dumps(l0))
    return root / folder


@pytest.mark.parametrize(
    ("factors", "n_seq", "word"),
    [
        ({"a": 3.0, "b": 2.5}, 40, "replicated"),
        ({"a": 3.0, "b": 0.5}, 40, "not replicated"),
        ({"a": 3.0, "b": 2.5}, 4, "inconclusive"),
    ],
)
def test_sae_substitution_claim(tmp_path: Path, factors: dict, n_seq: int, word: str) -> None:
    _suite(tmp_path, factors, n_seq)
    res = _verdict(tmp_path, "gurnee-sae-error")
    assert res.verdict == word
    assert "a (10)" in res.sample and "b (20)" in res.sample  # L0 from saes.json
    in_range = sum(2.2 <= f <= 4.5 for f in factors.values())  # noise 5%: ratios stay near f
    assert f"({in_range} of 2 in the paper's range)" in res.ours


# -- Braun et al.: matched e2e / local pairs of eval.json ---------------------------------------


@pytest.mark.parametrize(
    ("e2e_kl", "n_pairs", "word", "p"),
    [
        (0.1, 5, "replicated", 0.5**5),
        (0.4, 5, "not replicated", 1.0),
        (0.1, 3, "inconclusive", 0.5**3),  # 3 wins of 3: p = 1/8, not below 0.05
    ],
)
def test_e2e_vs_local(tmp_path: Path, e2e_kl: float, n_pairs: int, word: str, p: float) -> None:
    folder = tmp_path / "sae_train_smollm2_layer15_topk_e2e"
    for i in range(n_pairs):
        _sae(folder, f"local-{i}", "local" if i % 2 else "topk", 10.0 * 2**i, 0.2)
        _sae(folder, f"e2e-{i}", "e2e" if i % 2 else "e2e+ds", 10.0 * 2**i * 1.05, e2e_kl)
    res = _verdict(tmp_path, "braun-e2e")
    assert res.verdict == word
    assert f"{n_pairs} matched pairs" in res.sample
    assert f"p = {p:.3g}" in res.ci_or_test


def test_e2e_without_a_local_sae_at_its_l0(tmp_path: Path) -> None:
    folder = tmp_path / "sae_train_smollm2_layer15_topk_e2e"
    _sae(folder, "local", "local", 10.0, 0.2)
    _sae(folder, "e2e", "e2e", 12.0, 0.1)  # L0 20% apart: no pair
    res = _verdict(tmp_path, "braun-e2e")
    assert res.verdict == "inconclusive" and "0 matched pairs" in res.sample


@pytest.mark.parametrize(
    ("e2e_factor", "n_seq", "word"),
    [(1.0, 40, "replicated"), (4.0, 40, "not replicated"), (1.0, 4, "inconclusive")],
)
def test_e2e_vs_local_paired_on_a_substitution_suite(
    tmp_path: Path, e2e_factor: float, n_seq: int, word: str
) -> None:
    """TopK local and e2e SAEs at equal L0 in one suite: the ratio is mean KL(SAE_e2e(x)) / mean
    KL(SAE_local(x)) over the same sequences (pandas here), judged by its paired CI."""
    _suite(tmp_path, {"topk-k8": 2.0, "e2e-k8": e2e_factor, "other": 2.0}, n_seq)
    saes = tmp_path / "sae_substitution_smollm2" / "saes.json"
    records = [
        {"label": "topk-k8", "l0": 8.0, "type": "topk"},
        {"label": "e2e-k8", "l0": 8.0, "type": "e2e"},
        {"label": "other", "l0": 100.0, "type": "local"},  # no e2e SAE near its L0
    ]
    saes.write_text(json.dumps(records))
    res = _verdict(tmp_path, "braun-e2e-paired")
    assert res.verdict == word
    means = []
    for label in ("e2e-k8", "topk-k8"):
        factor = {"topk-k8": 2.0, "e2e-k8": e2e_factor}[label]
        seed = ["topk-k8", "e2e-k8"].index(label)
        rows = _rows({"SAE(x)": factor, "isotropic": 1.0}, n_seq=n_seq, seed=seed, lengths=[1.0])
        rows = rows[rows["pos"] < SEQ_LEN - 1]
        means.append(rows.loc[rows["direction"] == "SAE(x)", "kl"].mean())
    assert f"e2e-k8 / topk-k8 {means[0] / means[1]:.3g}" in res.ours
    assert "1 matched pairs" in res.sample


# -- Lee & Heimersheim fig. 3-8: per-layer suites, extrapolations, features at matched L0 --------


@pytest.mark.parametrize(
    ("claim_id", "factors", "word"),
    [
        ("gurnee-sae-error-layers", {"L03": 2.0, "L27": 1.6}, "replicated"),
        ("gurnee-sae-error-layers", {"L03": 2.0, "L27": 0.5}, "not replicated"),
        ("lee-real-cov-layers", {"L03": {"real-mixture": 1.5}}, "replicated"),
        ("lee-real-cov-layers", {"L03": {"real-mixture": 0.6}}, "not replicated"),
    ],
)
def test_per_layer_substitution_claims(
    tmp_path: Path, claim_id: str, factors: dict, word: str
) -> None:
    directions = [
        *SUBSTITUTION,
        {"name": "cov-random-mixture", "scale": "sae-error"},
        {"name": "real-mixture", "scale": "sae-error"},
    ]
    _suite(tmp_path, factors, folder="sae_substitution_smollm2_layers", directions=directions)
    res = _verdict(tmp_path, claim_id)
    assert res.verdict == word
    assert "in the paper's range" not in res.ours  # no published range for these


@pytest.mark.parametrize(
    ("factor", "word"), [(1.02, "replicated"), (3.0, "not replicated"), (1.25, "inconclusive")]
)
def test_sae_x_close_to_cov_random(tmp_path: Path, factor: float, word: str) -> None:
    """'~': the interval within [0.8, 1.25] for every SAE replicates; entirely outside for one
    does not; at 1.25 the interval straddles the band's edge and decides nothing."""
    directions = [SUBSTITUTION[0], {"name": "cov-random-mixture", "scale": "sae-error"}]
    _suite(tmp_path, {"a": 1.0, "b": factor}, directions=directions)
    assert _verdict(tmp_path, "lee-sae-cov").verdict == word


def _extrapolation(root: Path, name: str, direction: dict, factors: dict, n_seq: int = 40) -> Path:
    directions = [direction, {"name": "isotropic"}]
    return _suite(
        root, factors, n_seq, folder=name, directions=directions, lengths=[0.0, 1.0, 11.0, 21.0]
    )


@pytest.mark.parametrize(
    ("claim_id", "direction"),
    [
        ("lee-error-extrapolation", {"name": "sae-error"}),
        ("lindsey-feature", {"name": "sae-feature", "which": "inactive"}),
    ],
)
@pytest.mark.parametrize(
    ("factors", "n_seq", "word"),
    [
        ({"topk-k32": 2.0, "e2e-k32": 1.5}, 40, "replicated"),
        ({"topk-k32": 2.0, "e2e-k32": 0.5}, 40, "not replicated"),
        ({"topk-k32": 2.0, "e2e-k32": 1.5}, 4, "inconclusive"),
    ],
)
def test_extrapolation_claims(
    tmp_path: Path, claim_id: str, direction: dict, factors: dict, n_seq: int, word: str
) -> None:
    """Per SAE, the verdicts along the length grid; the ratio range shown is the ratio of the
    means computed here with pandas (last position dropped, length 0 skipped)."""
    folder = {"lee-error-extrapolation": "sae_error_extrapolation_smollm2"}.get(
        claim_id, "sae_feature_extrapolation_smollm2"
    )
    _extrapolation(tmp_path, folder, direction, factors, n_seq)
    res = _verdict(tmp_path, claim_id)
    assert res.verdict == word
    label = direction["name"]
    rows = _rows({label: factors["topk-k32"], "isotropic": 1.0}, n_seq=n_seq, seed=0,
                 lengths=[0.0, 1.0, 11.0, 21.0])  # fmt: skip
    rows = rows[(rows["pos"] < SEQ_LEN - 1) & (rows["length"] > 0)]
    means = rows.groupby(["length", "direction"])["kl"].mean().unstack()
    ratio = means[label] / means["isotropic"]
    assert f"topk-k32 {ratio.min():.3g}-{ratio.max():.3g}" in res.ours
    assert "topk-k32 (10)" in res.sample and "e2e-k32 (20)" in res.sample


@pytest.mark.parametrize(
    ("e2e_factor", "word"), [(1.0, "replicated"), (3.0, "not replicated"), (1.9, "inconclusive")]
)
def test_local_features_change_the_output_more(tmp_path: Path, e2e_factor: float, word: str):
    """Fig. 8: at lengths 20, 40, 61, mean KL of the feature direction e2e / local below 1 for
    every matched pair (TopK at equal k); each pair and length is judged."""
    direction = {"name": "sae-feature", "which": "inactive"}
    suite = _suite(
        tmp_path,
        {"topk-k8": 2.0, "e2e-k8": e2e_factor, "e2e-ds-k8": 1.0},
        folder="sae_feature_extrapolation_smollm2",
        directions=[direction, {"name": "isotropic"}],
        lengths=[0.0, 20.0, 40.0, 61.0],
    )
    kinds = {"topk-k8": "topk", "e2e-k8": "e2e", "e2e-ds-k8": "e2e+ds"}
    records = [{"label": k, "l0": 8.0, "type": t} for k, t in kinds.items()]
    (suite / "saes.json").write_text(json.dumps(records))
    res = _verdict(tmp_path, "lee-feature-local")
    assert res.verdict == word
    assert "2 matched pairs" in res.sample
    for pair in ("e2e-k8", "e2e-ds-k8"):
        assert all(f"{pair} @ {n}" in res.ci_or_test for n in (20, 40, 61))


@pytest.mark.parametrize(("fine_tuned", "word"), [(True, "inconclusive"), (False, "replicated")])
def test_features_of_alike_decoders_are_not_judged(
    tmp_path: Path, fine_tuned: bool, word: str
) -> None:
    """An e2e SAE whose decoder rows are its local SAE's (median cosine above 0.99: fine-tuned
    from it) has the same features: fig. 8's comparison cannot be made, whatever the KL says."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    local = rng.standard_normal((64, 16)).astype(np.float32)
    nudge = 0.01 if fine_tuned else 3.0  # row cosine ~0.9999 vs ~0.3
    e2e = (local + nudge * rng.standard_normal(local.shape)).astype(np.float32)
    saes = {}
    for label, w in (("topk-k8", local), ("e2e-k8", e2e)):
        saes[label] = tmp_path / "saes" / label
        saes[label].mkdir(parents=True)
        save_file({"W_dec": w}, str(saes[label] / "sae_weights.safetensors"))
    suite = _suite(
        tmp_path,
        {"topk-k8": 2.0, "e2e-k8": 1.0},
        folder="sae_feature_extrapolation_smollm2",
        directions=[{"name": "sae-feature", "which": "inactive"}, {"name": "isotropic"}],
        lengths=[0.0, 20.0, 40.0, 61.0],
        saes=saes,
    )
    records = [{"label": "topk-k8", "l0": 8.0, "type": "topk"},
               {"label": "e2e-k8", "l0": 8.0, "type": "e2e"}]  # fmt: skip
    (suite / "saes.json").write_text(json.dumps(records))
    res = _verdict(tmp_path, "lee-feature-local")
    assert res.verdict == word
    cos = np.median(
        (local * e2e).sum(1) / np.linalg.norm(local, axis=1) / np.linalg.norm(e2e, axis=1)
    )
    assert (f"e2e-k8 {cos:.4f}" in res.ci_or_test) == fine_tuned


def test_feature_claim_without_its_lengths_is_said(tmp_path: Path) -> None:
    """A feature suite run without the bar lengths 20, 40, 61 cannot judge fig. 8: the row says
    so instead of judging other lengths."""
    suite = _extrapolation(
        tmp_path,
        "sae_feature_extrapolation_smollm2",
        {"name": "sae-feature", "which": "inactive"},
        {"topk-k8": 2.0, "e2e-k8": 1.0},
    )
    records = [{"label": "topk-k8", "l0": 8.0, "type": "topk"},
               {"label": "e2e-k8", "l0": 8.0, "type": "e2e"}]  # fmt: skip
    (suite / "saes.json").write_text(json.dumps(records))
    res = _verdict(tmp_path, "lee-feature-local")
    assert res.verdict == CANNOT_JUDGE and "no 'sae-feature' rows at length 20" in res.ci_or_test


# -- Giglemiani et al.: max-slope steps ---------------------------------------------------------


@pytest.mark.parametrize(
    ("real", "cov", "n", "word"),
    [(6, 14, 40, "replicated"), (14, 6, 40, "not replicated"), (6, 14, 5, "inconclusive")],
)
def test_max_slope_claim(tmp_path: Path, real: int, cov: int, n: int, word: str) -> None:
    _synthetic_run(tmp_path, real, cov, real, n)
    res = _verdict(tmp_path, "giglemiani-max-slope")
    assert res.verdict == word
    # the means shown are the steps the curves were built with (exact by construction)
    assert f"real {np.mean(_steps(real, n, 1)):.3g} +-" in res.ours
    assert f"cov-random {np.mean(_steps(cov, n, 2)):.3g} +-" in res.ours


@pytest.mark.parametrize(
    ("synth", "n", "word"),
    [(6, 40, "replicated"), (16, 40, "not replicated"), (6, 5, "inconclusive")],
)
def test_synthetic_ks_claim(tmp_path: Path, synth: int, n: int, word: str) -> None:
    """Synthetic steps at the real ones' (KS near 0) or far beyond them (KS 1, above cov-random)."""
    from scipy.stats import ks_2samp

    _synthetic_run(tmp_path, 6, 9, synth, n)  # cov-random overlaps real: KS below 1
    res = _verdict(tmp_path, "giglemiani-synthetic-ks")
    assert res.verdict == word
    ks = ks_2samp(_steps(synth, n, 3), _steps(6, n, 1)).statistic
    assert f"synthetic-bag {ks:.3g}" in res.ours


# -- plateaus and stable regions ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("real", "other", "n", "word"),
    [(15, 5, 40, "replicated"), (5, 15, 40, "not replicated"), (15, 5, 5, "inconclusive")],
)
@pytest.mark.parametrize("claim", ["heimersheim-plateaus", "giglemiani-synthetic-plateaus"])
def test_plateau_claims(
    tmp_path: Path, claim: str, real: int, other: int, n: int, word: str
) -> None:
    steps = {"real": _steps(real, n, 1)}
    steps |= {"synthetic": _steps(other, n, 2), "cov-random": _steps(other, n, 3)}
    _curve_run(tmp_path, "plateaus", "plateaus_smollm2", _step_rows(steps, "base"))
    res = _verdict(tmp_path, claim)
    assert res.verdict == word
    assert f"real {np.mean(steps['real']):.3g} vs" in res.ours


@pytest.mark.parametrize(
    ("shape", "n", "word"),
    [("step", 40, "replicated"), ("line", 40, "not replicated"), ("step", 5, "inconclusive")],
)
def test_stable_region_claim(tmp_path: Path, shape: str, n: int, word: str) -> None:
    rows = _step_rows({"prompt-pair": _steps(10, n, 1)})
    if shape == "line":  # output change linear in t: sharpness 1 / (N_LEN - 1)
        rows["l2"] = rows["length"].astype(np.float32) * (1.0 + rows["seq"])
    _curve_run(tmp_path, "stable_regions", "stable_regions_smollm2", rows)
    res = _verdict(tmp_path, "janiak-stable-regions")
    assert res.verdict == word
    assert f"a straight line gives {1 / (N_LEN - 1):.3g}" in res.ours
    assert f"= {STEEP / (N_LEN - 1):.3g}" in res.ci_or_test


# -- the table ---------------------------------------------------------------------------------


def test_missing_runs_are_not_run_with_their_command(tmp_path: Path) -> None:
    results = replication_results(tmp_path)
    assert {r.verdict for r in results} == {NOT_RUN}
    for r in results:
        assert r.ours == "-" and "missing" in r.sample
        assert r.commands == tuple(RUNS[n].command_for(tmp_path) for n in r.claim.runs)
        assert all(f"--out {tmp_path}/" in c for c in r.commands)


def test_a_run_that_does_not_fit_is_said(tmp_path: Path) -> None:
    _lee_run(tmp_path, {"isotropic": 1.0, "real-mixture": 1.0})  # no real-difference
    res = _verdict(tmp_path, "lee-difference-lee")
    assert res.verdict == CANNOT_JUDGE and "real-difference" in res.ci_or_test


def _numbers(text: str) -> set[str]:
    return set(re.findall(r"\d+\.\d+", text))


def test_generated_file_numbers_come_from_the_runs(tmp_path: Path) -> None:
    """Two runs that differ only in their data give files that differ in the numbers of that
    claim's row and nowhere else (the paper's numbers and the rest stay)."""
    pages = []
    for i, steps in enumerate(((6, 14), (7, 16))):
        root = tmp_path / f"root{i}"
        _synthetic_run(root, *steps, synth=steps[0])
        path, _ = write_replication(
            root, tmp_path / f"R{i}.md", command="perturb-lens replication R"
        )
        pages.append(path.read_text().replace(str(root), "ROOT"))
    a, b = (p.splitlines() for p in pages)
    changed = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
    assert changed and all(
        "giglemiani-max-slope" in x or "giglemiani-synthetic-ks" in x for x, _ in changed
    )
    for x, y in changed:
        assert _numbers(x) != _numbers(y)
    assert pages[0].startswith("<!-- Generated file")
    assert "Generated by `perturb-lens replication R`" in pages[0]
    assert "51.65 +- 7.42" in pages[0]  # the paper's number, quoted


def test_user_claims_register(tmp_path: Path) -> None:
    entry = register_replication(
        "test-claim",
        paper="P",
        claim="c",
        paper_number="n",
        source="s",
        runs=("plateaus",),
        evaluate=lambda runs: Row("1", "s", "replicated", "t"),
        rule="r",
    )
    try:
        assert _verdict(tmp_path, "test-claim").verdict == NOT_RUN
        with pytest.raises(ValueError, match="not in the runs-root layout"):
            fields = {k: v for k, v in entry.__dict__.items() if k != "claim_id"}
            register_replication("bad", **{**fields, "runs": ("x",)})
    finally:
        CLAIMS.unregister("test-claim")


@pytest.mark.parametrize("seed", range(3))
def test_ks_statistic_is_scipys(seed: int) -> None:
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 8, 30), rng.normal(3.0, 2.0, 17).round()  # ties within and across
    assert ks_statistic(a, b) == pytest.approx(ks_2samp(a, b).statistic, abs=1e-12)


def test_sign_test_closed_form() -> None:
    assert sign_test(5, 5) == pytest.approx(1 / 32)
    assert sign_test(4, 5) == pytest.approx(6 / 32)  # P(X >= 4), X ~ Binomial(5, 1/2)
    assert sign_test(0, 0) == 1.0


def test_cov_random_claims_on_a_small_fit_are_inconclusive(tmp_path: Path) -> None:
    run = _lee_run(tmp_path, {"cov-random-mixture": 3.0, "isotropic": 1.0})
    assert _verdict(tmp_path, "lee-cov-isotropic-lee").verdict == "replicated"
    _set_meta(run, stats={"n_samples": 100, "d_model": 64})  # < 10 x d_model
    res = _verdict(tmp_path, "lee-cov-isotropic-lee")
    assert res.verdict == "inconclusive" and "unreliable" in res.ci_or_test


def test_bad_verdict_words_are_refused() -> None:
    with pytest.raises(ValueError, match="verdict 'holds'"):
        Row("1", "s", "holds", "t")  # type: ignore[arg-type]


def test_cli_writes_the_file(tmp_path: Path) -> None:
    _lee_run(tmp_path, LEE_PAIR)
    out = tmp_path / "REPLICATION.md"
    result = CliRunner().invoke(app, ["replication", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert f"Generated by `perturb-lens replication {tmp_path} --out {out}`" in text
    assert "**replicated**" in text and f"**{NOT_RUN}**" in text
    help_text = CliRunner().invoke(app, ["replication", "--help"]).output
    assert "RUNS_ROOT/smollm2-135m/synthetic_activations/" in help_text


def test_cli_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["replication", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "is not a folder" in result.output and "Traceback" not in result.output


# -- real runs of a tiny random GPT-2 ---------------------------------------------------------


def test_stable_regions_on_a_tiny_model(tmp_path: Path, gpt2_dir: Path, webtext_path: Path):
    """The sharpness quartiles shown are those of the run's curves, computed here with numpy
    (largest step-to-step increase of L2 over its value at t = 1, per prompt pair)."""
    from perturb_lens.results import load_results
    from perturb_lens.workflows.experiment import run_experiment

    cfg = {
        "model": str(gpt2_dir),
        "experiment": "stable-regions",
        "hook": "blocks.1.hook_resid_pre",
        "scope": "last-position",
        "lengths": "0:1:0.05",
        "metrics": ["l2"],
        "data": {"source": str(webtext_path), "seq_len": 10, "n_seqs": 12},
        "stats": {"pool_size": 54},
        "shard_seqs": 6,
    }
    run_experiment(cfg, tmp_path / "stable_regions", progress=False)
    res = _verdict(tmp_path, "janiak-stable-regions")
    rows = load_results(tmp_path / "stable_regions").sort_values(["seq", "length"])
    y = rows["l2"].to_numpy(np.float64).reshape(12, -1)
    sharp = np.diff(y, axis=1).max(axis=1) / y[:, -1]
    q = np.quantile(sharp, [0.25, 0.5, 0.75])
    assert f"quartiles {q[0]:.3g} / {q[1]:.3g} / {q[2]:.3g}" in res.ours
    assert res.verdict in ("replicated", "not replicated", "inconclusive")
    assert "12 seqs x 10 tokens (last-position), 21 lengths" in res.sample


def test_sensitive_directions_on_a_tiny_model(tmp_path: Path, shard_reference: Path) -> None:
    """The shared tiny run has 8 sequences: too few to decide (fewer than 10 pair). Its ratio of
    mean KL cov-random-mixture / isotropic is computed here from the rows with pandas."""
    import shutil

    from perturb_lens.results import load_results

    shutil.copytree(shard_reference, tmp_path / "sensitive_directions_lee")
    res = _verdict(tmp_path, "lee-cov-isotropic-lee")
    assert res.verdict == "inconclusive"
    rows = load_results(shard_reference)
    rows = rows[(rows["pos"] < rows["pos"].max()) & (rows["length"] > 0)]  # published mean
    means = rows.groupby(["length", "direction"])["kl"].mean().unstack()
    ratio = means["cov-random-mixture"] / means["isotropic"]
    assert f"{ratio.min():.3g}-{ratio.max():.3g} over" in res.ours
    assert _verdict(tmp_path, "lee-difference-lee").verdict == CANNOT_JUDGE  # no real-mixture
