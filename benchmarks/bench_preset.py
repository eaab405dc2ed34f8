"""A whole preset run, native path vs the generic hook path, on the same named model.

Runs ``perturb-lens run PRESET model=NAME data.n_seqs=N data.seq_len=T`` twice in one process
through ``run_experiment``: once with the native lens (``load_model(name)``) and once with the
generic hook path on the same weights (``load_model(name, native=False)``), each into a fresh
cache folder (``PERTURB_LENS_CACHE``), so both fit their activation statistics and tokenize the
text themselves. The times cover the whole run (statistics, directions, sweep, writing the
shards); loading the models is not timed. Agreement: the largest |dKL| and relative |dL2| between
the two runs' rows (same seq, pos, direction, length).
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
from perturb_lens.config.schema import load_config
from perturb_lens.workflows.experiment import run_experiment


def timed_run(cfg, lens, folder: Path) -> tuple[float, float, pd.DataFrame]:
    """(wall s, process CPU s, rows) of one run of ``cfg`` on ``lens`` with a fresh cache."""
    os.environ["PERTURB_LENS_CACHE"] = str(folder / "cache")
    w0, c0 = time.perf_counter(), time.process_time()
    run = run_experiment(cfg, folder / "run", model=lens, progress=False)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return wall, cpu, run.rows()


def main() -> int:
    p = c.base_parser(__doc__)
    p.add_argument("--model", choices=list(c.NAMED), default="gemma3")
    p.add_argument("--preset", default="sensitive-directions")
    p.add_argument("--n-seqs", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
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
    keys = ["seq", "pos", "direction", "length"]
    both = rows_n.merge(rows_g, on=keys, suffixes=("", "_g"))
    agree = c.Agreement()
    agree.kl = float((both["kl"] - both["kl_g"]).abs().max())
    scale = both["l2_g"].clip(lower=1.0)
    agree.l2 = float(((both["l2"] - both["l2_g"]).abs() / scale).max())
    t_n, t_g = (cn, cg) if args.clock == "cpu" else (wn, wg)
    rows = [
        ("config", f"{args.preset}, {' '.join(overrides)} ({cfg.hook})"),
        ("rows", f"{len(rows_n)} (matched {len(both)} of {len(rows_g)})"),
        ("native run", f"{wn:.1f} s wall, {cn:.1f} s CPU"),
        ("generic run", f"{wg:.1f} s wall, {cg:.1f} s CPU"),
        (f"speed-up ({args.clock} clock)", f"{t_g / t_n:.2f}x"),
    ]
    return c.report("Preset run: native vs generic path", rows, agree)


if __name__ == "__main__":
    sys.exit(main())
