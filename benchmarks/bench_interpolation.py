"""Last-position interpolation (plateau experiments): L2 along a straight line between activations.

For each prompt, the activation at the last position is moved from its clean value towards the
clean last-position activation of another prompt in ``--steps`` equal steps (``x + t (x' - x)``,
t = 0 ... 1); the L2 change at the last block's output is measured at that position.

Engine: ``scope="last-position"``, one clean pass per batch, then every step is one row (one token
through the blocks after the hook, attending to the clean prefix); no unembedding (L2 only).
Naive: one full forward of the batch of prompts per step (the base model only: no logits), as the
published plateau code does with hooks.

Needed FLOPs: the clean pass (every block, each token) plus, per (prompt, step), the blocks from
the hook on for the last token attending to the whole prompt.
"""

from __future__ import annotations

import sys

import common as c
import torch
from torch import Tensor

from perturb_lens.engine.sweep import SweepPlan, clean_pass, sweep


def naive_interpolation(
    hf, tokens: Tensor, layer: int, delta: Tensor, steps: list[float]
) -> Tensor:
    """L2 [B, steps] at the last position: one base-model forward per step (plus one clean)."""
    _, read_c = c.naive_forward(hf, tokens, layer, lambda h: h, logits=False)
    out = []
    for a in steps:

        def edit(h: Tensor, a: float = a) -> Tensor:
            h = h.clone()
            h[:, -1] += a * delta
            return h

        _, read = c.naive_forward(hf, tokens, layer, edit, logits=False)
        out.append((read[:, -1] - read_c[:, -1]).norm(dim=-1))
    return torch.stack(out, 1)


def main() -> int:
    p = c.base_parser(__doc__)
    c.model_args(p, layer=1)
    p.add_argument("--n-prompts", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=10)
    p.add_argument("--steps", type=int, default=101)
    args = p.parse_args()
    c.configure(args)
    hf, model, _ = c.load(args)
    ms = model.spec
    b, t = args.n_prompts, args.seq_len
    steps = torch.linspace(0, 1, args.steps).tolist()
    tokens = c.random_tokens(b, t, ms.vocab_size, args.seed)
    spec = SweepPlan(
        hook=f"blocks.{args.layer}.hook_resid_pre",
        lengths=steps,
        scope="last-position",
        metrics=["l2"],
    )
    x = clean_pass(model, tokens, spec).x
    delta = (x[:, -1].roll(1, dims=0) - x[:, -1]).float()  # towards another prompt's activation
    dirs = torch.zeros_like(x, dtype=torch.float32)
    dirs[:, -1] = delta

    def ours():
        return sweep(model, clean_pass(model, tokens, spec), {"interp": dirs}, spec)

    def naive():
        return naive_interpolation(hf, tokens, args.layer, delta, steps)

    ours()
    naive_interpolation(hf, tokens, args.layer, delta, steps[:2])
    t_ours, t_naive, peak = c.time_both(ours, naive, args)

    df = ours()
    l2_ref = naive()
    n_s = len(steps)
    seq = torch.arange(b).view(b, 1).expand(b, n_s)
    pos = torch.full((b, n_s), t - 1)
    length = torch.tensor(steps).view(1, n_s).expand(b, n_s)
    agree = c.Agreement()
    read_norm = clean_pass(model, tokens, spec).reads[model.default_read][:, -1].norm(dim=-1)
    l2 = c.engine_values(df, seq, pos, length, "l2")
    agree.update(None, None, l2, l2_ref, read_norm.unsqueeze(1).expand(b, n_s))

    n_rows = b * n_s
    clean_f = b * t * ms.n_layers * c.block_flops(ms, c.causal_keys(t))
    row_f = (ms.n_layers - args.layer) * c.block_flops(ms, t)
    needed = clean_f + n_rows * row_f
    naive_f = (n_s + 1) * clean_f
    rows = [
        ("config", f"{args.model}, {spec.hook}, B={b} prompts, T={t}, {n_s} steps, L2 only"),
        ("rows (prompt x step)", f"{n_rows}"),
        ("needed GFLOP", f"{needed / 1e9:.2f}"),
        *c.engine_rows(needed, t_ours, peak, n_rows, digits=3),
        ("naive time (1 forward/step)", f"{t_naive:.2f} s ({n_rows / t_naive:.0f} rows/s)"),
        ("speed-up (throughput ratio)", f"{t_naive / t_ours:.1f}x"),
        ("FLOP-bound speed-up", f"{naive_f / needed:.1f}x (naive FLOPs / needed FLOPs)"),
    ]
    return c.report("Last-position interpolation", rows, agree)


if __name__ == "__main__":
    sys.exit(main())
