"""Evaluators of the replication claims: each reads its runs through the analysis functions
(verdicts, curve statistics, SAE eval files) and returns a :class:`~.registry.Row`."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from perturb_lens.analysis.curve_shape import curve_metric, curve_statistics, ks_vs_reference
from perturb_lens.analysis.verdicts import (
    BAND,
    MIN_SEQS,
    Claim,
    claim_intervals,
    ratio_intervals,
    registered_claims,
    stats_fit,
    verdict_rows,
    verdicts,
)
from perturb_lens.config.schema import DirectionConfig
from perturb_lens.replication.inference import (
    ALPHA,
    CI_WORD,
    above,
    combine,
    ks_statistic,
    paired_difference,
    ratio_part,
    sign_test,
)
from perturb_lens.replication.registry import Row, Undecided, Verdict
from perturb_lens.results.shards import run_directions, sequence_sums
from perturb_lens.results.store import MANIFEST, load_manifest
from perturb_lens.results.summary import summary_rows
from perturb_lens.statistics.bootstrap import bootstrap_interval

L0_MATCH = 0.10  # e2e and local SAEs are compared where their L0 differ by at most 10%
STEEP = 5.0  # a stable-region transition: the median sharpness above 5x a straight line's
LOCAL_KINDS, E2E_KINDS = ("local", "topk"), ("e2e", "e2e+ds")
REFERENCE = "SAE(x)"  # the label of the substituted SAE(x) in the SAE-substitution presets


def _f(x: float) -> str:
    return f"{x:.3g}"


def sample(run_dir: Path, manifest: dict[str, Any] | None = None) -> str:
    """Model, hook, SAE, sequences x tokens, scope and length grid of a run."""
    manifest = manifest or load_manifest(run_dir)
    meta, cfg = manifest["meta"], manifest["config"]
    sae = f", SAE {cfg['sae']}" if cfg.get("sae") else ""
    out = (
        f"{meta['model']}, {meta['hook']}{sae}; {meta['n_seqs']} seqs x {meta['seq_len']} tokens "
        f"({meta['scope']}), {len(meta['lengths'])} lengths"
    )
    if (fit := stats_fit(run_dir, manifest)) is not None:
        out += f"; stats fit {fit[0]:,} samples ({fit[0] / fit[1]:.3g} x d_model)"
    return out


# ---------------------------------------------------------------------------------------------
# Direction orderings (Lee & Heimersheim; Gurnee): the verdicts module's paired bootstrap

_WORDS: dict[str, Verdict] = {
    "holds": "replicated",
    "reversed": "not replicated",
    "mixed": "not replicated",
    "inconclusive": "inconclusive",
}


def _claim(claim: str | Claim) -> Claim:
    """A :class:`Claim` as given, or the registered verdict claim of that text."""
    if isinstance(claim, Claim):
        return claim
    return next(c for c in registered_claims() if c.text == claim)


def _judged(r: pd.Series) -> tuple[Verdict, str]:
    """The verdict word of a :func:`verdicts` row, inconclusive on an unreliable fit."""
    if not pd.isna(r["unreliable"]) and bool(r["unreliable"]):
        return "inconclusive", f"; unreliable: {r['note']}"
    return _WORDS[r["verdict"]], ""


def _undecided_lengths(
    run: Path, claim: Claim, metric: str, group: str = "", prefix: str = ""
) -> list[Undecided]:
    """The lengths a claim is inconclusive at on a run, as :class:`Undecided` parts of one
    group (a decided length decides the ordering)."""
    detail = claim_intervals(run, [claim], metric)
    return [
        ratio_part(
            f"{prefix}length {r.length:.3g}",
            r.ratio,
            r.ci_low,
            r.ci_high,
            int(r.n_seqs),
            op=claim.op,
            band=BAND,
            group=group,
            min_n=MIN_SEQS,
        )
        for r in detail[detail["outcome"] == "inconclusive"].itertuples()
    ]


STUCK = Undecided("no sample size", np.nan, np.nan, np.nan, np.nan, 0)
"""A part that no sample size decides (an unreliable fit, features that are the same)."""


def ordering(claim: str, metric: str = "kl") -> Callable[[Sequence[Path]], Row]:
    """The evaluator of a registered verdict claim (``a > b`` / ``a ~ b``) on one run."""

    def evaluate(runs: Sequence[Path]) -> Row:
        c = _claim(claim)
        table = verdicts(runs[0], [c], metric=metric)
        r, shown = table.iloc[0], verdict_rows(table)[0]
        verdict, note = _judged(r)
        parts: list[Undecided] = []
        if verdict == "inconclusive":
            parts = [STUCK] if note else _undecided_lengths(runs[0], c, metric)
        return Row(
            ours=f"mean {metric} ratio {c.a} / {c.b}: {shown['ratio a/b']} over the lengths judged",
            sample=sample(runs[0]) + f"; {r['n_seqs']} paired seqs",
            verdict=verdict,
            ci_or_test=f"paired {CI_WORD} CI of the ratio per length (sequences resampled): "
            f"holds at {shown['holds at']}; reversed at {shown['reversed at']}; "
            f"undecided at {shown['inconclusive at']}{note}",
            undecided=tuple(parts),
        )

    return evaluate


def sae_substitution(
    claim: str | Claim, band: tuple[float, float] | None = None
) -> Callable[[Sequence[Path]], Row]:
    """Gurnee; Lee & Heimersheim: ``SAE(x) > baseline`` (or ``~``) per SAE of an ``sae run``
    suite folder at its substitution length; ``band``: the paper's range of the ratio, counted
    beside the verdict (None: no range)."""

    def evaluate(runs: Sequence[Path]) -> Row:
        suite, c = runs[0], _claim(claim)
        run_dirs = sorted(p for p in suite.iterdir() if (p / MANIFEST).is_file())
        parts, words, l0 = [], [], _suite_l0(suite)
        undecided = []
        for run in run_dirs:
            res = claim_intervals(run, [c], "kl")
            res = res[res["outcome"] != "skipped"]
            for r in res.itertuples():
                words.append(_WORDS.get(r.outcome, "inconclusive"))
                at = f" @ {r.length:g}" if len(res) > 1 else ""
                parts.append(
                    (run.name, at, l0.get(run.name), r.ratio, r.ci_low, r.ci_high, r.n_seqs)
                )
                if r.outcome == "inconclusive":
                    undecided.append(
                        ratio_part(
                            f"{run.name}{at}",
                            r.ratio,
                            r.ci_low,
                            r.ci_high,
                            int(r.n_seqs),
                            op=c.op,
                            band=BAND,
                            group=f"{run.name}{at}",
                            min_n=MIN_SEQS,
                        )
                    )
        if not parts:
            raise ValueError(f"no SAE run under {suite} has rows for {c.text!r}")
        ratios = np.array([p[3] for p in parts])
        counted = ""
        if band is not None:
            in_band = int(((ratios >= band[0]) & (ratios <= band[1])).sum())
            counted = f" ({in_band} of {len(parts)} in the paper's range)"
        return Row(
            ours=f"KL ratio {c.a} / {c.b}: "
            + "; ".join(f"{p[0]}{p[1]} {_f(p[3])}" for p in parts)
            + counted,
            sample=f"{sample(run_dirs[0])}; SAEs (L0): "
            + ", ".join(f"{p[0]} ({_f(p[2]) if p[2] is not None else '?'})" for p in parts)
            + f"; {min(p[6] for p in parts)} paired seqs",
            verdict=combine(words),
            ci_or_test=f"paired {CI_WORD} CI of the ratio per SAE (sequences resampled): "
            + "; ".join(f"{p[0]}{p[1]} [{_f(p[4])}, {_f(p[5])}]" for p in parts),
            undecided=tuple(undecided),
        )

    return evaluate


def sae_suite_ordering(claim: Claim, metric: str = "kl") -> Callable[[Sequence[Path]], Row]:
    """Lee & Heimersheim's extrapolations: a verdict claim along the length grid, per SAE of an
    ``sae run`` suite folder (:func:`~perturb_lens.results.verdicts.verdicts` on each run).
    Replicated: it holds (at some length, reversed at none) for every SAE; not replicated:
    reversed or mixed for some SAE."""

    def evaluate(runs: Sequence[Path]) -> Row:
        suite = runs[0]
        table = verdicts(suite, [claim], metric=metric)
        if table.empty:
            raise ValueError(f"no SAE run under {suite} has both sides of {claim.text!r}")
        l0 = _suite_l0(suite)
        judged = [_judged(r) for _, r in table.iterrows()]
        shown = verdict_rows(table)
        first = suite / str(table.iloc[0]["run"])
        undecided: list[Undecided] = []
        for run, (word, note) in zip(table["run"], judged, strict=True):
            if word == "inconclusive":
                group = f"{run}: "
                stuck = [Undecided(group, np.nan, np.nan, np.nan, np.nan, 0, group=group)]
                found = _undecided_lengths(suite / str(run), claim, metric, group, group)
                undecided += stuck if note else found
        return Row(
            ours=f"mean {metric} ratio {claim.a} / {claim.b} over the lengths judged: "
            + "; ".join(f"{s['run']} {s['ratio a/b']}" for s in shown),
            sample=f"{sample(first)}; SAEs (L0): "
            + ", ".join(f"{r} ({_f(l0[r]) if r in l0 else '?'})" for r in table["run"])
            + f"; {int(table['n_seqs'].min())} paired seqs",
            verdict=combine([word for word, _ in judged]),
            ci_or_test=f"paired {CI_WORD} CI of the ratio per SAE and length (sequences "
            "resampled), where it holds / is reversed: "
            + "; ".join(
                f"{s['run']} {s['holds at']} / {s['reversed at']}{note}"
                for s, (_, note) in zip(shown, judged, strict=True)
            ),
            undecided=tuple(undecided),
        )

    return evaluate


def _suite_l0(suite: Path) -> dict[str, float]:
    """Each SAE's L0 on the suite's tokens (``saes.json`` of ``sae run``), by label."""
    path = suite / "saes.json"
    return {r["label"]: r["l0"] for r in json.loads(path.read_text())} if path.is_file() else {}


# ---------------------------------------------------------------------------------------------
# e2e vs local SAEs (Braun et al.): the eval.json of each trained SAE


def sae_evals(folder: Path) -> pd.DataFrame:
    """One row per SAE folder with eval.json: ``name``, ``kind`` (the training objective),
    ``l0``, ``kl`` (of SAE(x)), ``ce_increase`` and ``n`` (held-out CE tokens)."""
    rows = []
    for sub in sorted(p for p in folder.iterdir() if (p / "eval.json").is_file()):
        ev = json.loads((sub / "eval.json").read_text())
        cfg = json.loads((sub / "cfg.json").read_text()) if (sub / "cfg.json").is_file() else {}
        ce = ev.get("ce") or {}
        rows.append(
            {
                "name": sub.name,
                "kind": (cfg.get("metadata") or {}).get("objective", "?"),
                "l0": ev["tokens"]["l0"],
                "kl": ce.get("kl", np.nan),
                "ce_increase": ce.get("ce_increase", np.nan),
                "n": ce.get("n", 0),
            }
        )
    return pd.DataFrame(rows, columns=["name", "kind", "l0", "kl", "ce_increase", "n"])


def matched_pairs(evals: pd.DataFrame, tolerance: float = L0_MATCH) -> pd.DataFrame:
    """Each e2e SAE with the local SAE of the nearest L0, where the two L0 differ by at most
    ``tolerance`` of the larger; columns ``e2e``, ``local`` and their ``l0_*`` / ``kl_*``."""
    local = evals[evals["kind"].isin(LOCAL_KINDS)]
    rows = []
    for e in evals[evals["kind"].isin(E2E_KINDS)].itertuples():
        if local.empty:
            break
        m = local.iloc[int(np.argmin(np.abs(local["l0"].to_numpy() - e.l0)))]
        if abs(m["l0"] - e.l0) <= tolerance * max(m["l0"], e.l0):
            rows.append(
                {"e2e": e.name, "l0_e2e": e.l0, "kl_e2e": e.kl}
                | {"local": m["name"], "l0_local": m["l0"], "kl_local": m["kl"]}
            )
    return pd.DataFrame(rows, columns=["e2e", "l0_e2e", "kl_e2e", "local", "l0_local", "kl_local"])


def e2e_vs_local(runs: Sequence[Path]) -> Row:
    """Braun et al.: e2e SAEs' KL of SAE(x) below local SAEs' at matched L0 (sign test)."""
    evals = sae_evals(runs[0])
    pairs = matched_pairs(evals)
    wins = int((pairs["kl_e2e"] < pairs["kl_local"]).sum())
    losses = int((pairs["kl_e2e"] > pairs["kl_local"]).sum())
    n = wins + losses  # ties carry no sign
    p_win, p_loss = sign_test(wins, n), sign_test(losses, n)
    verdict: Verdict = (
        "replicated" if p_win < ALPHA else "not replicated" if p_loss < ALPHA else "inconclusive"
    )
    ours = "; ".join(
        f"{r.e2e} {_f(r.kl_e2e)} (L0 {_f(r.l0_e2e)}) vs {r.local} {_f(r.kl_local)} "
        f"(L0 {_f(r.l0_local)})"
        for r in pairs.itertuples()
    )
    kinds = evals["kind"].value_counts().to_dict()
    return Row(
        ours=f"held-out KL of SAE(x): {ours}" if ours else "no e2e SAE has a local one at its L0",
        sample=f"{len(evals)} SAEs {kinds} in {runs[0].name}; {len(pairs)} matched pairs "
        f"(L0 within {L0_MATCH:.0%}); held-out CE tokens per SAE: "
        f"{int(evals['n'].min()) if len(evals) else 0}",
        verdict=verdict,
        ci_or_test=f"one-sided sign test over matched pairs: e2e lower in {wins} of {n}, "
        f"p = {_f(p_win)} (reverse p = {_f(p_loss)}); eval.json holds means only, so the pair "
        "is the unit",
    )


SAME_DECODER = 0.99  # matched SAEs whose decoder rows agree this closely have the same features


def decoder_cosine(run_a: Path, run_b: Path) -> float | None:
    """Median cosine between corresponding decoder rows of the SAEs two runs read (their
    ``sae`` folders, SAELens layout, relative to the working directory); None where either is
    not a readable SAELens folder of the same shape."""
    from safetensors.numpy import load_file

    rows = []
    for run in (run_a, run_b):
        folder = Path(str(load_manifest(run)["config"].get("sae") or ""))
        weights = folder / "sae_weights.safetensors"
        if not weights.is_file():
            return None
        w = load_file(str(weights)).get("W_dec")
        if w is None:
            return None
        rows.append(w.astype(np.float64) / np.linalg.norm(w, axis=1, keepdims=True))
    if rows[0].shape != rows[1].shape:
        return None
    return float(np.median((rows[0] * rows[1]).sum(1)))


def e2e_vs_local_paired(
    direction: str = REFERENCE,
    lengths: Sequence[float] | None = None,
    *,
    distinct_decoders: bool = False,
) -> Callable[[Sequence[Path]], Row]:
    """Braun et al.; Lee & Heimersheim fig. 8, on an ``sae run`` suite: per matched pair (e2e
    SAE, local SAE of the nearest L0 within ``L0_MATCH``; types and L0 from the suite's
    ``saes.json``) and length (``lengths``; None: the shortest), the paired bootstrap CI of mean
    KL(e2e) / mean KL(local) of ``direction`` (the label in both runs) on the same tokens
    (sequences resampled). Replicated: every CI below 1; not replicated: some CI above 1.

    ``distinct_decoders``: the claim compares the SAEs' features, so a pair whose decoder rows
    agree (median cosine above ``SAME_DECODER``, e.g. an e2e SAE briefly fine-tuned from its
    local one) cannot test it: that pair is inconclusive, whatever its interval."""

    def evaluate(runs: Sequence[Path]) -> Row:
        suite = runs[0]
        path = suite / "saes.json"
        records = json.loads(path.read_text()) if path.is_file() else []
        evals = pd.DataFrame(
            [{"name": r["label"], "kind": r.get("type", "?"), "l0": r["l0"], "kl": np.nan}
             for r in records],
            columns=["name", "kind", "l0", "kl"],
        )  # fmt: skip
        pairs = matched_pairs(evals)
        parts, words, alike, undecided = [], [], {}, []
        read: dict[str, pd.DataFrame] = {}  # a local SAE can pair with several e2e ones
        for p in pairs.itertuples():
            for label in (p.e2e, p.local):
                if label not in read:
                    read[label] = sequence_sums(suite / label, "kl", [direction])
            sums = [read[p.e2e], read[p.local]]
            cos = decoder_cosine(suite / p.e2e, suite / p.local) if distinct_decoders else None
            if cos is not None and cos > SAME_DECODER:
                alike[p.e2e] = cos
            for length in lengths if lengths is not None else [sums[0]["length"].min()]:
                a, b = (
                    s[np.isclose(s["length"], length)].set_index("seq")[["sum", "n"]] for s in sums
                )
                if a.empty or b.empty:
                    raise ValueError(
                        f"{suite}: {p.e2e} or {p.local} has no {direction!r} rows at length "
                        f"{length:g}"
                    )
                both = a.merge(b, left_index=True, right_index=True, suffixes=("_a", "_b"))
                r = ratio_intervals(
                    (both[["sum_a"]].to_numpy(), both[["n_a"]].to_numpy()),
                    (both[["sum_b"]].to_numpy(), both[["n_b"]].to_numpy()),
                ).iloc[0]
                n = int(r["n_seqs"])
                # the claim is e2e / local below 1, i.e. its reciprocal interval above 1
                inverse = (1.0 / r["ci_high"], 1.0 / r["ci_low"])
                judged = n >= MIN_SEQS and p.e2e not in alike
                words.append(above(*inverse, 1.0) if judged else "inconclusive")
                at = f" @ {length:g}" if lengths is not None else ""
                parts.append((p, at, r, n))
                if words[-1] == "inconclusive":
                    label = f"{p.e2e} / {p.local}{at}"
                    undecided.append(
                        Undecided(label, np.nan, np.nan, np.nan, np.nan, n, group=label)
                        if p.e2e in alike  # the same features: no sample size decides it
                        else ratio_part(label, r["ratio"], r["ci_low"], r["ci_high"], n,
                                        below=True, group=label, min_n=MIN_SEQS)
                    )  # fmt: skip
        if not parts:
            return Row(
                ours="no e2e SAE of the suite has a local one at its L0",
                sample=f"{len(evals)} SAEs in {suite.name}",
                verdict="inconclusive",
                ci_or_test="no matched pair",
            )
        return Row(
            ours=f"mean KL of {direction}, e2e / local: "
            + "; ".join(
                f"{p.e2e} / {p.local}{at} {_f(r['ratio'])} ({_f(r['mean_a'])} vs "
                f"{_f(r['mean_b'])}, L0 {_f(p.l0_e2e)} vs {_f(p.l0_local)})"
                for p, at, r, _ in parts
            ),
            sample=f"{sample(suite / parts[0][0].e2e)}; {len(pairs)} matched pairs "
            f"(L0 within {L0_MATCH:.0%}); {min(n for *_, n in parts)} paired seqs",
            verdict=combine(words),
            ci_or_test=f"paired {CI_WORD} CI of the ratio per pair (sequences resampled): "
            + "; ".join(
                f"{p.e2e}{at} [{_f(r['ci_low'])}, {_f(r['ci_high'])}]" for p, at, r, _ in parts
            )
            + (
                "; not judged: decoder rows alike (median cosine to the local SAE's: "
                + ", ".join(f"{k} {v:.4f}" for k, v in alike.items())
                + f"; above {SAME_DECODER}), so the features compared are the same"
                if alike
                else ""
            ),
            undecided=tuple(undecided),
        )

    return evaluate


# ---------------------------------------------------------------------------------------------
# Curve shapes (Giglemiani et al.; Heimersheim; Janiak et al.)


def _curves(run: Path) -> tuple[pd.DataFrame, dict[str, Any], str]:
    manifest = load_manifest(run)
    metric = curve_metric(manifest["config"]["metrics"])
    return curve_statistics(summary_rows(run), metric), manifest, metric


def _labels(directions: dict[str, DirectionConfig], name: str) -> list[str]:
    """The labels of a run's directions (or bases) whose generator is ``name``."""
    found = [label for label, d in directions.items() if d.name == name]
    if not found:
        raise ValueError(f"the run has no {name!r} direction (it has {list(directions)})")
    return found


