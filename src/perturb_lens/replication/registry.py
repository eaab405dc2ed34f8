"""The replication registry: one :func:`register_replication` call per published claim.

A claim names the run(s) it is judged on (folders under a runs root, see
:mod:`perturb_lens.replication.layout`) and an evaluator that reads those runs and returns a
:class:`Row`: our number, the sample it comes from, a verdict word and its interval or test.
This module imports nothing heavy, so the CLI can list the claims without loading pandas.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from perturb_lens.common.registry import registry

Verdict = Literal["replicated", "not replicated", "inconclusive"]
VERDICTS: tuple[str, ...] = ("replicated", "not replicated", "inconclusive")
NOT_RUN = "not run"


@dataclass(frozen=True)
class Undecided:
    """An interval that leaves a claim undecided: ``estimate`` with its CI ``low``-``high`` on
    ``n`` units (``unit``: seqs, prompts, pairs) against the ``bound`` the verdict compares it
    with; ``label`` names the part (a length, an SAE). Parts of one ``group`` (the lengths of
    one ordering) decide it as soon as one is decided; every group must be decided for the
    claim to replicate, while one ``against`` group (its estimate on the side that does not
    replicate) decides it alone. ``min_n``: the fewest units the rule judges at all."""

    label: str
    estimate: float
    low: float
    high: float
    bound: float
    n: int
    unit: str = "seqs"
    group: str = ""
    against: bool = False
    min_n: int = 0


@dataclass(frozen=True)
class Row:
    """What an evaluator finds: ``ours`` (our number), ``sample`` (model, hook, SAE, size),
    ``verdict`` (one of :data:`VERDICTS`) and ``ci_or_test`` (the interval or test behind it);
    where the verdict is inconclusive, ``undecided`` holds the intervals that left it so (the
    sample size that would decide it is computed from them)."""

    ours: str
    sample: str
    verdict: Verdict
    ci_or_test: str
    undecided: tuple[Undecided, ...] = ()

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} must be one of {VERDICTS}")


Evaluator = Callable[[Sequence[Path]], Row]
"""``fn(run_dirs) -> Row``: the claim's runs, in the order of its ``runs``."""


@dataclass(frozen=True)
class ReplicationClaim:
    """A published claim: ``claim_id``, ``paper``, ``claim`` (its text), ``paper_number`` (quoted
    from ``source``), ``runs`` (run names of :data:`~perturb_lens.replication.layout.RUNS`),
    ``evaluate`` and ``rule`` (how the verdict is decided, printed as a footnote)."""

    claim_id: str
    paper: str
    claim: str
    paper_number: str
    source: str
    runs: tuple[str, ...]
    evaluate: Evaluator
    rule: str


CLAIMS = registry("replication claim", "register one with perturb_lens.register_replication")
"""claim id -> :class:`ReplicationClaim`; the published ones (replication.claims) register at the
first lookup."""


def register_replication(claim_id: str, **fields: object) -> ReplicationClaim:
    """Register a published claim (fields: :class:`ReplicationClaim`); its runs must be in the
    layout. Registering an id again replaces it. Returns the entry."""
    from perturb_lens.replication.layout import RUNS

    entry = ReplicationClaim(claim_id=claim_id, **fields)  # type: ignore[arg-type]
    unknown = [r for r in entry.runs if r not in RUNS]
    if not entry.runs or unknown:
        raise ValueError(
            f"claim {claim_id!r}: runs {unknown or '[]'} are not in the runs-root layout "
            f"({', '.join(RUNS)}); add them to perturb_lens.replication.layout.RUNS"
        )
    return CLAIMS.register(claim_id, entry)


def replication_claims() -> list[ReplicationClaim]:
    """Every registered claim, in registration order."""
    return CLAIMS.values()
