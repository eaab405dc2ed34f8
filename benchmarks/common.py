"""Shared pieces of the benchmarks: models, the naive reference, timers, FLOP counts, the table.

The naive reference is written here plainly, the way the published code measures: a Hugging Face
model, a forward pre-hook on block ``layer`` that adds ``alpha * d`` to its input
(``hook_resid_pre``), a forward hook on the last block for the downstream read, and one full
forward (embedding to logits) per perturbation length or per perturbed copy. KL is computed from
float32 log-softmaxes, as a researcher would write it.

FLOP counting (:func:`block_flops`, :func:`unembed_flops`): a multiply-add counts 2. Per token
and block: the q/k/v and output projections (``2 d (H + 2 H_kv) d_h + 2 H d_h d``), the MLP
(GPT-2: two ``d x d_mlp`` matrices; gated MLPs, Llama, Qwen 2, Gemma 3: three) and attention
over ``n_keys`` keys (``4 H d_h n_keys``: scores and the weighted sum; the benchmark sequences
are shorter than Gemma's 512-token sliding window, so every layer attends causally). The
unembedding is ``2 d V`` per row (Gemma 3: V = 262,144, about 60 % of a measured row's FLOPs).
Norms,
activations, softmax and metrics are not counted (they are not matrix products). Each benchmark
counts only what its measurement *needs* (for example one token through the remaining blocks per
single-position row, attending to its clean prefix), whatever the engine actually executes, so
GFLOP/s is a fair fraction of the matmul peak.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from perturb_lens.models.base import LensModel, ModelSpec

PUBLISHED_LENGTHS = [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 20, 24, 28, 32, 36, 40, 44, 48, 51, 61]
PUBLISHED_LENGTHS += [71, 81, 91]


# ---- machine and timing --------------------------------------------------------------------------
def base_parser(doc: str | None) -> argparse.ArgumentParser:
    """Arguments every benchmark takes: threads, repeats, seed."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (both)")
    p.add_argument("--repeat", type=int, default=3, help="timed repeats per side (best is kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time (report this); cpu: process CPU time, steadier on a busy\n"
        "machine with --threads 1 (for development comparisons)",
    )
    p.add_argument("--profile", action="store_true", help="print the engine's top operators")
    return p


# --model: the named real models (load_model's names) and their default hook layers (the middle)
NAMED = {"smollm2": "smollm2-135m", "gemma3": "gemma3-270m", "qwen2": "qwen2.5-0.5b"}
DEFAULT_LAYER = {"gpt2": 6, "smollm2": 15, "gemma3": 9, "qwen2": 12}


def model_args(p: argparse.ArgumentParser, layer: int | None = None) -> None:
    """--model (gpt2 shapes with random weights, or a named real model) and --layer."""
    p.add_argument(
        "--model",
        choices=list(DEFAULT_LAYER),
        default="gpt2",
        help="gpt2: GPT-2 small shapes, random weights; smollm2, gemma3, qwen2: the named models\n"
        + ", ".join(NAMED.values())
        + " (vocabularies 49,152, 262,144, 151,936)",
    )
    defaults = ", ".join(f"{k}: {v}" for k, v in DEFAULT_LAYER.items())
    help_ = "hook layer" + (f" (default {layer})" if layer else f" ({defaults})")
    p.add_argument("--layer", type=int, default=layer, help=help_)


def sweep_args(p: argparse.ArgumentParser, n_seqs: int, seq_len: int, n_lengths: int) -> None:
    """--n-seqs, --seq-len and --n-lengths (the first N of the published lengths)."""
    p.add_argument("--n-seqs", type=int, default=n_seqs)
    p.add_argument("--seq-len", type=int, default=seq_len)
    p.add_argument(
        "--n-lengths", type=int, default=n_lengths, help="first N of the published lengths"
    )


def load(args: argparse.Namespace) -> tuple[Any, LensModel, int]:
    """The HF model, the lens and the hook layer chosen by :func:`model_args`."""
    hf, model = gpt2_small(args.seed) if args.model == "gpt2" else named(NAMED[args.model])
    layer = args.layer if args.layer is not None else DEFAULT_LAYER[args.model]
    return hf, model, layer


def time_both(
    ours: Callable[[], Any], naive: Callable[[], Any], args: argparse.Namespace
) -> tuple[float, float, float]:
    """(engine seconds, naive seconds, matmul peak GFLOP/s): the peak measured before and after,
    the engine best of --repeat, the naive best of one fewer (it is slow); --profile prints the
    engine's operators."""
    peak = matmul_peak()
    t_ours = best_time(ours, args.repeat, warmup=0)
    t_naive = best_time(naive, max(1, args.repeat - 1), warmup=0)
    peak = max(peak, matmul_peak())
    if args.profile:
        print_profile(ours)
    return t_ours, t_naive, peak