def _per_seq(stats: pd.DataFrame, statistic: str, by: str) -> pd.DataFrame:
    """``statistic`` per prompt (rows) and ``by`` label (columns), averaged over the rest."""
    return stats.groupby(["seq", by], observed=True)[statistic].mean().unstack(by)


def max_slope_real_vs_random(runs: Sequence[Path]) -> Row:
    """Giglemiani et al.: the max-slope step of real targets comes before cov-random ones'."""
    stats, manifest, metric = _curves(runs[0])
    dirs = run_directions(manifest)
    real, cov = _labels(dirs, "real-difference")[0], _labels(dirs, "cov-random-difference")[0]
    table = ks_vs_reference(stats, reference=real).set_index("direction")
    r, c = table.loc[real], table.loc[cov]
    return _later(
        runs[0],
        _per_seq(stats, "max_slope_step", "direction"),
        cov,
        real,
        ours=f"max-slope step ({metric}) {real} {_f(r['mean'])} +- {_f(r['std'])} vs {cov} "
        f"{_f(c['mean'])} +- {_f(c['std'])}; KS {_f(c['ks'])}",
        test=f"; two-sample KS p = {_f(c['pvalue'])}",
    )


def _later(run: Path, wide: pd.DataFrame, a: str, b: str, ours: str, test: str = "") -> Row:
    """The row of a claim "a's step comes after b's": the mean paired difference a - b over
    prompts (``wide``: one row per prompt, a column per label) and its interval."""
    diff, lo, hi, n = paired_difference(wide[a].to_numpy(), wide[b].to_numpy())
    part = Undecided(f"{a} - {b}", diff, lo, hi, 0.0, n, "prompts", "", diff < 0.0, MIN_SEQS)
    return Row(
        ours=ours,
        sample=sample(run) + f"; {n} prompts",
        verdict=above(lo, hi, 0.0),
        ci_or_test=f"paired difference {a} - {b} {_f(diff)} steps, {CI_WORD} CI [{_f(lo)}, "
        f"{_f(hi)}] (prompts resampled){test}",
        undecided=(part,),
    )


