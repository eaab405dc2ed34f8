"""The replication table across models: one verdict column per model from
``RUNS_ROOT/<model>/<run>`` (real run folders written by the store from constructed rows), "not
run" cells with each model's command, the footnoted sample size that would decide an
inconclusive claim (against a hand computation), and the single-model layout still read."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from synthetic_runs import REPO, make_run
from test_verdicts import SEQ_LEN, _config, _rows
from typer.testing import CliRunner

from perturb_lens.cli.app import app
from perturb_lens.replication import (
    NOT_RUN,
    RUNS,
    Row,
    Undecided,
    register_replication,
    replication_markdown,
    replication_results,
    write_replication,
)
from perturb_lens.replication.inference import deciding_size, needed_size
from perturb_lens.replication.registry import CLAIMS
from perturb_lens.replication.table import COLUMNS
from perturb_lens.statistics.bootstrap import ratio_intervals

MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-0.5b")
MIDDLE = {"smollm2-135m": 15, "gemma3-270m": 9, "qwen2.5-0.5b": 12}  # n_layers // 2: 30, 18, 24
LEE = "lee-difference-lee"
FEATURES = "sae_feature_extrapolation_smollm2"


def _lee_run(folder: Path, factor: float, model: str, n_seq: int = 40, **kw) -> Path:
    """A sensitive-directions run of ``model`` where real-difference's KL is ``factor`` times
    real-mixture's."""
    factors = {"real-difference": factor, "real-mixture": 1.0}
    cfg = _config([{"name": d} for d in factors]) | {"model": model}
    rows = _rows(factors, n_seq=n_seq, **kw)
    return make_run(folder / "sensitive_directions_lee", cfg, rows=rows, hook=_hook(model))


def _hook(model: str) -> str:
    return f"blocks.{MIDDLE[model]}.hook_resid_pre"


