"""All-positions scope (the published measurement): engine vs one full forward per length.

Every position of a sequence is pushed along its own random unit direction by each length at
``blocks.L.hook_resid_pre``; KL of the next-token distribution and L2 at the last block's output.

Needed FLOPs (what any method must compute): one clean pass (every block + unembedding for each
token: the clean distribution and the clean read) plus, per length and token, the blocks from the
hook on (causal attention) and the unembedding. The naive loop instead runs every block for every
length. Throughput = (sequence x position x length) rows per second.
"""

from __future__ import annotations

import sys

import common as c
import torch
from torch import Tensor

from perturb_lens.engine.sweep import SweepPlan, clean_pass, sweep


def naive_all_positions(
    hf, tokens: Tensor, layer: int, dirs: Tensor, lengths: list[float]
) -> tuple[Tensor, Tensor, Tensor]:
    """KL and L2 [B, L, T]: one full forward per length (plus one clean); the clean read's norm
    [B, 1, T] (the scale of float32 noise in L2)."""
    logp_c, read_c = c.naive_forward(hf, tokens, layer, lambda h: h)
    kls, l2s = [], []
    for alpha in lengths:
        logp, read = c.naive_forward(hf, tokens, layer, lambda h, a=alpha: h + a * dirs)
        kls.append(c.naive_kl(logp_c, logp))
        l2s.append((read - read_c).norm(dim=-1))
    return torch.stack(kls, 1), torch.stack(l2s, 1), read_c.norm(dim=-1).unsqueeze(1)


def main() -> int:
    p = c.base_parser(__doc__)
    c.model_args(p)
    c.sweep_args(p, n_seqs=2, seq_len=128, n_lengths=23)
    args = p.parse_args()
    c.configure(args)
    hf, model, layer = c.load(args)
    spec_m = model.spec
    lengths = [float(v) for v in c.PUBLISHED_LENGTHS[: args.n_lengths]]
    tokens = c.random_tokens(args.n_seqs, args.seq_len, spec_m.vocab_size, args.seed)
    b, t, n_len = args.n_seqs, args.seq_len, len(lengths)
    spec = SweepPlan(hook=f"blocks.{layer}.hook_resid_pre", lengths=lengths, metrics=["kl", "l2"])
    dirs = c.unit_directions((b, t, spec_m.d_model), args.seed + 1)

    def ours():
        clean = clean_pass(model, tokens, spec)
        return sweep(model, clean, {"random": dirs}, spec)

    def naive():
        return naive_all_positions(hf, tokens, layer, dirs, lengths)

    # warm both paths up on a small problem, then time them interleaved with the peak
    small = SweepPlan(hook=spec.hook, lengths=lengths[:2], metrics=["kl", "l2"])
    sweep(model, clean_pass(model, tokens[:1, :16], small), {"r": dirs[:1, :16]}, small)
    naive_all_positions(hf, tokens[:1, :16], layer, dirs[:1, :16], lengths[:1])
    t_ours, t_naive, peak = c.time_both(ours, naive, args)

    df = ours()
    kl_ref, l2_ref, read_norm = naive()
    seq = torch.arange(b).view(b, 1, 1).expand(b, n_len, t)
    pos = torch.arange(t).view(1, 1, t).expand(b, n_len, t)
    length = torch.tensor(lengths).view(1, n_len, 1).expand(b, n_len, t)
    agree = c.Agreement()
    agree.update(
        c.engine_values(df, seq, pos, length, "kl"),
        kl_ref,
        c.engine_values(df, seq, pos, length, "l2"),
        l2_ref,
        read_norm.expand_as(l2_ref),
    )

    n_rows = b * t * n_len
    block = spec_m.n_layers * c.block_flops(spec_m, c.causal_keys(t))  # all blocks, one token
    per_tok_clean = block + c.unembed_flops(spec_m)
    per_row = block * (spec_m.n_layers - layer) / spec_m.n_layers + c.unembed_flops(spec_m)
    needed = b * t * per_tok_clean + n_rows * per_row
    unembed = (b * t + n_rows) * c.unembed_flops(spec_m)
    rate_n, frac_n = c.fmt_rate(needed, t_naive, peak)
    rows = [
        ("config", f"{args.model}, {spec.hook}, B={b}, T={t}, {n_len} lengths, KL + L2"),
        ("rows (seq x pos x length)", f"{n_rows}"),
        ("needed GFLOP", f"{needed / 1e9:.1f}"),
        *c.unembed_rows(spec_m, unembed, needed),
        *c.engine_rows(needed, t_ours, peak, n_rows),
        ("naive time (1 forward/length)", f"{t_naive:.2f} s ({n_rows / t_naive:.0f} rows/s)"),
        ("speed-up (throughput ratio)", f"{t_naive / t_ours:.2f}x"),
        ("naive GFLOP/s (same needed FLOPs)", f"{rate_n}, {frac_n}"),
        (
            "FLOP-bound speed-up",
            f"{(per_tok_clean * (n_len + 1)) / (per_tok_clean + n_len * per_row):.2f}x "
            "(naive FLOPs / needed FLOPs)",
        ),
    ]
    return c.report("All-positions scope", rows, agree)


if __name__ == "__main__":
    sys.exit(main())
