"""Verdicts: claims on synthetic runs with known differences, the streamed per-sequence sums
against a pandas groupby, the bootstrap against closed forms and the delta method, a real run."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
from synthetic_runs import PRESETS, make_run

from perturb_lens.analysis import (
    Claim,
    claim_intervals,
    format_verdicts,
    parse_claim,
    register_claim,
    registered_claims,
    verdict_table,
    verdicts,
)
from perturb_lens.analysis.verdicts import (
    CLAIMS,
    _length_ranges,
    stats_fit,
    verdict_rows,
)
from perturb_lens.config.schema import load_config
from perturb_lens.results import load_results, sequence_sums
from perturb_lens.statistics.bootstrap import expanded_tail, ratio_intervals

LENGTHS = [0.0, 1.0, 2.0, 4.0, 8.0]
SEQ_LEN = 6


def _config(directions: list[dict]) -> dict:
    cfg = load_config(PRESETS[0]).model_dump(mode="json")
    return {**cfg, "metrics": ["kl"], "directions": directions}


def _rows(
    factors: dict[str, object],
    *,
    n_seq: int = 40,
    noise: float = 0.05,
    seed: int = 0,
    lengths: list[float] = LENGTHS,
) -> pd.DataFrame:
    """KL = token scale x (length / 4)^2 x factor(length) x (1 + noise * N(0, 1)) per direction.

    Every direction sees the same tokens (the scale is per (seq, pos)), as in a real run; a
    factor is a number or a function of the length.
    """
    rng = np.random.default_rng(seed)
    scale = rng.exponential(size=(n_seq, SEQ_LEN))
    frames = []
    for label, factor in factors.items():
        for length in lengths:
            f = factor(length) if callable(factor) else factor
            jitter = 1.0 + noise * rng.standard_normal((n_seq, SEQ_LEN))
            kl = np.abs(scale * (length / 4.0) ** 2 * f * jitter)
            seq, pos = np.meshgrid(range(n_seq), range(SEQ_LEN), indexing="ij")
            frames.append(
                pd.DataFrame(
                    {
                        "seq": seq.ravel(),
                        "pos": pos.ravel(),
                        "direction": label,
                        "length": length,
                        "kl": kl.ravel().astype(np.float32),
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


def _run(tmp_path: Path, factors: dict[str, object], **kw) -> Path:
    directions = [{"name": d} for d in factors]
    return make_run(tmp_path / "run", _config(directions), rows=_rows(factors, **kw))


def _set_meta(run_dir: Path, **meta) -> None:
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["meta"].update(meta)
    path.write_text(json.dumps(manifest))


def _one(table: pd.DataFrame, claim: str) -> pd.Series:
    return table.set_index("claim").loc[claim]


# -- verdict words on synthetic runs ---------------------------------------------------------


def test_clear_win_holds_at_every_length(tmp_path: Path) -> None:
    run = _run(tmp_path, {"real-difference": 2.0, "real-mixture": 1.0})
    row = _one(verdicts(run), "real-difference > real-mixture")
    assert row["verdict"] == "holds"
    assert row["holds"] == LENGTHS[1:] and row["reversed"] == row["inconclusive"] == []
    assert row["skipped"] == [0.0]  # both means are exactly 0 at length 0: the noise floor
    assert 1.8 < row["ratio_min"] <= row["ratio_max"] < 2.2
    assert row["unreliable"] is not pd.NA and not row["unreliable"]  # no cov-random direction


def test_nan_rows_are_left_out_and_said(tmp_path: Path) -> None:
    rows = _rows({"real-difference": 2.0, "real-mixture": 1.0})
    rows.loc[(rows["direction"] == "real-mixture") & (rows["seq"] == 3), "kl"] = np.nan
    directions = [{"name": "real-difference"}, {"name": "real-mixture"}]
    run = make_run(tmp_path / "run", _config(directions), rows=rows)
    row = _one(verdicts(run), "real-difference > real-mixture")
    assert row["verdict"] == "holds" and row["n_seqs"] == 39  # sequence 3 no longer pairs
    assert row["note"] == "NaN rows left out: {'real-mixture': 25}"  # 5 lengths x 5 positions


def test_too_few_sequences_decide_nothing(tmp_path: Path) -> None:
    """A clear win on 5 sequences: the intervals lie above 1, but 5 < min_seqs sequences."""
    run = _run(tmp_path, {"real-difference": 2.0, "real-mixture": 1.0}, n_seq=5)
    row = _one(verdicts(run), "real-difference > real-mixture")
    assert row["verdict"] == "inconclusive" and row["inconclusive"] == LENGTHS[1:]
    assert row["note"] == "fewer than 10 sequences pair: left inconclusive there"
    assert _one(verdicts(run, min_seqs=5), "real-difference > real-mixture")["verdict"] == "holds"
    with pytest.raises(ValueError, match="min_seqs must be at least 2"):
        verdicts(run, min_seqs=1)


def test_clear_reversal_is_reversed(tmp_path: Path) -> None:
    run = _run(tmp_path, {"cov-random-mixture": 0.5, "isotropic": 1.0})
    row = _one(verdicts(run), "cov-random-mixture > isotropic")
    assert row["verdict"] == "reversed" and row["reversed"] == LENGTHS[1:]


def test_no_difference_is_inconclusive(tmp_path: Path) -> None:
    """Same distribution, large per-token noise and few sequences: the interval straddles 1."""
    run = _run(tmp_path, {"real-difference": 1.0, "real-mixture": 1.0}, n_seq=12, noise=1.0)
    detail = claim_intervals(run, ["real-difference > real-mixture"])
    kept = detail[detail["outcome"] != "skipped"]
    assert (kept["ci_low"] < 1.0).all() and (kept["ci_high"] > 1.0).all()
    assert _one(verdicts(run), "real-difference > real-mixture")["verdict"] == "inconclusive"


def test_exactly_equal_directions(tmp_path: Path) -> None:
    """a == b token by token: every resample's ratio is 1, so '>' cannot tell and '~' holds."""
    rows = _rows({"real-mixture": 1.0}, noise=0.3)
    rows = pd.concat([rows, rows.assign(direction="cov-random-mixture")], ignore_index=True)
    directions = [{"name": "real-mixture"}, {"name": "cov-random-mixture"}]
    run = make_run(tmp_path / "run", _config(directions), rows=rows)
    detail = claim_intervals(
        run, ["real-mixture > cov-random-mixture", "real-mixture ~ cov-random-mixture"]
    )
    kept = detail[detail["outcome"] != "skipped"]
    assert (kept["ratio"] == 1.0).all() and (kept["ci_low"] == 1.0).all()
    assert (kept["ci_high"] == 1.0).all()
    table = verdicts(
        run, ["real-mixture > cov-random-mixture", "real-mixture ~ cov-random-mixture"]
    )
    assert table["verdict"].tolist() == ["inconclusive", "holds"]


