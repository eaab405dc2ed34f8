"""The public API (issue 24): built around the run handle, each name documented and in the
README's API table, the ``register_*`` entry points exported, the 0.2 names still working with a
deprecation warning that names their replacement."""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path

import pytest

import perturb_lens as pl

README = Path(__file__).resolve().parents[1] / "README.md"


def _api_table() -> set[str]:
    section = README.read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([\w_]+)` \|", section, flags=re.MULTILINE))


def test_every_public_name_is_documented_and_in_the_readme_table() -> None:
    assert _api_table() == set(pl.__all__)
    for name in pl.__all__:
        if name != "__version__":
            assert (inspect.getdoc(getattr(pl, name)) or "").strip(), name


REGISTER = {
    "direction": "register_direction",
    "scale": "register_scale",
    "metric": "register_metric",
    "model family": "register_family",
    "experiment": "register_experiment",
    "figure set": "register_figures",
    "claim": "register_claim",
    "replication claim": "register_replication",
}


def test_every_registry_has_an_exported_register_function() -> None:
    from perturb_lens.builtins import BUILTINS

    assert set(BUILTINS) == set(REGISTER)
    assert set(REGISTER.values()) <= set(pl.__all__)


@pytest.mark.parametrize(
    ("name", "instead"),
    [
        ("curves", "Run.curves"),
        ("load_results", "Run.rows"),
        ("plot", "Run.figure"),
        ("run_aggregates", "Run.aggregates"),
        ("summary_table", "Run.summary"),
        ("threshold_lengths", "Run.thresholds"),
        ("verdicts", "Run.verdicts"),
    ],
)
def test_old_names_warn_and_still_work(name: str, instead: str) -> None:
    with pytest.warns(DeprecationWarning, match=re.escape(instead)):
        obj = getattr(pl, name)
    assert callable(obj)
    assert name not in pl.__all__


def test_old_class_names_warn() -> None:
    from perturb_lens import plots, results
    from perturb_lens.analysis.run_reader import RunReader
    from perturb_lens.results.store import ResultStore

    with pytest.warns(DeprecationWarning, match="RunReader"):
        assert plots.registry.RunView is RunReader
    with pytest.warns(DeprecationWarning, match="ResultStore"):
        assert results.RunStore is ResultStore
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pl.Run is pl.open_run.__globals__["Run"]  # the current names do not warn
