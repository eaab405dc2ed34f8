"""The package imports lazily: ``perturb-lens report`` (and ``compare``) never load torch, the
public API is one attribute access away, and the registries still hold every built-in at their first
lookup, with the config (and its hash) the same whichever module was imported first.

Each check runs in a fresh interpreter (this one has torch loaded already)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic_runs import make_run, small_config

from perturb_lens.config.schema import validate_config
from perturb_lens.results import ResultStore, config_hash
from perturb_lens.results.aggregate import aggregate_rows

SRC = Path(__file__).resolve().parents[1] / "src"


def fresh_python(code: str) -> dict:
    """Run ``code`` in a new interpreter with these sources first; it prints one JSON line last."""
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _report_code(*args: str) -> str:
    """The CLI in-process with ``args``; prints whether torch got loaded and the exit code."""
    return (
        "import json, sys\n"
        "from perturb_lens.cli.app import app\n"
        "before = 'torch' in sys.modules\n"
        "try:\n"
        f"    app({list(args)!r})\n"
        "    code = 0\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "print(json.dumps({'before': before, 'torch': 'torch' in sys.modules, 'code': code}))\n"
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A rows run and an aggregate run of the same synthetic rows."""
    root = tmp_path_factory.mktemp("lazy")
    rows_run = make_run(root / "rows", small_config())
    cfg = validate_config({**small_config(), "results": "aggregate"}).model_dump(mode="json")
    meta = {"scope": "all-positions", "seq_len": 6, "drop_last_position": True}
    from perturb_lens.results.summary import summary_rows

    rows = summary_rows(rows_run)
    with ResultStore(root / "agg") as store:
        store.create(cfg, config_hash(cfg), meta, resume=False)
        store.write_shard("s0", aggregate_rows(rows, ["kl"], meta))
        store.finish()
    return rows_run, root / "agg"


def test_report_and_compare_never_import_torch(runs: tuple[Path, Path], tmp_path: Path) -> None:
    rows_run, agg_run = runs
    got = fresh_python(_report_code("report", str(rows_run), "--out", str(tmp_path / "rep")))
    assert got == {"before": False, "torch": False, "code": 0}
    assert (tmp_path / "rep" / "report.html").is_file()
    # both result modes (the aggregate run streamed like the rows run)
    cmp = _report_code("compare", str(rows_run), str(agg_run), "--out", str(tmp_path / "cmp"))
    assert fresh_python(cmp) == {"before": False, "torch": False, "code": 0}
    assert (tmp_path / "cmp" / "compare.html").is_file()


def test_public_api_is_imported_on_first_access() -> None:
    got = fresh_python(
        "import json, sys\n"
        "import perturb_lens as pl\n"
        "light = 'torch' not in sys.modules\n"
        "from perturb_lens.models.load import load_model\n"
        "from perturb_lens.workflows.experiment import run_experiment\n"
        "ok = pl.load_model is load_model and pl.run_experiment is run_experiment\n"
        "names = sorted(n for n in pl.__all__ if not hasattr(pl, n))\n"
        "from perturb_lens.saes import load_sae\n"
        "ok = ok and pl.saes.load_sae is load_sae  # subpackages too (README: pl.saes...)\n"
        "try:\n"
        "    pl.no_such_name\n"
        "    missing = False\n"
        "except AttributeError:\n"
        "    missing = True\n"
        "print(json.dumps({'light': light, 'ok': ok, 'unresolved': names, 'missing': missing,\n"
        "                  'dir': set(pl.__all__) <= set(dir(pl))}))\n"
    )
    assert got == {"light": True, "ok": True, "unresolved": [], "missing": True, "dir": True}


LOOKUPS = (
    "from perturb_lens.config.schema import load_config\n"
    "from perturb_lens.directions.base import get_direction, list_directions, list_scales\n"
    "from perturb_lens.experiments import get_experiment, list_experiments\n"
    "from perturb_lens.results import config_hash\n"
    "over = ['experiment=plateaus', 'scope=last-position']\n"
    "cfg = load_config(None, over).model_dump(mode='json')\n"
    "out = {'experiments': [e.name for e in list_experiments()],\n"
    "       'callable': callable(get_experiment('plateaus').shard),\n"
    "       'directions': [d.name for d in list_directions()], 'scales': list(list_scales()),\n"
    "       'sae': callable(get_direction('sae-error')), 'hash': config_hash(cfg)}\n"
    "print(json.dumps(out))\n"
)


def test_registries_hold_the_builtins_at_first_lookup() -> None:
    """Lazily (nothing imported first) and eagerly (every registering module imported first,
    as the package did before it imported lazily), the same registries and config hash."""
    lazy = fresh_python("import json\n" + LOOKUPS)
    eager = fresh_python(
        "import json\n"
        "import perturb_lens.saes, perturb_lens.experiments.builtin\n"
        "import perturb_lens.experiments.plateaus, perturb_lens.experiments.same_cosine\n"
        "import perturb_lens.experiments.stable_regions\n"
        "import perturb_lens.experiments.synthetic_activations\n" + LOOKUPS
    )
    assert lazy == eager
    assert lazy["experiments"] == [
        "plateaus",
        "same-cosine",
        "sensitive-directions",
        "stable-regions",
        "synthetic-activations",
    ]
    assert {"sae-error", "sae-feature", "synthetic", "sae-latent", "isotropic"} <= set(
        lazy["directions"]
    )
    assert "sae-error" in lazy["scales"] and lazy["callable"] and lazy["sae"]


def test_own_registration_before_any_lookup_is_kept() -> None:
    """Registering a built-in's name before the built-ins were loaded replaces it, as after."""
    got = fresh_python(
        "import json\n"
        "from perturb_lens.experiments import get_experiment, register_experiment\n"
        "def mine(ctx, shard_id):\n"
        "    return None\n"
        "register_experiment('sensitive-directions', mine, figures='curves')\n"
        "info = get_experiment('sensitive-directions')\n"
        "print(json.dumps({'mine': info.shard is mine, 'figures': info.figures,\n"
        "                  'others': get_experiment('plateaus').name}))\n"
    )
    assert got == {"mine": True, "figures": "curves", "others": "plateaus"}
