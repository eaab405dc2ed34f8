"""Single-position scope: each (sequence, position, length) perturbed alone, measured there.

Engine: one clean pass per batch, then every row is one token through the blocks after the hook,
attending to its sequence's clean keys/values (``LensModel.continue_at``), plus its unembedding.
Naive: one full forward of the whole sequence per perturbed copy (copies batched
``--naive-batch`` at a time), timed on ``--naive-copies`` random copies and extrapolated to all
rows (its cost per copy does not depend on which copy it is).

Needed FLOPs: the clean pass (every block + unembedding, each token) and per row the blocks from
the hook on for one token attending to its ``pos + 1`` keys, plus one unembedding.
"""

from __future__ import annotations

import sys

import common as c
import torch
from torch import Tensor

from perturb_lens.engine.sweep import SweepPlan, clean_pass, sweep


def naive_copies(
    hf, tokens: Tensor, layer: int, dirs: Tensor, copies: Tensor, batch: int
) -> tuple[Tensor, Tensor]:
    """KL and L2 at the perturbed position of each copy (rows of ``copies``: seq, pos, alpha),
    one full forward per copy, ``batch`` copies per call."""
    logp_c, read_c = c.naive_forward(hf, tokens, layer, lambda h: h)
    kls, l2s = [], []
    for c0 in range(0, len(copies), batch):
        chunk = copies[c0 : c0 + batch]
        s, p = chunk[:, 0].long(), chunk[:, 1].long()
        rows = torch.arange(len(chunk))

        def edit(h: Tensor, s=s, p=p, a=chunk[:, 2], rows=rows) -> Tensor:
            h = h.clone()
            h[rows, p] += a.unsqueeze(-1) * dirs[s, p]
            return h

        logp, read = c.naive_forward(hf, tokens[s], layer, edit)
        kls.append(c.naive_kl(logp_c[s, p], logp[rows, p]))
        l2s.append((read[rows, p] - read_c[s, p]).norm(dim=-1))
    return torch.cat(kls), torch.cat(l2s)


def main() -> int:
    p = c.base_parser(__doc__)
    c.model_args(p)
    c.sweep_args(p, n_seqs=4, seq_len=128, n_lengths=8)
    p.add_argument("--naive-copies", type=int, default=16, help="copies the naive loop runs")
    p.add_argument("--naive-batch", type=int, default=8, help="copies per naive forward")
    p.add_argument("--rows-per-pass", type=int, default=None)
    args = p.parse_args()
    c.configure(args)
    hf, model, layer = c.load(args)
    ms = model.spec
    lengths = [float(v) for v in c.PUBLISHED_LENGTHS[: args.n_lengths]]
    b, t, n_len = args.n_seqs, args.seq_len, len(lengths)
    tokens = c.random_tokens(b, t, ms.vocab_size, args.seed)
    extra = {} if args.rows_per_pass is None else {"rows_per_pass": args.rows_per_pass}
    spec = SweepPlan(
        hook=f"blocks.{layer}.hook_resid_pre", lengths=lengths, scope="single-position", **extra
    )
    dirs = c.unit_directions((b, t, ms.d_model), args.seed + 1)
    g = torch.Generator().manual_seed(args.seed + 2)
    n_copies = args.naive_copies
    copies = torch.stack(
        [
            torch.randint(0, b, (n_copies,), generator=g).float(),
            torch.randint(0, t, (n_copies,), generator=g).float(),
            torch.tensor(lengths)[torch.randint(0, n_len, (n_copies,), generator=g)],
        ],
        1,
    )

    def ours():
        clean = clean_pass(model, tokens, spec)
        return sweep(model, clean, {"random": dirs}, spec)

    small = SweepPlan(hook=spec.hook, lengths=lengths[:2], scope="single-position")
    sweep(model, clean_pass(model, tokens[:1, :16], small), {"r": dirs[:1, :16]}, small)
    naive_copies(hf, tokens, layer, dirs, copies[:1], 1)
    t_clean_naive = c.best_time(
        lambda: c.naive_forward(hf, tokens, layer, lambda h: h), args.repeat
    )
    t_ours, t_naive, peak = c.time_both(
        ours, lambda: naive_copies(hf, tokens, layer, dirs, copies, args.naive_batch), args
    )

    df = ours()
    kl_ref, l2_ref = naive_copies(hf, tokens, layer, dirs, copies, args.naive_batch)
    keys = copies[:, 0].long(), copies[:, 1].long(), copies[:, 2]
    agree = c.Agreement()
    agree.update(c.engine_values(df, *keys, "kl"), kl_ref, c.engine_values(df, *keys, "l2"), l2_ref)

    n_rows = b * t * n_len
    per_copy = (t_naive - t_clean_naive) / n_copies
    t_naive_all = t_clean_naive + n_rows * per_copy
    clean_f = b * t * (ms.n_layers * c.block_flops(ms, c.causal_keys(t)) + c.unembed_flops(ms))
    row_f = (ms.n_layers - layer) * c.block_flops(ms, c.causal_keys(t)) + c.unembed_flops(ms)
    needed = clean_f + n_rows * row_f
    unembed = (b * t + n_rows) * c.unembed_flops(ms)
    copy_f = t * (ms.n_layers * c.block_flops(ms, c.causal_keys(t)) + c.unembed_flops(ms))
    rows = [
        ("config", f"{args.model}, {spec.hook}, B={b}, T={t}, {n_len} lengths, KL + L2"),
        ("rows (seq x pos x length)", f"{n_rows}"),
        ("needed GFLOP", f"{needed / 1e9:.1f} ({row_f / 1e6:.1f} MFLOP per row)"),
        *c.unembed_rows(ms, unembed, needed),
        *c.engine_rows(needed, t_ours, peak, n_rows),
        (
            "naive time per copy",
            f"{per_copy:.3f} s ({n_copies} copies, {args.naive_batch} per forward)",
        ),
        ("naive time, all rows (extrapolated)", f"{t_naive_all:.0f} s"),
        ("speed-up (throughput ratio)", f"{t_naive_all / t_ours:.0f}x"),
        (
            "FLOP-bound ratio per copy",
            f"{copy_f / row_f:.0f}x (a full forward of T tokens / one row's needed FLOPs)",
        ),
    ]
    return c.report("Single-position scope", rows, agree)


if __name__ == "__main__":
    sys.exit(main())