def synthetic_like_real(runs: Sequence[Path]) -> Row:
    """Giglemiani et al.: every synthetic target's max-slope steps are closer to the real ones'
    (KS distance) than the cov-random ones' are."""
    stats, manifest, metric = _curves(runs[0])
    dirs = run_directions(manifest)
    real, cov = _labels(dirs, "real-difference")[0], _labels(dirs, "cov-random-difference")[0]
    synth = _labels(dirs, "synthetic")
    wide = _per_seq(stats, "max_slope_step", "direction")[[real, cov, *synth]].dropna()
    x = {k: wide[k].to_numpy() for k in wide.columns}

    def gaps(i: np.ndarray) -> np.ndarray:
        ks_cov = ks_statistic(x[cov][i], x[real][i])
        return np.array([ks_cov - ks_statistic(x[s][i], x[real][i]) for s in synth])

    if len(wide) >= MIN_SEQS:
        lo, hi = bootstrap_interval(gaps, len(wide), n_boot=1000)
    else:
        lo = hi = np.full(len(synth), np.nan)
    ks = {k: ks_statistic(x[k], x[real]) for k in (cov, *synth)}
    gap = {s: ks[cov] - ks[s] for s in synth}
    undecided = tuple(
        Undecided(s, gap[s], a, b, 0.0, len(wide), "prompts", s, bool(gap[s] < 0.0), MIN_SEQS)
        for s, a, b in zip(synth, lo, hi, strict=True)
        if above(a, b, 0.0) == "inconclusive"
    )
    return Row(
        ours=f"KS of the max-slope step ({metric}) to {real}: "
        + "; ".join(f"{k} {_f(v)}" for k, v in ks.items()),
        sample=sample(runs[0]) + f"; {len(wide)} prompts",
        verdict=combine([above(a, b, 0.0) for a, b in zip(lo, hi, strict=True)]),
        ci_or_test=f"{CI_WORD} CI of KS({cov}) - KS(synthetic) per target (prompts resampled): "
        + "; ".join(f"{s} [{_f(a)}, {_f(b)}]" for s, a, b in zip(synth, lo, hi, strict=True)),
        undecided=undecided,
    )