def test_opposite_signs_at_different_lengths_is_mixed(tmp_path: Path) -> None:
    run = _run(
        tmp_path, {"real-difference": lambda x: 2.0 if x <= 2.0 else 0.5, "real-mixture": 1.0}
    )
    row = _one(verdicts(run), "real-difference > real-mixture")
    assert row["verdict"] == "mixed"
    assert row["holds"] == [1.0, 2.0] and row["reversed"] == [4.0, 8.0]


@pytest.mark.parametrize(
    ("factor", "noise", "n_seq", "verdict"),
    [
        (1.05, 0.05, 40, "holds"),  # ratio 1.05, interval well inside [0.8, 1.25]
        (3.0, 0.05, 40, "reversed"),  # they differ: ratio 3, interval well above 1.25
        (1.2, 1.0, 12, "inconclusive"),  # noisy, the interval crosses 1.25
    ],
)
def test_close_claims(
    tmp_path: Path, factor: float, noise: float, n_seq: int, verdict: str
) -> None:
    run = _run(
        tmp_path, {"real-mixture": factor, "cov-random-mixture": 1.0}, noise=noise, n_seq=n_seq
    )
    row = _one(verdicts(run), "real-mixture ~ cov-random-mixture")
    assert row["verdict"] == verdict
    assert row[verdict] == LENGTHS[1:]


