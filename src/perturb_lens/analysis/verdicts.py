"""Verdicts: does a published ordering of two directions hold in a run, at which lengths, how sure.

A claim compares the mean metric (the published mean over tokens) of two directions ``a`` and
``b`` of one run at each length: ``a > b`` (a's mean is above b's) or ``a ~ b`` (the ratio of
means lies within a band, default [0.8, 1.25]). The comparison is paired (same tokens, same
lengths) and its 95 % interval comes from resampling *sequences* (tokens of one sequence are not
independent): per (direction, length, sequence) sums and counts are streamed from the shards
(:func:`~perturb_lens.results.shards.sequence_sums`), then a seeded bootstrap of the sequences
gives an (expanded) percentile interval of the ratio of means a / b per length
(:func:`claim_intervals`); :func:`verdicts` sums that up, one row per claim.

Built-in claims (Lee & Heimersheim; Gurnee): real-difference > real-mixture,
cov-random-difference > cov-random-mixture, cov-random-mixture > isotropic,
real-mixture ~ cov-random-mixture, and SAE(x) > each epsilon-baseline (isotropic,
cov-random-mixture, real-mixture at ``scale: sae-error``; the SAE substitution runs of
``saes.suite``). :func:`register_claim` adds more.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from perturb_lens.common.registry import registry
from perturb_lens.config.schema import DirectionConfig
from perturb_lens.results.shards import run_directions, sequence_sums
from perturb_lens.results.store import MANIFEST, load_manifest
from perturb_lens.statistics.bootstrap import ratio_intervals
from perturb_lens.statistics.fit_size import MIN_FIT_PER_DIM

Op = Literal[">", "~"]
BAND = (0.8, 1.25)
MIN_SEQS = 10  # fewer paired sequences than this decide nothing (see claim_intervals)
MIN_SAMPLES_PER_DIM = MIN_FIT_PER_DIM  # fewer than 10 x d_model fit samples: unreliable
_CLAIM = re.compile(r"\s*(?P<a>[^<>~]*?)\s*(?P<op>[>~])\s*(?P<b>[^<>~]*?)\s*")
VERDICT_COLUMNS = [
    "claim",
    "metric",
    "verdict",
    "holds",
    "reversed",
    "inconclusive",
    "skipped",
    "ratio_min",
    "ratio_max",
    "n_seqs",
    "unreliable",
    "note",
]


GROWING_METRICS = ("kl", "l2", "js")  # 0 without a perturbation, larger the more it changes


def judged(experiment: str) -> bool:
    """Whether the direction claims judge runs of ``experiment`` (its registration says: not for
    experiments whose rows are per-base curves rather than directions swept from the same
    tokens). An experiment no longer registered is judged."""
    entry = registry("experiment").find(experiment)
    return True if entry is None else bool(entry.judged)


@dataclass(frozen=True)
class Claim:
    """``a op b`` on direction labels; ``scale_a``/``scale_b``: the claim applies only where the
    run's direction has that ``scale`` (None: any)."""

    a: str
    op: Op
    b: str
    source: str = "user"
    scale_a: str | None = None
    scale_b: str | None = None

    def __post_init__(self) -> None:
        if self.op not in (">", "~") or not self.a or not self.b or self.a == self.b:
            raise ValueError(
                f"claim {self.text!r} must compare two different direction labels with '>' or "
                "'~' (e.g. 'real-difference > real-mixture')"
            )

    @property
    def text(self) -> str:
        return f"{self.a} {self.op} {self.b}"

    def applies(self, scales: dict[str, str]) -> bool:
        """Whether a run whose directions (label -> scale) are ``scales`` has both sides."""
        return all(
            label in scales and (want is None or scales[label] == want)
            for label, want in ((self.a, self.scale_a), (self.b, self.scale_b))
        )