def print_profile(fn: Callable[[], Any], rows: int = 12) -> None:
    """Run ``fn`` once under torch.profiler; print the operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


_CLOCK: list[Callable[[], float]] = [time.perf_counter]
_CLOCK_NAME = ["wall"]


def configure(args: argparse.Namespace) -> None:
    """Apply --threads and --clock."""
    torch.set_num_threads(args.threads)
    _CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    _CLOCK_NAME[0] = args.clock


def machine() -> str:
    """CPU model and core count (GPU name when CUDA is present), torch version, date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"{cpu} ({os.cpu_count()} cores){gpu}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {_CLOCK_NAME[0]} clock; {now}; load average {load}"
    )


def sync() -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_time(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> float:
    """Best (smallest) wall time of ``fn`` in seconds over ``repeat`` runs after ``warmup``.

    The minimum is the estimator least affected by other processes on a shared machine.
    """
    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = _CLOCK[0]()
        fn()
        sync()
        best = min(best, _CLOCK[0]() - t0)
    return best


def matmul_peak(repeat: int = 5, n: int = 2048, device: str = "cpu") -> float:
    """Measured float32 matrix-product peak, GFLOP/s: best of ``repeat`` n x n x n products."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    dt = best_time(lambda: torch.mm(a, b, out=out), repeat)
    return 2 * n**3 / dt / 1e9


def matmul_rate(m: int, k: int, n: int, repeat: int = 5) -> float:
    """GFLOP/s of a plain float32 ``[m, k] @ [k, n]`` product (best of ``repeat``)."""
    a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
    dt = best_time(lambda: torch.mm(a, b, out=out), repeat)
    return 2 * m * k * n / dt / 1e9


def unembed_rows(spec: ModelSpec, unembed: float, needed: float) -> list[tuple[str, str]]:
    """Report rows on the unembedding: its share of the needed FLOPs and the rate of a plain
    matmul of the engine's unembedding block shape (``vocab_block x d_model x 512``: a block of
    the vocabulary times ``rows_per_logits`` rows), measured here."""
    from perturb_lens.engine.softmax import vocab_block

    blk = vocab_block(torch.device("cpu"))
    rate = matmul_rate(blk, spec.d_model, 512)
    return [
        (
            "unembedding share of needed FLOPs",
            f"{100 * unembed / needed:.1f} % (V={spec.vocab_size})",
        ),
        (f"plain matmul {blk} x {spec.d_model} x 512 (unembedding block)", f"{rate:.1f} GFLOP/s"),
    ]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- FLOPs ---------------------------------------------------------------------------------------
def block_flops(spec: ModelSpec, n_keys: float) -> float:
    """Matrix-product FLOPs of one token through one block attending to ``n_keys`` keys."""
    d, h, hk, dh = spec.d_model, spec.n_heads, spec.n_kv_heads, spec.d_head
    proj = 2 * d * (h + 2 * hk) * dh + 2 * h * dh * d
    mlp = (3 if spec.gated_mlp else 2) * 2 * d * spec.d_mlp
    return proj + mlp + 4 * h * dh * n_keys


def unembed_flops(spec: ModelSpec) -> float:
    """FLOPs of one row's logits."""
    return 2 * spec.d_model * spec.vocab_size


def causal_keys(t: int) -> float:
    """Mean number of keys a token attends to in a causal sequence of length t."""
    return (t + 1) / 2


