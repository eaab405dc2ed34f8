"""Presets shipped in the package: layer depths, `preset:` files, the old configs, the CLI."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from perturb_lens.cli.app import app
from perturb_lens.common.hook_depths import layer_of_depth, resolve_hook
from perturb_lens.common.writes import config_hash
from perturb_lens.config.preset import PRESET_DIR, list_presets, merge, preset_names
from perturb_lens.config.schema import (
    ConfigError,
    load_config,
    read_config_file,
    resolve_depths,
    validate_config,
)
from perturb_lens.results.store import load_manifest

REPO = Path(__file__).resolve().parents[1]
FROZEN = sorted((REPO / "tests" / "data" / "frozen_configs").glob("*.json"))
# Files of configs/ that only named their preset and the default model, removed: the preset
# itself is that run (its name aside).
REPLACED_BY_PRESET = {
    "sensitive_directions_gpt2": "sensitive-directions-gpt2",
    "sensitive_directions_smollm2_attn_out": "sensitive-directions-attn-out",
    "sensitive_directions_smollm2_mlp_out": "sensitive-directions-mlp-out",
    "same_cosine_smollm2_attn_out": "same-cosine-attn-out",
    "same_cosine_smollm2_mlp_out": "same-cosine-mlp-out",
}
# The layer counts of the models the old configs name (GPT-2 small: 12; SmolLM2-135M: 30).
N_LAYERS = {"gpt2": 12, "smollm2-135m": 30}


@pytest.mark.parametrize(
    ("part", "n_layers", "layer"),
    [
        ("7", 30, 7),
        ("first", 30, 0),
        ("last", 30, 29),
        ("middle", 30, 15),  # SmolLM2's published middle layer
        ("middle", 12, 6),  # GPT-2 small's layer 6, the published one
        ("middle", 18, 9),  # Gemma-3-270M
        ("middle", 25, 12),
        ("50%", 30, 15),
        ("25%", 30, 7),  # 7.5 rounded down
        ("0%", 12, 0),
        ("100%", 12, 11),  # the last layer, not one past it
        ("33.3%", 12, 3),  # 3.996
        ("75%", 4, 3),
        ("99%", 1, 0),
    ],
)
def test_layer_of_depth(part: str, n_layers: int, layer: int) -> None:
    assert layer_of_depth(part, n_layers) == layer


def test_resolve_hook_keeps_indices_and_other_names() -> None:
    assert resolve_hook("blocks.middle.hook_mlp_out", 24) == "blocks.12.hook_mlp_out"
    assert resolve_hook("blocks.12.5%.hook_resid_post", 24) == "blocks.3.hook_resid_post"
    assert resolve_hook("blocks.3.hook_resid_pre", 24) == "blocks.3.hook_resid_pre"
    assert resolve_hook("embed", 24) == "embed"


@pytest.mark.parametrize("layer", ["midle", "101%", "-1", "50", "x%", "1e2%", "5.x"])
def test_bad_depth_refused_with_the_syntax(layer: str) -> None:
    hook = f"blocks.{layer}.hook_resid_pre"
    if layer == "50":  # an index: the model refuses it if it has fewer layers
        assert load_config(None, [f"hook={hook}"]).hook == hook
        return
    with pytest.raises(ConfigError, match="first, middle, last or a percentage"):
        load_config(None, [f"hook={hook}"])


def test_read_depth_and_order_checked_after_resolution() -> None:
    cfg = load_config(None, ["hook=blocks.last.hook_resid_pre", "read=blocks.middle.hook_mlp_out"])
    with pytest.raises(ConfigError, match="comes before hook"):
        resolve_depths(cfg, 12)
    ok = resolve_depths(load_config(None, ["read=blocks.last.hook_resid_post"]), 12)
    assert ok.read == "blocks.11.hook_resid_post"


@pytest.mark.parametrize(
    "frozen", [p for p in FROZEN if p.stem not in REPLACED_BY_PRESET], ids=lambda p: p.stem
)
def test_old_config_files_give_the_same_config(frozen: Path) -> None:
    """Each file of configs/ as its command reads it equals what it gave before presets existed
    (frozen in tests/data by the reader then); a layer depth resolved for the named model."""
    from perturb_lens.workflows.sae_suite import load_suite_config
    from perturb_lens.workflows.sae_training import load_train_config

    old = json.loads(frozen.read_text())
    path = REPO / "configs" / f"{frozen.stem}.yaml"
    if old["reader"] == "sae train":
        got = load_train_config(path).model_dump(mode="json")
    elif old["reader"] == "sae run":
        got = load_suite_config(path).model_dump(mode="json")
    else:
        cfg = load_config(path)
        got = resolve_depths(cfg, N_LAYERS[cfg.model]).model_dump(mode="json")
        assert config_hash(got) == config_hash(old["config"])  # the same run folder
    assert got == old["config"]


def test_every_old_config_is_frozen() -> None:
    kept = {p.stem for p in (REPO / "configs").glob("*.yaml")}
    assert not kept & set(REPLACED_BY_PRESET)
    assert {p.stem for p in FROZEN} == kept | set(REPLACED_BY_PRESET)


@pytest.mark.parametrize(("old_file", "preset"), REPLACED_BY_PRESET.items())
def test_removed_config_files_are_their_presets(old_file: str, preset: str) -> None:
    """A removed file's run is its preset's on the default model: the same config but its name."""
    old = json.loads((REPO / "tests" / "data" / "frozen_configs" / f"{old_file}.json").read_text())
    cfg = load_config(preset)
    got = resolve_depths(cfg, N_LAYERS[cfg.model]).model_dump(mode="json")
    assert got["name"] == preset and old["config"]["name"] == old_file
    assert got | {"name": old_file} == old["config"]


def test_run_configs_in_configs_start_from_presets() -> None:
    """The run files of configs/ are short: a preset plus the keys where the setup differs."""
    for path in (REPO / "configs").glob("*.yaml"):
        raw = read_config_file(path)
        if "saes" in raw:  # SAE suites and training configs name model-specific SAE folders
            continue
        assert raw["preset"] in preset_names(), path.name
        assert len(raw) <= 9, f"{path.name} repeats its preset: {sorted(raw)}"


@pytest.mark.parametrize("name", preset_names())
def test_each_preset_validates_and_is_model_agnostic(name: str) -> None:
    path = PRESET_DIR / f"{name}.yaml"
    raw = read_config_file(path)
    assert "preset" not in raw and raw["name"] == name
    assert isinstance(raw["description"], str) and 20 < len(raw["description"]) < 200
    cfg = load_config(name)
    assert cfg.name == name and cfg.experiment == raw["experiment"]
    if name.endswith("-gpt2"):  # the published GPT-2 setup: its own layer and absolute lengths
        assert cfg.model == "gpt2"
        return
    assert "model" not in raw  # from model= (default: the embedded SmolLM2)
    assert cfg.data.source == "builtin:lee"  # offline, from an installed wheel
    assert resolve_hook(cfg.hook, 4) != cfg.hook or cfg.hook.split(".")[1] in ("0", "1")
    assert cfg.read is None  # the last layer's resid_post of whichever model
    assert cfg.relative_lengths or cfg.lengths == "t101" or cfg.experiment == "same-cosine"


def test_list_presets_reads_each_file() -> None:
    infos = {p.name: p for p in list_presets()}
    assert set(infos) == set(preset_names()) and "sensitive-directions" in infos
    for info in infos.values():
        raw = yaml.safe_load(info.path.read_text())
        assert info.experiment == raw["experiment"] and info.description == raw["description"]


def test_preset_key_merges_mappings_and_replaces_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(
        "preset: sensitive-directions\nname: mine\ndescription: my variant\n"
        "data: {n_seqs: 3}\ndirections: [isotropic]\n"
    )
    got = load_config(path, ["stats.jitter=0.5"]).model_dump(mode="json")
    base = yaml.safe_load((PRESET_DIR / "sensitive-directions.yaml").read_text())
    del base["description"]
    base.update(name="mine", directions=["isotropic"])
    base["data"] = {**base["data"], "n_seqs": 3}  # the other data keys kept
    base["stats"] = {**base["stats"], "jitter": 0.5}
    assert got == validate_config(base).model_dump(mode="json")
    assert merge({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"c": 3}, "d": None}) == {
        "a": {"b": 1, "c": 3},
        "d": None,
    }


@pytest.mark.parametrize("value", ["../configs/x", "no-such-preset", 3])
def test_bad_preset_key_refused(tmp_path: Path, value: object) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"preset": value}))
    with pytest.raises(ConfigError, match="preset"):
        load_config(path)


def test_run_unknown_preset_names_the_close_ones() -> None:
    result = CliRunner().invoke(app, ["run", "sensitive_directions"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "neither a config file nor a preset" in result.output
    assert "Did you mean sensitive-directions" in result.output


def test_presets_command_lists_and_prints() -> None:
    listed = CliRunner().invoke(app, ["presets"])
    assert listed.exit_code == 0, listed.output
    for info in list_presets():
        assert info.name in listed.output
    shown = CliRunner().invoke(app, ["presets", "stable-regions"])
    assert shown.output == (PRESET_DIR / "stable-regions.yaml").read_text()
    missing = CliRunner().invoke(app, ["presets", "stable"])
    assert missing.exit_code == 1 and "stable-regions" in missing.output


def test_version_from_the_package_metadata() -> None:
    import perturb_lens

    version = importlib.metadata.version("perturb-lens")
    assert perturb_lens.__version__ == version
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"perturb-lens {version}"


def test_preset_runs_at_the_models_middle_layer(tmp_path: Path, gpt2_dir: Path) -> None:
    """`perturb-lens run sensitive-directions model=FOLDER`: the layer is the model's middle one
    (the random GPT-2 here has 4 layers: layer 2), recorded in the manifest, and the run is the
    one its explicit config names (same id), so the two spellings share results."""
    pytest.importorskip("gensim")  # builtin:lee
    small = ["data.n_seqs=2", "data.seq_len=12", "shard_seqs=2", "stats.n_seqs=120"]
    small += ["lengths=[0,0.2,0.5]", "directions=[isotropic,cov-random-mixture]"]
    out = tmp_path / "run"
    args = ["run", "sensitive-directions", f"model={gpt2_dir}", *small, "--out", str(out), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "blocks.2.hook_resid_pre)" in result.output and "middle" not in result.output
    manifest = load_manifest(out)
    assert manifest["config"]["hook"] == manifest["meta"]["hook"] == "blocks.2.hook_resid_pre"
    explicit = ["hook=blocks.2.hook_resid_pre", f"model={gpt2_dir}", *small]
    same = load_config("sensitive-directions", explicit).model_dump(mode="json")
    assert manifest["config"] == same and manifest["config_hash"] == config_hash(same)