def parse_claim(text: str, *, source: str = "user") -> Claim:
    """``"a > b"`` or ``"a ~ b"`` (direction labels either side) as a :class:`Claim`."""
    m = _CLAIM.fullmatch(text)
    if m is None or not m["a"] or not m["b"]:
        raise ValueError(
            f"claim {text!r} must read 'a > b' or 'a ~ b' with a direction label either side "
            "(e.g. 'real-difference > real-mixture')"
        )
    return Claim(m["a"], m["op"], m["b"], source=source)  # type: ignore[arg-type]


CLAIMS = registry("claim", "register yours with perturb_lens.register_claim")
"""claim text -> :class:`Claim` (built-in first, registered below)."""


def register_claim(claim: str | Claim, *, source: str = "user") -> Claim:
    """Add a claim (a :class:`Claim` or text ``"a > b"`` / ``"a ~ b"``) to those :func:`verdicts`
    tests by default; registering the same text again replaces it. Returns the claim."""
    c = parse_claim(claim, source=source) if isinstance(claim, str) else claim
    return CLAIMS.register(c.text, c)


def registered_claims() -> list[Claim]:
    """The claims :func:`verdicts` tests by default (built-in first, in registration order)."""
    return CLAIMS.values()


for _text in (
    "real-difference > real-mixture",
    "cov-random-difference > cov-random-mixture",
    "cov-random-mixture > isotropic",
    "real-mixture ~ cov-random-mixture",
):
    register_claim(_text, source="Lee & Heimersheim")
for _baseline in ("isotropic", "cov-random-mixture", "real-mixture"):
    register_claim(
        Claim("SAE(x)", ">", _baseline, source="Gurnee", scale_a="raw", scale_b="sae-error")
    )


# ---------------------------------------------------------------------------------------------
# The paired bootstrap


# ---------------------------------------------------------------------------------------------
# Claims on a run


def _claims_for(
    claims: Iterable[str | Claim] | str | Claim | None, directions: dict[str, DirectionConfig]
) -> list[Claim]:
    """The claims to test: the applicable registered ones, or all given (each must apply)."""
    scales = {label: spec.scale for label, spec in directions.items()}
    if claims is None:
        return [c for c in registered_claims() if c.applies(scales)]
    claims = [claims] if isinstance(claims, str | Claim) else claims  # one claim, not a list
    out = [parse_claim(c) if isinstance(c, str) else c for c in claims]
    for c in out:
        if not c.applies(scales):
            raise ValueError(
                f"claim {c.text!r} does not apply to this run: it needs directions {c.a!r}"
                f"{f' (scale {c.scale_a})' if c.scale_a else ''} and {c.b!r}"
                f"{f' (scale {c.scale_b})' if c.scale_b else ''}; the run has {scales} "
                "(label: scale)"
            )
    return out


def _outcome(op: Op, lo: float, hi: float, band: tuple[float, float]) -> str:
    """``holds`` / ``reversed`` / ``inconclusive`` at one length from the interval [lo, hi]."""
    if np.isnan(lo) or np.isnan(hi):
        return "inconclusive"
    if op == ">":
        return "holds" if lo > 1.0 else "reversed" if hi < 1.0 else "inconclusive"
    if band[0] <= lo and hi <= band[1]:
        return "holds"
    return "reversed" if hi < band[0] or lo > band[1] else "inconclusive"