def _bases(manifest: dict[str, Any]) -> dict[str, DirectionConfig]:
    """A plateau run's base points by label (the preset's defaults when its config has none)."""
    from perturb_lens.experiments.plateaus import PlateauOptions

    raw = (manifest["config"].get("plateaus") or {}).get("bases")
    bases = PlateauOptions.model_validate({"bases": raw}).bases if raw else PlateauOptions().bases
    return {b.label: b for b in bases}


def plateau_longer(base: str) -> Callable[[Sequence[Path]], Row]:
    """Plateaus around real activations are longer than around ``base`` points (``cov-random``
    matches the bases made by a cov-random direction, ``synthetic`` the synthetic ones)."""

    def evaluate(runs: Sequence[Path]) -> Row:
        from perturb_lens.experiments.plateaus import REAL

        stats, manifest, metric = _curves(runs[0])
        bases = _bases(manifest)
        name = "cov-random-difference" if base == "cov-random" else base
        other = _labels(bases, name)[0]
        wide = _per_seq(stats, "plateau_length", "base")
        means = wide[[REAL, other]].mean()
        ours = (
            f"mean plateau length ({metric}, steps to 10% of the end value): {REAL} "
            f"{_f(means[REAL])} vs {other} {_f(means[other])}"
        )
        return _later(runs[0], wide, REAL, other, ours)

    return evaluate


