"""Replication of the published claims: a registry of claims, each judged on its runs under a
runs root, and the generated ``REPLICATION.md`` (``perturb-lens replication RUNS_ROOT``)."""

from perturb_lens.replication.layout import RUNS, ReplicationRun, layout_text
from perturb_lens.replication.registry import (
    NOT_RUN,
    VERDICTS,
    ReplicationClaim,
    Row,
    register_replication,
    replication_claims,
)
from perturb_lens.replication.table import (
    CANNOT_JUDGE,
    Result,
    evaluate_claim,
    replication_markdown,
    replication_results,
    write_replication,
)

__all__ = [
    "CANNOT_JUDGE",
    "NOT_RUN",
    "RUNS",
    "VERDICTS",
    "ReplicationClaim",
    "ReplicationRun",
    "Result",
    "Row",
    "evaluate_claim",
    "layout_text",
    "register_replication",
    "replication_claims",
    "replication_markdown",
    "replication_results",
    "write_replication",
]
