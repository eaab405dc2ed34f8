"""A whole preset run, native path vs the generic hook path, on the same named model.

Runs ``perturb-lens run PRESET model=NAME data.n_seqs=N data.seq_len=T`` twice in one process
through ``run_experiment``: once with the native lens (``load_model(name)``) and once with the
generic hook path on the same weights (``load_model(name, native=False)``), each into a fresh
cache folder (``PERTURB_LENS_CACHE``), so both fit their activation statistics and tokenize the
text themselves. The times cover the whole run (statistics, directions, sweep, writing the
shards); loading the models is not timed. Agreement: the largest |dKL| and relative |dL2| between
the two runs' rows (same seq, pos, direction, length).

The FLOP bound: the sweep's rows each need the blocks from the hook on and the unembedding
(a KL needs every logit of the perturbed row for its normalizer), so at the measured matmul
peak (all threads) the native run can take no less than rows x per-row FLOPs / peak. Dividing
the generic run's time by that gives the largest speed-up any exact implementation could show
on this machine; the printout says whether a target ratio (``--target``) is within it.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import common as c
import pandas as pd

from perturb_lens import load_model
from perturb_lens.common.hook_depths import resolve_hook
from perturb_lens.config.schema import load_config
from perturb_lens.workflows.experiment import run_experiment


def timed_run(cfg, lens, folder: Path) -> tuple[float, float, pd.DataFrame]:
    """(wall s, process CPU s, rows) of one run of ``cfg`` on ``lens`` with a fresh cache."""
    os.environ["PERTURB_LENS_CACHE"] = str(folder / "cache")
    w0, c0 = time.perf_counter(), time.process_time()
    run = run_experiment(cfg, folder / "run", model=lens, progress=False)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return wall, cpu, run.rows()


def _one_thread_peak() -> float:
    """The matmul peak of one thread (what one CPU-second can do)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return c.matmul_peak()
    finally:
        torch.set_num_threads(old)


def main() -> int:
    p = c.base_parser(__doc__)
    p.add_argument("--model", choices=list(c.NAMED), default="gemma3")
    p.add_argument("--preset", default="sensitive-directions")
    p.add_argument("--n-seqs", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--target", type=float, default=5.0, help="speed-up asked for (issue 25: 5x)")
    args = p.parse_args()
    c.configure(args)
    name = c.NAMED[args.model]
    overrides = [
        f"model={name}",
        f"data.n_seqs={args.n_seqs}",
        f"data.seq_len={args.seq_len}",
        f"threads={args.threads}",
    ]
    cfg = load_config(args.preset, overrides)
    native = load_model(name, device="cpu")
    generic = load_model(name, native=False, device="cpu")
    saved = os.environ.get("PERTURB_LENS_CACHE")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            wn, cn, rows_n = timed_run(cfg, native, Path(tmp) / "native")
            wg, cg, rows_g = timed_run(cfg, generic, Path(tmp) / "generic")
    finally:
        if saved is None:
            os.environ.pop("PERTURB_LENS_CACHE", None)
        else:
            os.environ["PERTURB_LENS_CACHE"] = saved
    # relative lengths are multiplied by each run's own median norm, which may differ in the last
    # bits between the paths: rows are matched by the length's place in the grid
    for rows in (rows_n, rows_g):
        rows["step"] = rows["length"].rank(method="dense").astype(int)
    keys = ["seq", "pos", "direction", "step"]
    both = rows_n.merge(rows_g, on=keys, suffixes=("", "_g"))
    agree = c.Agreement()
    agree.kl = float((both["kl"] - both["kl_g"]).abs().max())
    scale = both["l2_g"].clip(lower=1.0)
    both["dl2"] = (both["l2"] - both["l2_g"]).abs() / scale
    agree.l2 = float(both["dl2"].max())
    worst = both.groupby("direction", observed=True)["dl2"].max()
    t_n, t_g = (cn, cg) if args.clock == "cpu" else (wn, wg)
    spec = native.spec
    layer = int(resolve_hook(cfg.hook, spec.n_layers).split(".")[1])
    block = spec.n_layers * c.block_flops(spec, c.causal_keys(args.seq_len))
    per_row = block * (spec.n_layers - layer) / spec.n_layers + c.unembed_flops(spec)
    # the statistics fit (20 x d_model tokens by default) and the clean pass run to the hook /
    # through the model once; both paths need them
    n_fit = cfg.stats.n_tokens or 20 * spec.d_model
    fixed = n_fit * block * layer / spec.n_layers + args.n_seqs * args.seq_len * block
    needed = len(rows_n) * per_row + fixed
    # the clock's peak: one process's CPU seconds are bounded by a one-thread rate, wall seconds
    # by the rate of all the threads the run used
    peak = c.matmul_peak() if args.clock == "wall" else _one_thread_peak()
    floor = needed / (peak * 1e9)
    rows = [
        ("config", f"{args.preset}, {' '.join(overrides)} ({cfg.hook})"),
        ("rows", f"{len(rows_n)} (matched {len(both)} of {len(rows_g)})"),
        ("native run", f"{wn:.1f} s wall, {cn:.1f} s CPU"),
        ("generic run", f"{wg:.1f} s wall, {cg:.1f} s CPU"),
        (f"speed-up ({args.clock} clock)", f"{t_g / t_n:.2f}x"),
        ("FLOPs (rows x (blocks from hook + unembedding), fit, clean)", f"{needed / 1e12:.2f} T"),
        ("max relative |dL2| per direction", ", ".join(f"{k} {v:.0e}" for k, v in worst.items())),
        (f"matmul peak ({args.clock} clock)", f"{peak:.1f} GFLOP/s"),
        ("native run at that peak (a floor)", f"{floor:.1f} s"),
        (
            f"largest possible speed-up (generic / floor) vs target {args.target:g}x",
            f"{t_g / floor:.2f}x: target "
            + ("reachable" if t_g / floor >= args.target else "unreachable"),
        ),
    ]
    return c.report("Preset run: native vs generic path", rows, agree)


if __name__ == "__main__":
    sys.exit(main())