def test_noise_floor_is_skipped(tmp_path: Path) -> None:
    """Lengths where both means are no higher than at length 0 are skipped, not decided."""
    run = _run(tmp_path, {"real-difference": 2.0, "real-mixture": 1.0})
    rows = load_results(run)
    at0 = rows["length"] == 0.0
    rows.loc[at0, "kl"] = np.float32(0.5)  # a noise floor of 0.5 at alpha = 0
    rows.loc[rows["length"] == 1.0, "kl"] = np.float32(0.25)  # below the floor for both
    rerun = make_run(tmp_path / "floor", load_config_of(run), rows=rows)
    row = _one(verdicts(rerun), "real-difference > real-mixture")
    assert row["skipped"] == [0.0, 1.0] and row["holds"] == [2.0, 4.0, 8.0]


def load_config_of(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())["config"]


# -- which claims apply --------------------------------------------------------------------


def test_only_claims_with_both_directions_apply(tmp_path: Path) -> None:
    run = _run(tmp_path, {"isotropic": 1.0, "cov-random-mixture": 1.5, "real-mixture": 2.0})
    claims = verdicts(run)["claim"].tolist()
    assert claims == ["cov-random-mixture > isotropic", "real-mixture ~ cov-random-mixture"]


def test_sae_claims_need_the_epsilon_baselines(tmp_path: Path) -> None:
    """SAE(x) (sae-error, raw) against baselines at scale sae-error (Gurnee's ratio); the same
    labels at unit scale are not epsilon-baselines, so the SAE claims do not apply there."""
    factors = {"SAE(x)": 3.0, "isotropic": 1.0, "real-mixture": 2.0}
    rows = _rows(factors)
    sae = [{"name": "sae-error", "scale": "raw", "label": "SAE(x)"}]
    baselines = [{"name": n, "scale": "sae-error"} for n in ("isotropic", "real-mixture")]
    run = make_run(tmp_path / "sae", _config(sae + baselines), rows=rows)
    table = verdicts(run)
    assert table["claim"].tolist() == ["SAE(x) > isotropic", "SAE(x) > real-mixture"]
    assert table["verdict"].tolist() == ["holds", "holds"]
    ratio = table.set_index("claim")["ratio_min"]
    assert 2.7 < ratio["SAE(x) > isotropic"] < 3.3 and 1.35 < ratio["SAE(x) > real-mixture"] < 1.65
    unit = [{"name": n} for n in ("isotropic", "real-mixture")]
    other = make_run(tmp_path / "unit", _config(sae + unit), rows=rows)
    assert verdicts(other).empty
    with pytest.raises(ValueError, match=r"'SAE\(x\) > isotropic' does not apply.*sae-error"):
        verdicts(other, [c for c in registered_claims() if c.text == "SAE(x) > isotropic"])


def test_user_claims(tmp_path: Path) -> None:
    run = _run(tmp_path, {"isotropic": 1.0, "ablation": 4.0})
    assert verdicts(run, ["ablation > isotropic"])["verdict"].tolist() == ["holds"]
    assert verdicts(run, "ablation > isotropic")["verdict"].tolist() == ["holds"]
    assert verdicts(run).empty  # no built-in claim on these two
    claim = register_claim("ablation > isotropic")
    try:
        assert verdicts(run)["claim"].tolist() == ["ablation > isotropic"]
        assert claim in registered_claims() and claim.source == "user"
    finally:
        CLAIMS.unregister(claim.text)
    with pytest.raises(ValueError, match="needs directions 'ablation' and 'real-mixture'"):
        verdicts(run, ["ablation ~ real-mixture"])


@pytest.mark.parametrize("text", ["a >> b", "a < b", "a", "> b", "a ~ ", "a > b > c"])
def test_bad_claims_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="must read 'a > b' or 'a ~ b'"):
        parse_claim(text)