def claim_intervals(
    run_dir: str | Path,
    claims: Iterable[str | Claim] | str | Claim | None = None,
    metric: str = "kl",
    *,
    ci: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
    band: tuple[float, float] = BAND,
    min_seqs: int = MIN_SEQS,
    verify: bool = True,
) -> pd.DataFrame:
    """One row per claim and length: ``mean_a``, ``mean_b``, ``ratio`` (a / b), its interval
    ``ci_low``/``ci_high`` (:func:`ratio_intervals`), ``n_seqs`` and ``outcome``.

    ``outcome``: for ``>``, ``holds`` where the interval lies above 1, ``reversed`` below 1; for
    ``~``, ``holds`` where it lies within ``band``, ``reversed`` (they differ) where it lies
    entirely outside; ``inconclusive`` otherwise, and wherever fewer than ``min_seqs``
    sequences pair (the percentile bootstrap under-covers on a handful of sequences: 4 have only
    35 distinct resamples); ``skipped`` at the noise floor: where both means are at most the
    larger of the two means at length 0 (alpha = 0; 0 without it).
    """
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if min_seqs < 2:
        raise ValueError(f"min_seqs must be at least 2 (an interval needs two), got {min_seqs}")
    if not 0.0 < band[0] <= 1.0 <= band[1]:
        raise ValueError(f"band must be (low, high) with 0 < low <= 1 <= high, got {band}")
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    experiment = manifest["config"].get("experiment", "sensitive-directions")
    if not judged(experiment):
        raise ValueError(
            f"{run_dir} is a {experiment!r} run: verdicts compare directions swept from the same "
            "tokens (sensitive-directions or synthetic-activations runs), not its per-base rows"
        )
    directions = run_directions(manifest)
    chosen = _claims_for(claims, directions)
    columns = ["claim", "op", "a", "b", "length", "mean_a", "mean_b", "ratio"]
    columns += ["ci_low", "ci_high", "n_seqs", "outcome"]
    if not chosen:
        return pd.DataFrame(columns=columns)
    needed = {d for c in chosen for d in (c.a, c.b)}
    sums = sequence_sums(run_dir, metric, needed, verify=verify)
    if sums.empty:
        raise ValueError(
            f"{run_dir} has no result rows of {sorted(needed)} yet (no shard written): run or "
            "resume the run first"
        )
    _check_nonnegative(sums, metric)
    lengths, seqs = np.sort(sums["length"].unique()), np.sort(sums["seq"].unique())
    # all claims side by side, so that one set of resamples serves them all
    a, b = (_side(sums, [getattr(c, s) for c in chosen], seqs, lengths) for s in ("a", "b"))
    joint = ratio_intervals(a, b, ci=ci, n_boot=n_boot, seed=seed)
    frames = []
    for i, claim in enumerate(chosen):
        res = joint.iloc[i * lengths.size : (i + 1) * lengths.size].reset_index(drop=True)
        res.insert(0, "length", lengths)
        res["outcome"] = [
            _outcome(claim.op, lo, hi, band)
            for lo, hi in zip(res["ci_low"], res["ci_high"], strict=True)
        ]
        res.loc[res["n_seqs"] < min_seqs, "outcome"] = "inconclusive"
        floor = _noise_floor(res)
        res.loc[(res["mean_a"] <= floor) & (res["mean_b"] <= floor), "outcome"] = "skipped"
        res.loc[res["n_seqs"] == 0, "outcome"] = "skipped"
        for j, (name, value) in enumerate(
            zip(("claim", "op", "a", "b"), (claim.text, claim.op, claim.a, claim.b), strict=True)
        ):
            res.insert(j, name, value)
        frames.append(res[columns])
    out = pd.concat(frames, ignore_index=True)
    out.attrs.update(metric=metric, ci=ci, n_boot=n_boot, seed=seed, band=band, min_seqs=min_seqs)
    out.attrs["n_nan"] = _nan_counts(sums)
    return out


def _check_nonnegative(sums: pd.DataFrame, metric: str) -> None:
    if (sums["sum"] < 0).any():
        raise ValueError(
            f"metric {metric!r} takes negative values: verdicts compare ratios of means, which "
            "need a non-negative metric (kl, l2 or js)"
        )