def _table(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """The markdown table's header cells and its rows by claim id (cells split on unescaped
    pipes)."""
    lines = [x for x in text.splitlines() if x.startswith("| ")]
    split = [[c.strip() for c in re.split(r"(?<!\\)\|", x)[1:-1]] for x in lines]
    rows = {re.match(r"\*\*([^*]+)\*\*", r[0]).group(1): r for r in split[1:]}
    return split[0], rows


def _footnotes(text: str) -> dict[str, str]:
    return dict(re.findall(r"^\[\^(\w+)\]: (.*)$", text, flags=re.M))


# -- the table across models -----------------------------------------------------------------


def test_two_models_get_their_columns(tmp_path: Path) -> None:
    """SmolLM2 replicates, Gemma reverses, Qwen has no run: each column says its own verdict
    and sample, and the model's hook is the one its run was made at."""
    _lee_run(tmp_path / "smollm2-135m", 2.0, "smollm2-135m")
    _lee_run(tmp_path / "gemma3-270m", 0.5, "gemma3-270m", n_seq=24, seed=1)
    path, results = write_replication(tmp_path, tmp_path / "R.md", command="perturb-lens R")
    header, rows = _table(path.read_text())
    assert header[:3] == ["claim", "paper", "paper's number"]
    assert header[3:] == [f"{m} ({2 * MIDDLE[m]} layers, middle {MIDDLE[m]})" for m in MODELS]
    smol, gemma, qwen = rows[LEE][3:]
    assert smol.startswith("**replicated**") and "smollm2-135m, blocks.15.hook_resid_pre" in smol
    assert "40 seqs x 6 tokens" in smol
    assert (
        gemma.startswith("**not replicated**") and "gemma3-270m, blocks.9.hook_resid_pre" in gemma
    )
    assert "24 seqs x 6 tokens" in gemma
    assert qwen.startswith(f"*{NOT_RUN}*")
    by = {(r.claim.claim_id, r.model): r.verdict for r in results}
    assert by[(LEE, "smollm2-135m")] == "replicated"
    assert by[(LEE, "gemma3-270m")] == "not replicated"
    assert {r.model for r in results} == set(MODELS) and len(results) == 3 * len(rows)
    # the ratio shown in Gemma's cell is the ratio of its rows' means (pandas, published rows)
    rows_g = _rows({"real-difference": 0.5, "real-mixture": 1.0}, n_seq=24, seed=1)
    rows_g = rows_g[(rows_g["pos"] < SEQ_LEN - 1) & (rows_g["length"] > 0)]
    means = rows_g.groupby(["length", "direction"])["kl"].mean().unstack()
    ratio = means["real-difference"] / means["real-mixture"]
    assert f"{ratio.min():.3g}-{ratio.max():.3g} over" in gemma


def test_not_run_cells_give_each_models_command(tmp_path: Path) -> None:
    """An empty model folder: every claim is 'not run' in every column, with the commands of
    that model's runs, which put the runs in its folder at its middle layer."""
    (tmp_path / "qwen2.5-0.5b").mkdir()
    path, results = write_replication(tmp_path, tmp_path / "R.md", command="c")
    _, rows = _table(path.read_text())
    assert {r.verdict for r in results} == {NOT_RUN}
    for r in results:
        folder = tmp_path / r.model
        expected = tuple(RUNS[n].command_for(folder, r.model) for n in r.claim.runs)
        assert r.commands == expected
        cell = rows[r.claim.claim_id][3 + MODELS.index(r.model)]
        assert cell == f"*{NOT_RUN}*: " + "<br>".join(f"`{c}`" for c in expected)
        for c in expected:
            assert f"--out {folder}/" in c
            if r.model == "smollm2-135m":  # the presets' own model: the preset as it is
                assert "model=" not in c and "hook=" not in c
            elif " sae run " not in c:
                assert f"model={r.model} hook=blocks.{MIDDLE[r.model]}.hook_resid_pre" in c


@pytest.mark.parametrize("model", ["gemma3-270m", "qwen2.5-0.5b"])
def test_per_model_commands_make_valid_configs(model: str, tmp_path: Path) -> None:
    """Each specialized command's config, loaded as its command would load it, names the model
    and its middle layer (runs and SAE training) or the model and its middle-layer SAE (suites)."""
    from perturb_lens.config.schema import load_config
    from perturb_lens.workflows.sae_suite import load_suite_config
    from perturb_lens.workflows.sae_training import load_train_config

    folder = tmp_path / model
    sae = f"{folder}/sae_train_smollm2_layer15_topk_e2e/topk-k64"
    for spec in RUNS.values():
        argv = shlex.split(spec.command_for(folder, model))
        assert argv[argv.index("--out") + 1] == str(folder / spec.name)
        sub = argv[1] if argv[1] == "run" else " ".join(argv[1:3])
        start = 2 if sub == "run" else 3
        preset = REPO / argv[start]
        overrides = [a for a in argv[start + 1 : argv.index("--out")] if "=" in a]
        if sub == "run":
            cfg = load_config(preset, overrides)
            assert (cfg.model, cfg.hook) == (model, _hook(model))
            assert cfg.sae in (None, sae)
        elif sub == "sae train":
            cfg = load_train_config(preset, overrides)
            assert (cfg.model, cfg.hook) == (model, _hook(model))
            assert argv[argv.index("--only") + 1] == "topk-k64"
        else:
            suite = load_suite_config(preset, overrides)
            assert suite.base["model"] == model
            assert [e.sae for e in suite.saes] == [sae]


def test_single_model_layout_is_read_as_smollm2s(tmp_path: Path) -> None:
    """Runs directly under the root (0.2's layout) are SmolLM2's: beside a model folder they
    fill its column, said to be read from the root; alone they give the single-model file."""
    _lee_run(tmp_path, 2.0, "smollm2-135m")
    single = write_replication(tmp_path, tmp_path / "S.md", command="c")[0].read_text()
    assert single == replication_markdown(replication_results(tmp_path), tmp_path, "c")
    header, rows = _table(single)
    assert header == list(COLUMNS) and rows[LEE][5] == "**replicated**"

    _lee_run(tmp_path / "gemma3-270m", 0.5, "gemma3-270m")
    text = write_replication(tmp_path, tmp_path / "M.md", command="c")[0].read_text()
    _, rows = _table(text)
    assert rows[LEE][3].startswith("**replicated**")
    assert rows[LEE][4].startswith("**not replicated**")
    assert f"smollm2-135m from `{tmp_path}` (the single-model layout)" in text
    assert f"{tmp_path}/sensitive_directions_lee/" in text  # its layout stays at the root


def test_single_model_file_keeps_the_committed_structure(tmp_path: Path) -> None:
    """REPLICATION_SMOLLM2.md (0.3) was written from the single-model layout, whose runs are not
    on this machine: written from a root of that layout, the file keeps its title, columns,
    claim cells, commands, rules and layout, line for line (only the runs' numbers differ)."""
    committed = (REPO / "REPLICATION_SMOLLM2.md").read_text()
    root = tmp_path / "runs" / "replication"
    _lee_run(root, 2.0, "smollm2-135m")
    text = write_replication(root, tmp_path / "R.md", command="x")[0].read_text()
    text = text.replace(str(root), "runs/replication")
    old, new = committed.splitlines(), text.splitlines()
    assert len(old) == len(new)
    assert old[1] == new[1] == "# Replication of the published claims (perturb-lens, SmolLM2)"
    (h_old, r_old), (h_new, r_new) = _table(committed), _table(text)
    assert h_old == h_new and list(r_old) == list(r_new)
    for cid in r_old:  # claim, paper, paper's number and command; not ours/sample/verdict/CI
        assert [r_old[cid][i] for i in (0, 1, 2, 7)] == [r_new[cid][i] for i in (0, 1, 2, 7)]
    tail = old.index("## Verdict rules and sources")
    assert old[tail:] == new[tail:]


# -- the sample size that would decide ---------------------------------------------------------


def test_needed_size_by_hand() -> None:
    """Numbers exact in binary: h = (1.5 - 0.875) / 2 = 0.3125, |1.125 - 1| = 0.125, so
    n' = 16 x 2.5^2 = 100."""
    p = Undecided("x", 1.125, 0.875, 1.5, 1.0, 16)
    assert needed_size(p) == 100
    assert needed_size(Undecided("x", 1.125, 0.875, 1.5, 1.0, 16, min_n=200)) == 200
    assert needed_size(Undecided("x", 1.0, 0.875, 1.5, 1.0, 16)) is None  # on the bound
    assert needed_size(Undecided("x", 1.2, 1.1, 1.5, 1.0, 16)) is None  # decided already
    assert needed_size(Undecided("x", 1.2, 1.1, 1.5, 1.0, 4, min_n=10)) == 10  # too few units
    assert needed_size(Undecided("x", np.nan, np.nan, np.nan, 1.0, 4)) is None


def test_deciding_size_combines_the_parts() -> None:
    """A group is decided by its easiest part; all groups must be (the hardest counts), unless
    one leans against the claim (then the easiest of those decides it alone)."""
    easy = Undecided("a", 1.125, 0.875, 1.5, 1.0, 16, group="g1")  # 100
    hard = Undecided("b", 1.0625, 0.875, 1.5, 1.0, 16, group="g1")  # 16 x 5^2 = 400
    other = Undecided("c", 1.25, 0.75, 1.75, 1.0, 20, group="g2")  # 20 x 2^2 = 80
    assert deciding_size([easy, hard]) == (100, easy)
    assert deciding_size([easy, hard, other]) == (100, easy)  # max(100, 80)
    against = Undecided("d", 0.875, 0.625, 1.0625, 1.0, 10, group="g3", against=True)
    assert deciding_size([easy, other, against]) == (math.ceil(10 * (0.21875 / 0.125) ** 2),
                                                     against)  # fmt: skip
    stuck = Undecided("e", np.nan, np.nan, np.nan, 1.0, 0, group="g4")
    assert deciding_size([easy, stuck]) is None  # g4 is decided by no size
    assert deciding_size([]) is None


def test_footnote_of_a_registered_claim(tmp_path: Path) -> None:
    """The footnote gives the size of the claim's intervals, on the model it was found on."""
    part = Undecided("length 0.2", 1.125, 0.875, 1.5, 1.0, 16)
    register_replication(
        "test-size",
        paper="P",
        claim="c",
        paper_number="n",
        source="s",
        runs=("plateaus",),
        evaluate=lambda runs: Row("1.12", "16 seqs", "inconclusive", "CI", (part,)),
        rule="r",
    )
    try:
        make_run(tmp_path / "gemma3-270m" / "plateaus", hook=_hook("gemma3-270m"))
        text = write_replication(tmp_path, tmp_path / "R.md", command="c")[0].read_text()
    finally:
        CLAIMS.unregister("test-size")
    _, rows = _table(text)
    cell = rows["test-size"][4]
    label = re.match(r"\*\*inconclusive\*\*\[\^(n\d+)\]", cell).group(1)
    note = _footnotes(text)[label]
    assert note.startswith("**test-size** on gemma3-270m: inconclusive on n = 16 seqs")
    assert "n' = 16 x (0.312 / 0.125)^2 = 100: about **100 seqs** would decide it." in note
    assert "n' = n (h / |estimate - bound|)^2" in text
    assert "[^" not in rows["test-size"][3]  # SmolLM2: not run, no footnote


def test_footnote_of_an_ordering_against_pandas(tmp_path: Path) -> None:
    """A near tie on 12 sequences decides no length: the footnote's n' is the smallest over the
    lengths of n (h / |ratio - 1|)^2, with the ratio of the published means and its interval
    computed here from the rows (pandas per-sequence sums, the package's bootstrap)."""
    factors = {"real-difference": 1.02, "real-mixture": 1.0}
    kw = {"n_seq": 12, "noise": 0.6, "seed": 0}
    _lee_run(tmp_path / "qwen2.5-0.5b", 1.02, "qwen2.5-0.5b", **kw)
    text = write_replication(tmp_path, tmp_path / "R.md", command="c")[0].read_text()
    _, rows = _table(text)
    cell = rows[LEE][5]
    assert cell.startswith("**inconclusive**[^n")
    rows_q = _rows(factors, **kw)
    rows_q = rows_q[(rows_q["pos"] < SEQ_LEN - 1) & (rows_q["length"] > 0)]
    sums = rows_q.groupby(["direction", "length", "seq"])["kl"].agg(["sum", "count"])
    sides = [
        (sums.loc[d, "sum"].unstack("length").to_numpy(np.float64),
         sums.loc[d, "count"].unstack("length").to_numpy(np.float64))
        for d in factors
    ]  # fmt: skip
    res = ratio_intervals(sides[0], sides[1])
    assert ((res["ci_low"] <= 1.0) & (res["ci_high"] >= 1.0)).all()  # no length decided
    half = (res["ci_high"] - res["ci_low"]) / 2.0
    n_new = np.ceil(12 * (half / (res["ratio"] - 1.0).abs()) ** 2).clip(lower=10)
    expected = int(n_new.min())
    label = re.match(r"\*\*inconclusive\*\*\[\^(n\d+)\]", cell).group(1)
    note = _footnotes(text)[label]
    assert note.startswith(f"**{LEE}** on qwen2.5-0.5b: inconclusive on n = 12 seqs")
    assert f"about **{expected} seqs** would decide it" in note
    j = int(n_new.to_numpy().argmin())
    assert f"estimate {res['ratio'][j]:.3g} has CI [{res['ci_low'][j]:.3g}, " in note


def test_no_footnote_where_no_size_decides(tmp_path: Path) -> None:
    """Replicated and not-replicated verdicts, and inconclusive ones no sample decides, get no
    size footnote."""
    _lee_run(tmp_path / "smollm2-135m", 2.0, "smollm2-135m")
    _lee_run(tmp_path / "gemma3-270m", 0.5, "gemma3-270m")
    text = write_replication(tmp_path, tmp_path / "R.md", command="c")[0].read_text()
    assert "## Sample sizes that would decide" not in text
    assert not [k for k in _footnotes(text) if k.startswith("n")]


# -- the command ------------------------------------------------------------------------------


def test_cli_model_columns(tmp_path: Path) -> None:
    _lee_run(tmp_path, 2.0, "smollm2-135m")  # the single-model layout, asked for two columns
    out = tmp_path / "R.md"
    args = ["replication", str(tmp_path), "--out", str(out), "-m", "smollm2-135m"]
    result = CliRunner().invoke(app, [*args, "-m", "gemma3-270m"])
    assert result.exit_code == 0, result.output
    header, rows = _table(out.read_text())
    assert len(header) == 5 and rows[LEE][3].startswith("**replicated**")
    assert rows[LEE][4].startswith(f"*{NOT_RUN}*")
    bad = CliRunner().invoke(app, ["replication", str(tmp_path), "-m", "gpt-9"])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert "has no replication column" in bad.output and "gemma3-270m" in bad.output


def test_markdown_cells_stay_one_line(tmp_path: Path) -> None:
    _lee_run(tmp_path / "gemma3-270m", 2.0, "gemma3-270m")
    text = write_replication(tmp_path, tmp_path / "R.md", command="c")[0].read_text()
    header, rows = _table(text)
    assert all(len(r) == len(header) for r in rows.values())
    assert len(rows) == len(CLAIMS.values())


def _size_notes(root: Path) -> dict[str, str]:
    """Claim id -> its size footnote, in the file written from ``root``."""
    text = write_replication(root, root / "R.md", command="c")[0].read_text()
    return {re.match(r"\*\*([^*]+)\*\*", v).group(1): v
            for k, v in _footnotes(text).items() if k.startswith("n")}  # fmt: skip


def test_too_few_sequences_need_the_rules_minimum(tmp_path: Path) -> None:
    """An SAE suite on 4 sequences: every SAE's interval excludes 1 (ratios near 3 and 2.5), but
    the rule judges nothing under 10 sequences; so 10 would decide it."""
    from test_replication import _suite

    _suite(tmp_path / "gemma3-270m", {"a": 3.0, "b": 2.5}, n_seq=4)
    notes = _size_notes(tmp_path)
    note = notes["gurnee-sae-error"]
    assert note.startswith("**gurnee-sae-error** on gemma3-270m: inconclusive on n = 4 seqs")
    assert "excludes the bound 1, but the rule judges nothing under 10 seqs" in note
    assert note.endswith("about **10 seqs** would decide it.")


def test_alike_decoders_get_no_size(tmp_path: Path) -> None:
    """Fig. 8 on an e2e SAE fine-tuned from its local one: the features are the same, so no
    sample decides the comparison (no footnote), while the same run with distinct decoders is
    judged."""
    from safetensors.numpy import save_file
    from test_replication import _suite

    rng = np.random.default_rng(0)
    local = rng.standard_normal((64, 16)).astype(np.float32)
    root = tmp_path / "qwen2.5-0.5b"
    saes = {}
    for label, w in (("topk-k8", local), ("e2e-k8", local + 0.01)):
        saes[label] = tmp_path / "saes" / label
        saes[label].mkdir(parents=True)
        save_file({"W_dec": w.astype(np.float32)}, str(saes[label] / "sae_weights.safetensors"))
    directions = [{"name": "sae-feature", "which": "inactive"}, {"name": "isotropic"}]
    suite = _suite(root, {"topk-k8": 2.0, "e2e-k8": 1.9}, folder=FEATURES, directions=directions,
                   lengths=[0.0, 20.0, 40.0, 61.0], saes=saes)  # fmt: skip
    records = [{"label": "topk-k8", "l0": 8.0, "type": "topk"},
               {"label": "e2e-k8", "l0": 8.0, "type": "e2e"}]  # fmt: skip
    (suite / "saes.json").write_text(json.dumps(records))
    text = write_replication(tmp_path, tmp_path / "R.md", command="c")[0].read_text()
    cell = _table(text)[1]["lee-feature-local"][5]
    assert cell.startswith("**inconclusive**:") and "decoder rows alike" in cell
    assert "lee-feature-local" not in _size_notes(tmp_path)


def test_paired_difference_size(tmp_path: Path) -> None:
    """Giglemiani's max-slope claim with overlapping steps on 12 prompts: the footnote's size is
    n (h / |mean difference|)^2 from the interval shown in the cell."""
    from test_replication import _synthetic_run

    _synthetic_run(tmp_path / "gemma3-270m", 10, 10, 10, n=12)
    text = write_replication(tmp_path, tmp_path / "R.md", command="c")[0].read_text()
    _, rows = _table(text)
    cell = rows["giglemiani-max-slope"][4]
    m = re.search(r"paired difference cov-random - real (\S+) steps, 95% CI \[(\S+), (\S+)\]", cell)
    diff, lo, hi = (float(x) for x in m.groups())
    assert lo <= 0.0 <= hi and cell.startswith("**inconclusive**[^n")  # equal steps: a tie
    note = _size_notes(tmp_path)["giglemiani-max-slope"]
    # the cell rounds to 3 digits: the size from those numbers agrees to that precision
    want = 12 * ((hi - lo) / 2 / abs(diff)) ** 2
    got = float(re.search(r"\)\^2 = (\S+?)[,:]", note).group(1))
    assert got == pytest.approx(want, rel=0.02)
    assert "inconclusive on n = 12 prompts" in note


# -- the README's summary of the committed table ------------------------------------------------


def _verdict(cell: str) -> str:
    """The verdict word(s) a model's cell of REPLICATION.md starts with."""
    found = re.match(r"\*{1,2}([a-z ]+)\*{1,2}", cell)
    assert found, cell[:80]
    return found.group(1)


def test_readme_summary_is_the_committed_table() -> None:
    """The README's "what replicates on which model" table says, claim by claim and model by
    model, exactly the verdict of the committed REPLICATION.md (so it cannot drift from it)."""
    header, rows = _table((REPO / "REPLICATION.md").read_text())
    models = [h.split(" (")[0] for h in header[3:]]
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- replication summary -->")[1]
    lines = [x for x in block.splitlines() if x.startswith("| ")]
    cells = [[c.strip() for c in x.split("|")[1:-1]] for x in lines]
    assert cells[0] == ["claim", *models]
    summary = {re.sub(r"[`*]", "", r[0]): r[1:] for r in cells[1:]}
    assert list(summary) == list(rows)
    for cid, row in rows.items():
        assert summary[cid] == [_verdict(c) for c in row[3:]], cid


# -- the SAE of each model ---------------------------------------------------------------------


def _sae(folder: Path, ev: float, dead: float, hook: str) -> None:
    sae = folder / "sae_train_smollm2_layer15_topk_e2e" / "topk-k64"
    sae.mkdir(parents=True)
    meta = {"kind": "topk", "k": 64, "tokens": 1234567, "epochs": 12.0, "hook_name": hook}
    (sae / "cfg.json").write_text(json.dumps({"d_sae": 4608, "metadata": meta}))
    held = {
        "tokens": {"n": 16000, "l0": 64.0, "explained_variance": ev},
        "dead_fraction": dead,
        "ce": {"n": 7936, "ce_increase": 0.25},
    }
    (sae / "eval.json").write_text(json.dumps(held))


def test_sae_section_reads_each_models_sae_against_the_targets(tmp_path: Path) -> None:
    """Each model's bullet gives its SAE's held-out EV, L0, dead fraction and CE increase from
    its eval.json, and says which target it missed: EV below 0.85 (SmolLM2 here), 1% dead or
    more (Gemma here), nothing (Qwen has no SAE: its SAE claims are not run)."""
    _lee_run(tmp_path / "smollm2-135m", 2.0, "smollm2-135m")
    _sae(tmp_path / "smollm2-135m", 0.8491, 0.0, _hook("smollm2-135m"))
    _sae(tmp_path / "gemma3-270m", 0.93, 0.01, _hook("gemma3-270m"))
    path, _ = write_replication(tmp_path, tmp_path / "R.md", command="perturb-lens R")
    section = path.read_text().split("## The SAE of each model")[1].split("\n## ")[0]
    bullets = {b.split("**")[1]: b for b in section.splitlines() if b.startswith("- **")}
    assert list(bullets) == list(MODELS)
    smol, gemma, qwen = bullets.values()
    assert "blocks.15.hook_resid_pre" in smol and "1,234,567 token-steps, 12 passes" in smol
    assert "EV 0.849 (16,000 tokens), L0 64, dead 0.00%, CE increase 0.250 nat" in smol
    assert smol.endswith("misses the targets: EV 0.849 < 0.85.")
    assert gemma.endswith("misses the targets: dead 1.0% >= 1%.")
    assert "no SAE at" in qwen and "not run" in qwen
    _, rows = _table(path.read_text())  # the claim table is still read as before
    assert LEE in rows


def test_sae_meeting_every_target(tmp_path: Path) -> None:
    from perturb_lens.replication.sae_quality import sae_line

    _sae(tmp_path, 0.85, 0.0099, _hook("qwen2.5-0.5b"))
    line = sae_line("qwen2.5-0.5b", tmp_path)
    assert line.endswith("dead 0.99%, CE increase 0.250 nat (7,936 tokens): meets the targets.")