@pytest.mark.parametrize(("a", "op", "b"), [("a", "<", "b"), ("a", ">", "a"), ("", "~", "b")])
def test_bad_claim_objects_are_refused(a: str, op: str, b: str) -> None:
    with pytest.raises(ValueError, match="must compare two different direction labels"):
        Claim(a, op, b)  # type: ignore[arg-type]


def test_parse_claim() -> None:
    assert parse_claim(" SAE(x)>real-mixture ") == Claim("SAE(x)", ">", "real-mixture")
    assert parse_claim("a ~ b").op == "~"


def test_bad_metric_is_refused(tmp_path: Path) -> None:
    run = _run(tmp_path, {"real-difference": 2.0, "real-mixture": 1.0})
    with pytest.raises(ValueError, match=r"has no metric 'js': the run measured kl"):
        verdicts(run, metric="js")
    rows = load_results(run).assign(cos=lambda d: -d["kl"])
    neg = make_run(tmp_path / "neg", load_config_of(run), rows=rows)
    with pytest.raises(ValueError, match="'cos' takes negative values"):
        verdicts(neg, metric="cos")


# -- statistics fit size --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stats", "unreliable"),
    [
        ({"n_samples": 639, "d_model": 64}, True),  # below 10 x d_model
        ({"n_samples": 640, "d_model": 64}, False),
        (None, None),  # unknown: no keys, no stats file
    ],
)
def test_cov_random_claims_flag_small_fits(tmp_path: Path, stats: dict | None, unreliable) -> None:
    run = _run(tmp_path, {"cov-random-mixture": 2.0, "isotropic": 1.0, "real-mixture": 1.0})
    if stats is not None:
        _set_meta(run, stats=stats)
    flags = verdicts(run).set_index("claim")["unreliable"]
    cov = flags["cov-random-mixture > isotropic"]
    assert (cov is pd.NA) if unreliable is None else (bool(cov) is unreliable)
    assert flags.index.tolist() == [
        "cov-random-mixture > isotropic",
        "real-mixture ~ cov-random-mixture",
    ]


# -- the streamed per-sequence sums ----------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "include_bos", "drop_last", "split"),
    [
        ("all-positions", True, True, "seq"),
        ("all-positions", False, False, "seq"),
        ("single-position", False, True, "seq"),
        ("all-positions", True, True, "pos"),  # every sequence's rows in two shards
    ],
)
def test_sequence_sums_equal_a_pandas_groupby(
    tmp_path: Path, scope: str, include_bos: bool, drop_last: bool, split: str
) -> None:
    from perturb_lens.results import ResultStore, load_manifest

    factors = {"real-difference": 2.0, "real-mixture": 1.0, "isotropic": 0.5}
    rows = _rows(factors, n_seq=9)
    rows.loc[rows.index % 17 == 3, "kl"] = np.nan  # NaN rows are counted apart, not summed
    run = make_run(tmp_path / "run", _config([{"name": d} for d in factors]), rows=rows)
    _set_meta(run, scope=scope, include_bos=include_bos, drop_last_position=drop_last)
    if split == "pos":
        m = load_manifest(run)
        with ResultStore(tmp_path / "split") as store:
            store.create(m["config"], m["config_hash"], m["meta"], resume=False)
            store.write_shard("s0", rows[rows["pos"] < 3])
            store.write_shard("s1", rows[rows["pos"] >= 3])
        run = tmp_path / "split"

    df = load_results(run)  # the published rule, written out plainly
    if scope == "all-positions" and drop_last:
        df = df[df["pos"] != SEQ_LEN - 1]
    if not include_bos:
        df = df[df["pos"] != 0]
    df = df[df["direction"] != "isotropic"]
    kl = df["kl"].astype(np.float64)
    g = kl.groupby([df["direction"].astype(str), df["length"], df["seq"]])
    ref = pd.DataFrame(
        {
            "sum": g.sum(),
            "n": g.count(),
            "n_nan": kl.isna().groupby(g.ngroup().to_numpy()).sum().to_numpy(),
        }
    )

    got = sequence_sums(run, "kl", ["real-difference", "real-mixture"])
    got = got.set_index(["direction", "length", "seq"])
    assert got.index.equals(ref.index)
    assert (got["n"] == ref["n"]).all() and (got["n_nan"] == ref["n_nan"]).all()
    assert ref["n_nan"].sum() > 0
    # float32 values summed in float64 in another order: at most 6 terms, each addition rounds by
    # <= 2^-53 of the partial sum, all terms >= 0, so |error| <= 6 * 2^-53 * sum < 1e-15 * sum.
    np.testing.assert_allclose(got["sum"], ref["sum"], rtol=1e-15, atol=0)