def sharp_transitions(runs: Sequence[Path]) -> Row:
    """Janiak et al.: the interpolation between two prompts' activations changes the output in a
    few steps: the median sharpness is above STEEP times a straight line's (1 / (L - 1))."""
    stats, manifest, metric = _curves(runs[0])
    s = stats["sharpness"].to_numpy(np.float64)
    s = s[np.isfinite(s)]
    line = 1.0 / (len(manifest["meta"]["lengths"]) - 1)
    if s.size >= MIN_SEQS:
        lo, hi = (float(v[0]) for v in bootstrap_interval(lambda i: np.median(s[i]), s.size))
    else:
        lo = hi = np.nan
    q25, med, q75 = np.quantile(s, [0.25, 0.5, 0.75]) if s.size else (np.nan,) * 3
    bound = STEEP * line
    part = Undecided("median sharpness", med, lo, hi, bound, s.size, "prompt pairs",
                     against=bool(med < bound), min_n=MIN_SEQS)  # fmt: skip
    return Row(
        ours=f"sharpness ({metric}) quartiles {_f(q25)} / {_f(med)} / {_f(q75)}; a straight "
        f"line gives {_f(line)}",
        sample=sample(runs[0]) + f"; {s.size} prompt pairs",
        verdict=above(lo, hi, STEEP * line),
        ci_or_test=f"{CI_WORD} CI of the median sharpness [{_f(lo)}, {_f(hi)}] (pairs "
        f"resampled) vs {STEEP:g} x the straight line's = {_f(STEEP * line)}",
        undecided=(part,),
    )