def sequence_matrix(
    sums: pd.DataFrame, label: str, seqs: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(sums, counts)`` of one direction as [n_seqs, n_lengths] over ``seqs`` (sorted; zeros
    where a sequence has no row at a length)."""
    part = sums[sums["direction"] == label]
    i = np.searchsorted(seqs, part["seq"].to_numpy())
    j = np.searchsorted(lengths, part["length"].to_numpy())
    s, n = np.zeros((seqs.size, lengths.size)), np.zeros((seqs.size, lengths.size))
    s[i, j], n[i, j] = part["sum"].to_numpy(), part["n"].to_numpy()
    return s, n


def _side(
    sums: pd.DataFrame, labels: list[str], seqs: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(sums, counts)`` of the directions ``labels`` side by side, [n_seqs, n_labels x
    n_lengths] (see :func:`sequence_matrix`)."""
    mats = [sequence_matrix(sums, label, seqs, lengths) for label in labels]
    return np.hstack([m[0] for m in mats]), np.hstack([m[1] for m in mats])


def _noise_floor(res: pd.DataFrame) -> float:
    """The larger of the two means at length 0 (alpha = 0), or 0 when the grid lacks it."""
    at_zero = res.loc[res["length"] == 0.0, ["mean_a", "mean_b"]].to_numpy()
    return float(np.nanmax(at_zero)) if at_zero.size and not np.isnan(at_zero).all() else 0.0


def _nan_counts(sums: pd.DataFrame) -> dict[str, int]:
    counts = sums.groupby("direction", observed=True)["n_nan"].sum()
    return {str(k): int(v) for k, v in counts.items() if v}


def stats_fit(
    run_dir: str | Path, manifest: dict[str, Any] | None = None
) -> tuple[int, int] | None:
    """``(samples, d_model)`` the run's activation statistics were fitted on, or None if unknown.

    From the manifest (``meta.stats.n_samples`` and ``meta.stats.d_model`` or ``meta.d_model``),
    else from the run's ``stats.safetensors``.
    """
    from perturb_lens.statistics.fit_size import fit_size

    run_dir = Path(run_dir)
    meta = (manifest or load_manifest(run_dir)).get("meta", {})
    stats = meta.get("stats") if isinstance(meta.get("stats"), dict) else {}
    n, d = stats.get("n_samples"), stats.get("d_model", meta.get("d_model"))
    if n is not None and d is not None:
        return int(n), int(d)
    path = run_dir / "stats.safetensors"
    if not path.is_file():
        return None
    file_n, file_d = fit_size(path)
    return int(n if n is not None else file_n), file_d


def verdicts(
    run_dir: str | Path,
    claims: Iterable[str | Claim] | str | Claim | None = None,
    metric: str = "kl",
    **options: Any,
) -> pd.DataFrame:
    """One row per claim that applies to the run (both directions present): where it holds.

    ``claims``: a claim or claims (text ``"a > b"`` / ``"a ~ b"`` or :class:`Claim`) to test,
    each of which must apply; None tests the registered claims that apply. ``options`` go to
    :func:`claim_intervals` (``ci``, ``n_boot``, ``seed``, ``band``, ``min_seqs``, ``verify``).

    Columns: ``claim``, ``metric``, ``verdict``; ``holds``, ``reversed``, ``inconclusive`` and
    ``skipped`` (lists of lengths, see :func:`claim_intervals`); ``ratio_min``/``ratio_max`` (the
    range of a / b over the lengths not skipped); ``n_seqs`` (fewest paired sequences at those
    lengths); ``unreliable`` (True when the claim involves a cov-random direction and the
    statistics were fitted on fewer than 10 x d_model samples; NA when that is unknown) and
    ``note``. The verdict is one word: ``holds`` (holds at some length, reversed at none),
    ``reversed`` (reversed at some length, holds at none; for ``~``: differs), ``mixed`` (holds at
    some lengths, reversed at others) or ``inconclusive`` (neither, at every length).

    ``run_dir`` may also be a suite folder (``saes.suite``: one run per SAE in ``<out>/<label>``):
    then each run's rows, with its folder name in a first column ``run``.
    """
    run_dir = Path(run_dir)
    if not (run_dir / MANIFEST).is_file():
        runs = sorted(p for p in run_dir.glob("*/") if (p / MANIFEST).is_file())
        if runs:
            frames = [verdicts(r, claims, metric, **options) for r in runs]
            out = pd.concat(
                [f.assign(run=r.name) for f, r in zip(frames, runs, strict=True)],
                ignore_index=True,
            )
            return out[["run", *VERDICT_COLUMNS]].astype({"unreliable": "boolean"})
    manifest = load_manifest(run_dir)
    detail = claim_intervals(run_dir, claims, metric, **options)
    fit = stats_fit(run_dir, manifest)
    directions = run_directions(manifest)
    rows = [
        _claim_row(g, metric, directions, fit, detail.attrs)
        for _, g in detail.groupby("claim", sort=False)
    ]
    out = pd.DataFrame(rows, columns=VERDICT_COLUMNS)
    out["unreliable"] = out["unreliable"].astype("boolean")
    out.attrs.update(detail.attrs, stats_fit=fit)
    return out


_OUTCOMES = ("holds", "reversed", "inconclusive", "skipped")


def _claim_row(
    g: pd.DataFrame,
    metric: str,
    directions: dict[str, DirectionConfig],
    fit: tuple[int, int] | None,
    attrs: dict[str, Any],
) -> dict[str, Any]:
    """The verdict row of one claim from its per-length rows ``g`` and the ``attrs`` of
    :func:`claim_intervals`."""
    where = {k: g.loc[g["outcome"] == k, "length"].tolist() for k in _OUTCOMES}
    kept = g[g["outcome"] != "skipped"]
    labels = g.iloc[0][["a", "b"]].tolist()
    unreliable, note = _reliability(
        any(directions[x].name.startswith("cov-random") for x in labels), fit
    )
    notes = [note]
    if not len(kept):
        notes.append(_why_nothing_judged(g, metric))
    elif kept["n_seqs"].min() < attrs["min_seqs"]:
        notes.append(f"fewer than {attrs['min_seqs']} sequences pair: left inconclusive there")
    nan = {x: attrs["n_nan"][x] for x in labels if x in attrs["n_nan"]}
    if nan:
        notes.append(f"NaN rows left out: {nan}")
    return {
        "claim": g.iloc[0]["claim"],
        "metric": metric,
        "verdict": _verdict(where),
        **where,
        "ratio_min": float(kept["ratio"].min()) if len(kept) else np.nan,
        "ratio_max": float(kept["ratio"].max()) if len(kept) else np.nan,
        "n_seqs": int(kept["n_seqs"].min()) if len(kept) else 0,
        "unreliable": unreliable,
        "note": "; ".join(filter(None, notes)),
    }


def _why_nothing_judged(g: pd.DataFrame, metric: str) -> str:
    """Why a claim's every length was skipped (its verdict then says ``inconclusive``)."""
    if (g["n_seqs"] == 0).all():
        return "no sequence has finite rows of both directions at any length: nothing to compare"
    floor = (
        f"skipped at every length: both means are at or below the noise floor "
        f"({_noise_floor(g):.3g}, the larger mean at length 0), so there is nothing to judge"
    )
    if metric in GROWING_METRICS:
        return f"{floor}; longer lengths would show whether the directions differ"
    return (
        f"{floor}. A ratio of means measures sensitivity only for a metric that is 0 without a "
        f"perturbation and grows with it ({', '.join(GROWING_METRICS)}); {metric!r} is not one"
        + (" (a similarity: 1 when nothing changes): use --metric kl" if metric == "cos" else "")
    )


def _verdict(where: dict[str, list[float]]) -> str:
    if where["holds"] and where["reversed"]:
        return "mixed"
    return "holds" if where["holds"] else "reversed" if where["reversed"] else "inconclusive"


def _reliability(cov: bool, fit: tuple[int, int] | None) -> tuple[bool | None, str]:
    if not cov:
        return False, ""
    if fit is None:
        return None, "statistics fit size unknown (cov-random directions)"
    n, d = fit
    if n < MIN_SAMPLES_PER_DIM * d:
        return True, (
            f"cov-random statistics fitted on {n} samples < {MIN_SAMPLES_PER_DIM} x d_model = "
            f"{MIN_SAMPLES_PER_DIM * d}: fit on more tokens"
        )
    return False, ""


# ---------------------------------------------------------------------------------------------
# Printing


def _length_ranges(chosen: Sequence[float], grid: Sequence[float]) -> str:
    """Lengths as runs of consecutive grid points: ``0.01-0.2, 0.4`` (``-`` where none)."""
    if not chosen:
        return "-"
    picked = set(chosen)
    runs: list[list[float]] = []
    prev_in = False
    for x in grid:
        if x in picked:
            if prev_in:
                runs[-1].append(x)
            else:
                runs.append([x])
        prev_in = x in picked
    return ", ".join(f"{r[0]:.3g}" if len(r) == 1 else f"{r[0]:.3g}-{r[-1]:.3g}" for r in runs)


def verdict_rows(table: pd.DataFrame) -> list[dict[str, str]]:
    """The verdict table as strings, one dict per claim (what the text and rich tables show)."""
    rows = []
    for _, r in table.iterrows():
        run = {"run": r["run"]} if "run" in table.columns else {}
        grid = sorted(r["holds"] + r["reversed"] + r["inconclusive"])
        lo, hi = f"{r['ratio_min']:.3g}", f"{r['ratio_max']:.3g}"
        ratio = "-" if np.isnan(r["ratio_min"]) else lo if lo == hi else f"{lo}-{hi}"
        flag = "unknown" if pd.isna(r["unreliable"]) else "yes" if r["unreliable"] else ""
        rows.append(
            {
                **run,
                "claim": r["claim"],
                "verdict": r["verdict"],
                "holds at": _length_ranges(r["holds"], grid),
                "reversed at": _length_ranges(r["reversed"], grid),
                "inconclusive at": _length_ranges(r["inconclusive"], grid),
                "ratio a/b": ratio,
                "seqs": str(r["n_seqs"]),
                "unreliable": flag,
            }
        )
    return rows


def verdict_notes(table: pd.DataFrame) -> list[str]:
    """``[run: ]claim: note`` for every claim with a note."""
    where = table["run"] + ": " + table["claim"] if "run" in table.columns else table["claim"]
    return [f"{w}: {n}" for w, n in zip(where, table["note"], strict=True) if n]


def format_verdicts(table: pd.DataFrame) -> str:
    """The verdict table as plain text (fixed-width columns), notes below it."""
    rows = verdict_rows(table)
    if not rows:
        return "No claim applies to this run's directions."
    text = pd.DataFrame(rows).to_string(index=False)
    notes = [f"  {n}" for n in verdict_notes(table)]
    return "\n".join([text, *(["Notes:", *notes] if notes else [])])


def verdict_table(table: pd.DataFrame, title: str | None = None) -> Any:
    """The verdict table as a :class:`rich.table.Table` (notes as its caption)."""
    from rich.table import Table

    metric = table["metric"].iloc[0] if len(table) else ""
    out = Table(title=title or f"Verdicts ({metric}, 95% CI, sequences resampled)")
    rows = verdict_rows(table)
    # narrow terminals: every column wraps, but the claim and the verdict word stay readable
    min_width = {"claim": 20, "verdict": len("inconclusive")}
    for col in rows[0] if rows else ["claim", "verdict"]:
        right = col in ("ratio a/b", "seqs")
        out.add_column(col, justify="right" if right else "left", min_width=min_width.get(col))
    for r in rows:
        out.add_row(*r.values())
    notes = verdict_notes(table)
    if notes:
        out.caption = "\n".join(notes)
    return out