def test_streamed_shards_are_checked(tmp_path: Path) -> None:
    from perturb_lens.results import ChecksumError

    run = _run(tmp_path, {"real-difference": 2.0, "real-mixture": 1.0})
    shard = next((run / "shards").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ChecksumError, match="does not match its recorded sha256"):
        verdicts(run)


# -- the bootstrap ---------------------------------------------------------------------------


def test_constant_ratio_gives_a_point_interval() -> None:
    """b = a / 3 sequence by sequence: every resample's ratio of means is 3 (closed form)."""
    rng = np.random.default_rng(1)
    s = rng.exponential(size=(50, 2))
    n = rng.integers(1, 5, size=(50, 2)).astype(np.float64)
    out = ratio_intervals((s, n), (s / 3.0, n), n_boot=500)
    np.testing.assert_allclose(out[["ratio", "ci_low", "ci_high"]].to_numpy(), 3.0, rtol=1e-14)


def test_bootstrap_interval_matches_the_delta_method() -> None:
    """Many sequences: the percentile interval of the ratio of means is close to the normal one
    from the delta method, log R +- z * sd(a_i / mean_a - b_i / mean_b) / sqrt(n)."""
    rng = np.random.default_rng(2)
    k = 3000
    shared = rng.exponential(size=k)
    a, b = shared * rng.lognormal(0.1, 0.5, k), shared * rng.lognormal(0.0, 0.5, k)
    ones = np.ones((k, 1))
    out = ratio_intervals((a[:, None], ones), (b[:, None], ones), n_boot=4000, seed=3)
    z = NormalDist().inv_cdf(0.975)
    half = z * np.std(a / a.mean() - b / b.mean(), ddof=1) / np.sqrt(k)
    ref_lo, ref_hi = a.mean() / b.mean() * np.exp([-half, half])
    # Monte-Carlo error of a 2.5 % quantile from 4000 resamples is about 5 % of the half-width;
    # the delta method's own error at n = 3000 is smaller. Allow 15 %.
    width = ref_hi - ref_lo
    assert abs(out["ci_low"][0] - ref_lo) < 0.15 * width / 2
    assert abs(out["ci_high"][0] - ref_hi) < 0.15 * width / 2
    assert out["ratio"][0] == pytest.approx(a.mean() / b.mean(), rel=1e-14)


def test_interval_covers_at_twelve_sequences() -> None:
    """Few sequences: the expanded percentile interval keeps its 95 % coverage. a_i and b_i are
    lognormal (sigma 0.6) with means e^0.2 and 1, so the true ratio of means is e^0.2. Over 400
    seeded datasets of 12 sequences the expanded interval covers it 379 times (0.9475); the plain
    percentile interval covered it 365 times (0.9125), below the 0.925 asked here (the binomial
    standard error of a coverage near 0.95 from 400 datasets is 0.011, so 0.925 is 2.2 of them
    under the nominal level)."""
    rng = np.random.default_rng(0)
    n, trials, true = 12, 400, np.exp(0.2)
    ones = np.ones((n, 1))
    hits = 0
    for r in range(trials):
        a, b = rng.lognormal(0.02, 0.6, n), rng.lognormal(-0.18, 0.6, n)
        out = ratio_intervals((a[:, None], ones), (b[:, None], ones), n_boot=1000, seed=r)
        hits += bool(out["ci_low"][0] <= true <= out["ci_high"][0])
    assert hits / trials >= 0.925


