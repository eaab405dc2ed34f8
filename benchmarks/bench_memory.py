"""Memory: the paper-scale configuration streams in bounded memory, flat as the token count grows.

The published setup (GPT-2 small shapes, ``blocks.6.hook_resid_pre``, 128-token sequences, the 23
published lengths, the 6 baseline directions, KL + L2, ``shard_seqs`` sequences per shard) is run
end to end with ``run_experiment`` (statistics fit, every shard computed and written to Parquet)
on shortened token counts of growing size, each in a fresh subprocess that reports its peak RSS.
Peak RSS that does not grow with the number of sequences (shards) means the full 16,000 x 128
run peaks at the same figure, except for the real-activation pool, which fills up to its
``stats.pool_size`` rows at >= pool_size / 127 sequences: that known, fixed amount is added to the
projection.

Each sequence costs about 20 s on 2 quiet CPU cores (128 x 23 x 6 rows); the default sizes (1, 2,
4 sequences, one per shard) finish in a few minutes. ``--sizes 8 16 32 --shard-seqs 8`` runs the
paper's shard size.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import base_parser, report

POOL_SIZE = 65536  # the config default (stats.pool_size)


def child(n_seqs: int, shard_seqs: int, threads: int, seed: int) -> None:
    """One run in this process; print its peak RSS and times as JSON."""
    import torch
    from common import gpt2_small, peak_rss_mb, random_tokens

    from perturb_lens.workflows.experiment import run_experiment

    torch.set_num_threads(threads)
    hf, model = gpt2_small(seed)
    del hf  # only the engine's model stays, as in a real run
    gc.collect()
    tokens = random_tokens(n_seqs, 128, model.spec.vocab_size, seed)
    base = peak_rss_mb()
    cfg = {
        "name": "memory",
        "model": "gpt2-small-random",
        "hook": "blocks.6.hook_resid_pre",
        "lengths": "published",
        "metrics": ["kl", "l2"],
        "data": {"seq_len": 128, "n_seqs": n_seqs},
        "shard_seqs": shard_seqs,
        "stats": {"pool_size": POOL_SIZE},
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run_experiment(cfg, Path(tmp) / "run", model=model, tokens=tokens, progress=False)
    out = {"after_load_mb": base, "peak_mb": peak_rss_mb(), "seconds": time.perf_counter() - t0}
    print(json.dumps(out))


def main() -> int:
    p = base_parser(__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4], help="sequences per run")
    p.add_argument("--shard-seqs", type=int, default=1)
    p.add_argument("--limit-gb", type=float, default=4.0)
    p.add_argument("--child", type=int, default=None, help=argparse_hidden())
    args = p.parse_args()
    if args.child is not None:
        child(args.child, args.shard_seqs, args.threads, args.seed)
        return 0
    rows = [("config", "gpt2-small shapes, blocks.6, T=128, 23 lengths, 6 directions, KL + L2")]
    peaks = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--child", str(n), "--shard-seqs", str(args.shard_seqs)]
        cmd += ["--threads", str(args.threads), "--seed", str(args.seed)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(res.stdout.strip().splitlines()[-1])
        peaks.append(r["peak_mb"])
        rows.append(
            (
                f"{n} seqs ({n * 128} tokens, {-(-n // args.shard_seqs)} shards)",
                f"peak RSS {r['peak_mb']:.0f} MB (model loaded: {r['after_load_mb']:.0f} MB), "
                f"{r['seconds']:.0f} s",
            )
        )
    pool_mb = POOL_SIZE * 768 * 4 / 2**20
    largest_pool = min(POOL_SIZE, max(args.sizes) * 127) * 768 * 4 / 2**20
    projected = max(peaks) + pool_mb - largest_pool
    growth = max(peaks) - min(peaks)
    rows += [
        ("growth of peak RSS across sizes", f"{growth:.0f} MB"),
        (
            "real-activation pool at 16,000 seqs",
            f"+{pool_mb - largest_pool:.0f} MB (fills to "
            f"{POOL_SIZE} x 768 float32 = {pool_mb:.0f} MB)",
        ),
        ("projected peak at 16,000 x 128", f"{projected:.0f} MB (limit {args.limit_gb:.1f} GB)"),
    ]
    code = report(f"Memory (shard_seqs={args.shard_seqs})", rows)
    ok = projected <= args.limit_gb * 1024
    print(f"\nmemory target (<= {args.limit_gb} GB, flat): {'MET' if ok else 'MISSED'}")
    return code if ok else 1


def argparse_hidden() -> str:
    """Help text of the internal --child flag."""
    return "internal: run one size in this process"


if __name__ == "__main__":
    sys.exit(main())
