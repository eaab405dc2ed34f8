"""Property test of the command line: generated ``key=value`` overrides, valid and invalid.

Every invalid input must exit 1 with one ``Error: ...`` message naming the offending key (or the
bad value), no traceback, and no run directory left behind. Every valid one must exit 0 with a
complete run directory whose manifest records the overrides and lists every shard file with its
sha256 and the expected number of rows.

Which inputs are valid is decided here, independently of the code (the rules of the README and
SPEC written out plainly), so a validator that lets a bad value through, or refuses a good one,
fails the test. Examples are derandomized (the same on every machine and CI run); the default
test is small enough for well under a minute on a quiet machine, the slow one runs 300 examples
(``PERTURB_LENS_PROPERTY_EXAMPLES`` sets the default test's count).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import run_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from perturb_lens.cli.app import app
from perturb_lens.config.schema import BASELINES
from perturb_lens.results import load_manifest

N_LAYERS = 4  # the tiny GPT-2 of conftest.gpt2_dir
KINDS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
DIRECTIONS = (*BASELINES, "ablation")
METRICS = ("kl", "js", "dce", "top1", "l2", "cos")
EXAMPLES = int(os.environ.get("PERTURB_LENS_PROPERTY_EXAMPLES", "25"))


@dataclass(frozen=True)
class Choice:
    """One override: its key, the text typed after ``=``, and if invalid what the message must
    contain (the key, or the bad value where the key is implied)."""

    key: str
    text: str
    needle: str | None = None  # None: valid

    @property
    def arg(self) -> str:
        return f"{self.key}={self.text}"


def ok(key: str, text: object) -> Choice:
    return Choice(key, str(text))


def bad(key: str, text: object, needle: str | None = None) -> Choice:
    return Choice(key, str(text), needle or key)


def flow(values: list) -> str:
    """A YAML flow list as typed on a command line: [a,b,c]."""
    return "[" + ",".join(str(v) for v in values) + "]"


def name_choice(text: str) -> Choice:
    """A plain name is valid, unless YAML reads it as another type (123, yes, null): then the
    message must name the key (the fix: quote it)."""
    return ok("name", text) if isinstance(yaml.safe_load(text), str) else bad("name", text)


hooks = st.builds(
    lambda layer, kind: f"blocks.{layer}.{kind}",
    st.integers(0, N_LAYERS - 1),
    st.sampled_from(KINDS),
)
lengths = st.one_of(
    st.lists(st.integers(0, 40), min_size=1, max_size=4, unique=True).map(
        lambda v: ok("lengths", flow(v))
    ),
    st.sampled_from(["0:4:2", "1:20:19", "0:1:0.5", "published"]).map(lambda v: ok("lengths", v)),
    st.sampled_from(
        [
            bad("lengths", "[0,-1]", "lengths"),
            bad("lengths", "[0,3,3]", "appear more than once"),
            bad("lengths", "a:b:c", "'a:b:c'"),
            bad("lengths", "0:1e6:1", "cap of 1,000"),
            bad("lengths", "[]", "lengths"),
            bad("lengths", "nope", "'nope'"),
            bad("lengths", "5:1:-1", "positive step"),
            bad("lengths", "[0,.nan]", "lengths"),
        ]
    ),
)  # fmt: skip
choices = st.one_of(
    st.integers(1, 3).map(lambda n: ok("data.n_seqs", n)),
    st.sampled_from(["0", "-2", "abc", "1.5", "100000"]).map(lambda v: bad("data.n_seqs", v)),
    st.integers(2, 12).map(lambda n: ok("data.seq_len", n)),
    st.sampled_from(["1", "0", "x", "300"]).map(lambda v: bad("data.seq_len", v, "seq_len")),
    st.integers(1, 3).map(lambda n: ok("shard_seqs", n)),
    st.sampled_from(["0", "many"]).map(lambda v: bad("shard_seqs", v)),
    st.integers(0, 2**63 - 1).map(lambda n: ok("seed", n)),
    st.sampled_from(["-1", str(2**64), "s", "1.5"]).map(lambda v: bad("seed", v)),
    st.sampled_from(["all-positions", "single-position", "last-position"]).map(
        lambda v: ok("scope", v)
    ),
    st.just(bad("scope", "everywhere")),
    hooks.map(lambda h: ok("hook", h)),
    st.sampled_from(
        ["blocks.9.hook_resid_pre", "resid", "blocks.1.hook_z", "blocks.-1.hook_resid_pre"]
    ).map(lambda v: bad("hook", v, f"'{v}'")),
    hooks.map(lambda h: ok("read", h)),  # validity depends on the hook: see effective()
    st.just(bad("read", "blocks.x.hook_resid_post", "read 'blocks.x.hook_resid_post'")),
    st.just(bad("read", "blocks.4.hook_resid_post", "'blocks.4.hook_resid_post'")),
    lengths,
    st.lists(st.sampled_from(DIRECTIONS), min_size=1, max_size=3, unique=True).map(
        lambda v: ok("directions", flow(v))
    ),
    st.sampled_from(
        [
            bad("directions", "[isotropic,foo-dir]", "'foo-dir'"),
            bad("directions", "[isotropic,isotropic]", "directions"),
            bad("directions", "[]", "directions"),
        ]
    ),
    st.lists(st.sampled_from(METRICS), min_size=1, max_size=3, unique=True).map(
        lambda v: ok("metrics", flow(v))
    ),
    st.sampled_from([bad("metrics", "[kl,foo]", "'foo'"), bad("metrics", "[]", "metrics")]),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,15}", fullmatch=True).map(name_choice),
    st.sampled_from(["../x", "/tmp/evil", "a/b", ".hidden", "''"]).map(
        lambda v: bad("name", v, "name")
    ),
    st.sampled_from(["float32", "float64"]).map(lambda v: ok("dtype", v)),
    st.just(bad("dtype", "int8")),
    st.sampled_from(["true", "false"]).map(lambda v: ok("relative_lengths", v)),
    st.just(bad("relative_lengths", "maybe")),
    st.just(ok("device", "cpu")),
    st.sampled_from(["tpu9", "cuda:x"]).map(lambda v: bad("device", v)),
    st.integers(2, 64).map(lambda n: ok("stats.pool_size", n)),
    st.just(bad("stats.pool_size", "1")),
    st.sampled_from(["foo", "data.foo", "stats.bar"]).map(
        lambda k: bad(k, "1", f"unknown key '{k}'")
    ),
    st.just(bad("data.n_seqs.x", "1", "data.n_seqs")),
)


def hook_order(name: str) -> tuple[int, int]:
    layer, kind = name.split(".")[1:]
    return int(layer), KINDS.index(kind)


def effective(picked: dict[str, Choice]) -> dict[str, Choice]:
    """The overrides as the run sees them: a read before the hook is invalid (the perturbation
    cannot reach it)."""
    out = dict(picked)
    hook = picked.get("hook")
    read = picked.get("read")
    if read is not None and read.needle is None:
        h = hook.text if hook is not None and hook.needle is None else "blocks.1.hook_resid_pre"
        if hook_order(read.text) < hook_order(h):
            out["read"] = bad("read", read.text, "read")
    return out


@pytest.fixture(scope="module")
def base_file(tmp_path_factory: pytest.TempPathFactory, gpt2_dir: Path, text_file: Path) -> Path:
    """A tiny valid run (2 sequences of 6 tokens, one direction, two lengths) as a YAML file."""
    folder = tmp_path_factory.mktemp("property")
    path = folder / "base.yaml"
    base = run_config(
        gpt2_dir,
        text_file,
        layer=1,
        seq_len=6,
        n_seqs=2,
        pool_size=16,
        name="prop",
        shard_seqs=1,
        lengths=[0, 2],
        directions=["isotropic"],
        metrics=["kl"],
    )
    path.write_text(yaml.safe_dump(base))
    return path


def expected_rows(cfg: dict) -> int:
    """Rows of a run: one per sequence x measured position x direction x length."""
    n, t = cfg["data"]["n_seqs"], cfg["data"]["seq_len"]
    positions = 1 if cfg["scope"] == "last-position" else t
    return n * positions * len(cfg["directions"]) * len(cfg["_lengths"])


def check_valid_run(run_dir: Path, picked: dict[str, Choice], output: str) -> None:
    """A complete run whose manifest records the overrides, every shard present and intact."""
    assert "Results:" in output, output
    manifest = load_manifest(run_dir)
    cfg = manifest["config"]
    assert manifest["complete"] is True
    for choice in picked.values():
        value = cfg
        for part in choice.key.split("."):
            value = value[part]
        typed = yaml.safe_load(choice.text) if choice.key != "lengths" else None
        if choice.key == "directions":
            assert [d["name"] for d in value] == typed
        elif choice.key != "lengths":
            assert value == typed, (choice, value)
    files = sorted(p.name for p in (run_dir / "shards").iterdir())
    assert files == sorted(Path(e["file"]).name for e in manifest["shards"].values())
    for entry in manifest["shards"].values():
        digest = hashlib.sha256((run_dir / entry["file"]).read_bytes()).hexdigest()
        assert digest == entry["sha256"]
    rows = sum(e["rows"] for e in manifest["shards"].values())
    assert rows == expected_rows({**cfg, "_lengths": manifest["meta"]["lengths"]})
    assert not [p for p in run_dir.rglob("*.tmp")]


def check_overrides(picked: list[Choice], base_file: Path, folder: Path) -> None:
    """Run ``perturb-lens run BASE OVERRIDES --out folder/r`` and check the three properties."""
    by_key = effective({c.key: c for c in picked})  # the last override of a key wins
    args = [c.arg for c in by_key.values()]
    invalid = [c for c in by_key.values() if c.needle is not None]
    out = folder / "r"
    if os.environ.get("PERTURB_LENS_PROPERTY_TRACE"):
        print("overrides:", args, flush=True)
    result = CliRunner().invoke(app, ["run", str(base_file), *args, "-q", "--out", str(out)])
    text = result.output
    assert "Traceback" not in text and "unexpected" not in text, (args, text)
    if invalid:
        assert result.exit_code == 1, (args, text)
        assert isinstance(result.exception, SystemExit), (args, result.exception)
        assert "Error: " in text, (args, text)
        assert any(c.needle in text for c in invalid), (args, [c.needle for c in invalid], text)
        assert not out.exists(), (args, sorted(p.name for p in out.rglob("*")))
    else:
        assert result.exit_code == 0, (args, text)
        check_valid_run(out, by_key, text)


_SETTINGS = {
    "derandomize": True,  # the same examples on every machine: CI failures reproduce
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}


@settings(max_examples=EXAMPLES, **_SETTINGS)
@given(picked=st.lists(choices, min_size=1, max_size=4))
def test_overrides_either_run_cleanly_or_fail_naming_the_key(
    picked: list[Choice], base_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    check_overrides(picked, base_file, tmp_path_factory.mktemp("run"))


@pytest.mark.slow
@settings(max_examples=300, **_SETTINGS)
@given(picked=st.lists(choices, min_size=1, max_size=6))
def test_overrides_property_long(
    picked: list[Choice], base_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The same property over 300 examples of up to 6 overrides (``-m slow``; minutes)."""
    check_overrides(picked, base_file, tmp_path_factory.mktemp("run"))
