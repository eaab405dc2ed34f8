"""Analysis of stored rows: tables and curves of a results frame (:mod:`.tables`), per-curve
statistics (:mod:`.curve_stats`) and verdicts on claims with bootstrap intervals
(:mod:`.verdicts`)."""

from perturb_lens.analysis.tables import (
    bars,
    curves,
    histograms,
    kde_curves,
    ks_distances,
    pick_lengths,
    scatter_points,
    summary_table,
    threshold_lengths,
    threshold_summary,
    token_curves,
)
from perturb_lens.analysis.verdicts import (
    Claim,
    claim_intervals,
    format_verdicts,
    parse_claim,
    register_claim,
    registered_claims,
    verdict_table,
    verdicts,
)

__all__ = [
    "Claim",
    "bars",
    "claim_intervals",
    "curves",
    "format_verdicts",
    "histograms",
    "kde_curves",
    "ks_distances",
    "parse_claim",
    "pick_lengths",
    "register_claim",
    "registered_claims",
    "scatter_points",
    "summary_table",
    "threshold_lengths",
    "threshold_summary",
    "token_curves",
    "verdict_table",
    "verdicts",
]
