"""Replication of the published claims: a registry of claims, each judged on its runs under a
runs root, and the generated ``REPLICATION.md`` (``perturb-lens replication RUNS_ROOT``)."""

from perturb_lens.replication.across import (
    model_folders,
    models_markdown,
    models_results,
    write_replication,
)
from perturb_lens.replication.layout import RUNS, ReplicationRun, layout_text
from perturb_lens.replication.models import MODEL_LAYERS, PRESET_MODEL, middle_hook
from perturb_lens.replication.registry import (
    NOT_RUN,
    VERDICTS,
    ReplicationClaim,
    Row,
    Undecided,
    register_replication,
    replication_claims,
)
from perturb_lens.replication.table import (
    CANNOT_JUDGE,
    Result,
    evaluate_claim,
    replication_markdown,
    replication_results,
)

__all__ = [
    "CANNOT_JUDGE",
    "MODEL_LAYERS",
    "NOT_RUN",
    "PRESET_MODEL",
    "RUNS",
    "VERDICTS",
    "ReplicationClaim",
    "ReplicationRun",
    "Result",
    "Row",
    "Undecided",
    "evaluate_claim",
    "layout_text",
    "middle_hook",
    "model_folders",
    "models_markdown",
    "models_results",
    "register_replication",
    "replication_claims",
    "replication_markdown",
    "replication_results",
    "write_replication",
]