def test_expanded_tail_widens_for_few_sequences() -> None:
    """The tail shrinks for few units (wider interval) and tends to alpha for many; values from
    Phi(-sqrt(n / (n - 1)) t_{0.975, n - 1}) with tabulated t: t_11 = 2.2010, t_199 = 1.9720."""
    assert expanded_tail(0.025, 12) == pytest.approx(
        NormalDist().cdf(-((12 / 11) ** 0.5) * 2.2010), rel=1e-3
    )
    assert expanded_tail(0.025, 200) == pytest.approx(
        NormalDist().cdf(-((200 / 199) ** 0.5) * 1.9720), rel=1e-3
    )
    assert expanded_tail(0.025, 1) == 0.025


def test_bootstrap_is_seeded(tmp_path: Path) -> None:
    run = _run(tmp_path, {"real-difference": 1.0, "real-mixture": 1.0}, n_seq=12, noise=1.0)
    a = claim_intervals(run, seed=5)
    assert a.equals(claim_intervals(run, seed=5))
    assert not a["ci_low"].equals(claim_intervals(run, seed=6)["ci_low"])


# -- printing --------------------------------------------------------------------------------


def test_length_ranges() -> None:
    grid = [1.0, 2.0, 4.0, 8.0, 16.0]
    assert _length_ranges([1.0, 2.0, 4.0, 16.0], grid) == "1-4, 16"
    assert _length_ranges([], grid) == "-"


def test_tables_print(tmp_path: Path) -> None:
    from rich.console import Console

    run = _run(
        tmp_path,
        {
            "real-difference": lambda x: 2.0 if x <= 2.0 else 0.5,
            "real-mixture": 1.0,
            "cov-random-mixture": 1.0,
        },
    )
    _set_meta(run, stats={"n_samples": 100, "d_model": 64})
    table = verdicts(run)
    text = format_verdicts(table)
    assert "real-difference > real-mixture" in text and "mixed" in text and "1-2" in text
    assert "fitted on 100 samples < 10 x d_model = 640" in text
    console = Console(width=200, record=True)
    console.print(verdict_table(table))
    assert "mixed" in console.export_text()
    assert format_verdicts(table.iloc[:0]) == "No claim applies to this run's directions."


# -- a real run ------------------------------------------------------------------------------


def test_real_tiny_run(tmp_path: Path, shard_config: dict) -> None:
    """The conftest run (random GPT-2, 8 x 16 WebText tokens) with the four claimed directions."""
    from perturb_lens.results.summary import summary_rows
    from perturb_lens.workflows.experiment import run_experiment

    directions = ["isotropic", "cov-random-mixture", "real-difference", "real-mixture"]
    cfg = {**shard_config, "metrics": ["kl", "l2"], "directions": directions}
    cfg["stats"] = {**cfg["stats"], "n_seqs": 8}  # fitted on the 8 measured rows only: too few
    run = run_experiment(cfg, tmp_path / "run", progress=False)
    table = verdicts(run, n_boot=500)
    assert table["claim"].tolist() == [
        "real-difference > real-mixture",
        "cov-random-mixture > isotropic",
        "real-mixture ~ cov-random-mixture",
    ]
    assert set(table["verdict"]) <= {"holds", "reversed", "mixed", "inconclusive"}
    # 8 x 15 non-BOS samples fitted, d_model 64: far below 10 x 64
    assert stats_fit(run) == (8 * 15, 64)
    assert table["unreliable"].tolist() == [False, True, True]
    # the per-length means are the published means of summary_rows (float64 sums of float32
    # values in another order: relative error <= 8 * 15 * 2^-53 < 1e-13)
    detail = claim_intervals(run, n_boot=500)  # the per-length rows behind the table
    rows = summary_rows(run)
    means = (
        rows.assign(kl=rows["kl"].astype(np.float64))
        .groupby(["direction", "length"], observed=True)["kl"]
        .mean()
    )
    for _, r in detail.iterrows():
        np.testing.assert_allclose(r["mean_a"], means[(r["a"], r["length"])], rtol=1e-13)
        np.testing.assert_allclose(r["mean_b"], means[(r["b"], r["length"])], rtol=1e-13)
    assert (detail.loc[detail["length"] == 0, "outcome"] == "skipped").all()
    assert verdicts(run, metric="l2", n_boot=200)["metric"].eq("l2").all()
    # the report's Verdicts section shows the same table (default settings), per metric
    from perturb_lens.plots import write_report

    html = write_report(run, tmp_path / "report.html", formats=["svg"]).read_text()
    section = html.split('<h2 id="verdicts">Verdicts</h2>')[1].split("<h2 ")[0]
    for metric in ("kl", "l2"):
        for row in verdict_rows(verdicts(run, metric=metric)):
            assert f"<td>{row['claim'].replace('>', '&gt;')}</td>" in section
            assert f"<td>{row['verdict']}</td>" in section
    assert "<h3>kl</h3>" in section and "<h3>l2</h3>" in section