# ---- models --------------------------------------------------------------------------------------
def gpt2_small(seed: int = 0, n_layer: int = 12) -> tuple[Any, LensModel]:
    """GPT-2 small shapes with random weights: the HF model (eager attention off: sdpa) and the
    native lens on the same weights (raw frame, so both sides perturb the same vectors)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from perturb_lens.models.gpt2 import GPT2Lens

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer)).eval()
    with torch.no_grad():  # larger than the init so that blocks matter and KL is not tiny
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return hf, GPT2Lens.from_hf(hf, None, frame="raw")


def named(name: str) -> tuple[Any, LensModel]:
    """A named real model (``smollm2-135m``, ``gemma3-270m``, ``qwen2.5-0.5b``): transformers'
    model (the generic path's, eager attention) and the native lens on the same weights."""
    from perturb_lens import load_model

    lens = load_model(name, device="cpu")
    hf = load_model(name, native=False, device="cpu").model  # type: ignore[attr-defined]
    return hf.eval(), lens


def random_tokens(n: int, t: int, vocab: int, seed: int) -> Tensor:
    """[n, t] random token ids."""
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def unit_directions(shape: Sequence[int], seed: int) -> Tensor:
    """Random unit vectors along the last axis."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


# ---- the naive reference -------------------------------------------------------------------------
def _blocks(hf: Any) -> torch.nn.ModuleList:
    return hf.transformer.h if hasattr(hf, "transformer") else hf.model.layers


@contextmanager
def hooked(hf: Any, layer: int, edit: Callable[[Tensor], Tensor], captured: dict[str, Tensor]):
    """Within the block: block ``layer``'s input goes through ``edit``; the last block's output is
    stored in ``captured["read"]``."""

    def pre(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (edit(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

    def post(module: Any, args: tuple, output: Any) -> None:
        captured["read"] = output[0] if isinstance(output, tuple) else output

    blocks = _blocks(hf)
    handles = [
        blocks[layer].register_forward_pre_hook(pre, with_kwargs=True),
        blocks[-1].register_forward_hook(post),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def naive_forward(
    hf: Any, tokens: Tensor, layer: int, edit: Callable[[Tensor], Tensor], logits: bool = True
) -> tuple[Tensor | None, Tensor]:
    """One full forward with block ``layer``'s input edited: float32 log-probs (None when
    ``logits`` is False: then only the base model runs, no unembedding) and the last block's
    output."""
    captured: dict[str, Tensor] = {}
    with hooked(hf, layer, edit, captured):
        if logits:
            logp = torch.log_softmax(hf(tokens).logits.float(), dim=-1)
        else:
            hf.base_model(tokens)
            logp = None
    return logp, captured["read"]


def naive_kl(logp_clean: Tensor, logp_pert: Tensor) -> Tensor:
    """KL(p_clean || p_pert) in nats from float32 log-probs."""
    return F.kl_div(logp_pert, logp_clean, log_target=True, reduction="none").sum(-1)


# ---- agreement and the table ---------------------------------------------------------------------
@dataclass
class Agreement:
    """Largest differences engine vs naive: |dKL| (nats) and |dL2| / max(scale, 1), where
    scale is the reference L2 or, when given, the norm of the clean read (float32 noise grows
    with the size of the activations compared)."""

    kl: float = 0.0
    l2: float = 0.0

    def update(
        self,
        kl: Tensor | None,
        kl_ref: Tensor | None,
        l2: Tensor,
        l2_ref: Tensor,
        l2_scale: Tensor | None = None,
    ) -> None:
        if kl is not None and kl_ref is not None:
            self.kl = max(self.kl, float((kl.double() - kl_ref.double()).abs().max()))
        scale = (l2_ref if l2_scale is None else l2_scale).double().clamp_min(1.0)
        rel = (l2.double() - l2_ref.double()).abs() / scale
        self.l2 = max(self.l2, float(rel.max()))

    def ok(self, kl_tol: float, l2_tol: float) -> bool:
        return self.kl <= kl_tol and self.l2 <= l2_tol


def report(
    title: str,
    rows: Sequence[tuple[str, str]],
    agreement: Agreement | None = None,
    tolerances: tuple[float, float] = (1e-3, 1e-4),
) -> int:
    """Print a two-column table and the agreement line; return the exit code (1: disagreement)."""
    print(f"\n## {title}\n")
    print(f"machine: {machine()}\n")
    width = max(len(k) for k, _ in rows)
    print(f"| {'quantity':<{width}} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for k, v in rows:
        print(f"| {k:<{width}} | {v} |")
    code = 0
    if agreement is not None:
        ok = agreement.ok(*tolerances)
        print(
            f"\nagreement with the naive reference: max |dKL| = {agreement.kl:.2e} nats "
            f"(tol {tolerances[0]:.0e}), max |dL2|/max(scale,1) = {agreement.l2:.2e} "
            f"(tol {tolerances[1]:.0e}): {'OK' if ok else 'DISAGREE'}"
        )
        code = 0 if ok else 1
    sys.stdout.flush()
    return code


def fmt_rate(flops: float, seconds: float, peak: float) -> tuple[str, str]:
    """('123.4 GFLOP/s', '85.1 %') for ``flops`` done in ``seconds`` against ``peak`` GFLOP/s."""
    g = flops / seconds / 1e9
    return f"{g:.1f} GFLOP/s", f"{100 * g / peak:.1f} %"


def engine_rows(
    needed: float, seconds: float, peak: float, n_rows: int, digits: int = 2
) -> list[tuple[str, str]]:
    """The report rows on the engine: the matmul peak, its time (``digits`` decimals) and rate."""
    rate, frac = fmt_rate(needed, seconds, peak)
    return [
        ("matmul peak (float32)", f"{peak:.1f} GFLOP/s"),
        ("engine time", f"{seconds:.{digits}f} s ({n_rows / seconds:.0f} rows/s)"),
        ("engine GFLOP/s, % of peak", f"{rate}, {frac}"),
    ]


def engine_values(df: Any, seq: Tensor, pos: Tensor, length: Tensor, col: str) -> Tensor:
    """Column ``col`` of the engine's rows at the given (seq, pos, length) keys (any shape)."""
    import pandas as pd

    table = df.set_index(["seq", "pos", "length"])[col]
    keys = pd.MultiIndex.from_arrays(
        [seq.reshape(-1).numpy(), pos.reshape(-1).numpy(), length.reshape(-1).float().numpy()]
    )
    return torch.tensor(table.reindex(keys).to_numpy()).reshape(seq.shape)