def test_suite_folder_gives_rows_per_run(tmp_path: Path) -> None:
    """An SAE suite folder (one run per SAE in <out>/<label>): every run's verdicts, labelled."""
    sae = [{"name": "sae-error", "scale": "raw", "label": "SAE(x)"}]
    baselines = [{"name": "isotropic", "scale": "sae-error"}]
    for label, factor in (("sae-a", 3.0), ("sae-b", 0.5)):
        rows = _rows({"SAE(x)": factor, "isotropic": 1.0})
        make_run(tmp_path / "suite" / label, _config(sae + baselines), rows=rows)
    table = verdicts(tmp_path / "suite")
    assert table[["run", "claim", "verdict"]].values.tolist() == [
        ["sae-a", "SAE(x) > isotropic", "holds"],
        ["sae-b", "SAE(x) > isotropic", "reversed"],
    ]
    assert "sae-b" in format_verdicts(table)


def test_runs_it_cannot_judge_are_refused(tmp_path: Path) -> None:
    from perturb_lens.results import ResultStore, config_hash

    cfg = _config([{"name": "real-difference"}, {"name": "real-mixture"}])
    with ResultStore(tmp_path / "empty") as store:
        store.create(cfg, config_hash(cfg), {"scope": "all-positions", "seq_len": 6}, resume=False)
    with pytest.raises(ValueError, match=r"no result rows of .* yet"):
        verdicts(tmp_path / "empty")
    run = make_run(
        tmp_path / "plateaus",
        {**cfg, "experiment": "plateaus"},
        rows=_rows({"real-difference": 1.0, "real-mixture": 1.0}),
    )
    with pytest.raises(ValueError, match="is a 'plateaus' run"):
        verdicts(run)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="not a perturb-lens run directory"):
        verdicts(tmp_path / "nothing")


def test_cli_prints_verdicts(tmp_path: Path, shard_config: dict) -> None:
    """``perturb-lens run`` ends with the verdicts that apply (here none of the published ones);
    ``perturb-lens verdicts`` tests a claim given on the command line; a folder without a run is
    refused with exit 1 and no traceback."""
    import yaml
    from typer.testing import CliRunner

    from perturb_lens.cli.app import app

    cli, wide = CliRunner(), {"COLUMNS": "200"}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**shard_config, "directions": ["isotropic", "real-mixture"]}))
    run = tmp_path / "run"
    res = cli.invoke(app, ["run", str(path), "--out", str(run), "-q"], env=wide)
    assert res.exit_code == 0, res.output
    assert "Verdicts (kl): no published claim applies to these directions" in res.output
    # no COLUMNS: output to a pipe is PIPE_WIDTH columns wide, so the table is not cut at 80
    res = cli.invoke(
        app, ["verdicts", str(run), "-c", "real-mixture > isotropic"], env={"COLUMNS": None}
    )
    assert res.exit_code == 0, res.output
    assert "Verdicts (kl, 95% CI, sequences resampled)" in res.output
    assert "real-mixture > isotropic" in res.output
    assert "fewer than 10 sequences pair" in res.output  # 8 sequences: left inconclusive
    (tmp_path / "empty").mkdir()
    res = cli.invoke(app, ["verdicts", str(tmp_path / "empty")], env=wide)
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "Error:" in res.output
