"""Analysis at scale: ``perturb-lens report`` on synthetic runs of 10^6 .. 10^8 rows.

A run directory that looks like a sensitive-directions run of the main preset (SmolLM2, 6
directions, its 24 relative lengths, KL and L2, all positions of 128-token sequences) is written
through the real store (``ResultStore.create`` / ``write_shard`` / ``finish``), shard by shard, so
writing 10^8 rows holds one shard in memory. Its columns are the engine's: ``seq`` (int32),
``pos`` (int16), ``direction`` (dictionary), ``length`` (float32), ``kl``, ``l2`` (float32).

For each size, ``perturb-lens report`` runs in a subprocess (wall time, and its peak RSS from
``os.wait4``). Where it fits (``--naive-max`` rows), the naive reference runs too, in its own
subprocess: every summary row loaded into pandas (``load_results``) and ``analysis.curves`` per
metric, which is what an analysis of the rows in memory costs. The report's plotted curves
(``figures/all_{metric}.csv``) must agree with the naive ones: counts exactly, means to 1e-9
relative, medians and quantiles within the quantile sketch's documented relative error ``alpha``
(the report streams both result modes through the same aggregates). The script exits non-zero
on a disagreement.

``--aggregate`` writes ``results: aggregate`` shards instead (each shard's rows through
``results.aggregate.aggregate_rows`` and ``results.compaction.write_aggregate_shard``, as the
runner does: the sketch in a file of its own), measures the run's bytes on disk before and after
the sketch compaction (``results.compaction.compact``, which the runner does every
``COMPACT_EVERY`` shards and at the end), and, where the naive reference runs, writes the same
rows as a rows-mode run beside it for the naive side. ``--sizes-only``: write and measure the
runs' bytes, no report.

``--log-y`` times ``report --log-y`` (with the log-y views of the curve figures, one more render
each); by default the report as a user runs it.

Usage: python benchmarks/bench_analysis.py [--sizes 1e6 1e7] [--naive-max 1e7] [--keep]
       [--out DIR] [--aggregate [--sizes-only]] [--log-y]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from perturb_lens.config.schema import load_config, resolve_depths
from perturb_lens.engine.shard import shard_ids
from perturb_lens.results import ResultStore, config_hash
from perturb_lens.results.aggregate import aggregate_rows
from perturb_lens.results.compaction import COMPACT_EVERY, compact, write_aggregate_shard
from perturb_lens.results.sketch import DEFAULT_ALPHA

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "sensitive_directions_smollm2.yaml"
SMOLLM2_LAYERS = 30  # the preset names its layer as a depth (middle): layer 15 of 30
SEQ_LEN = 128
SHARD_SEQS = 16  # 16 x 128 x 144 = 294,912 rows per shard
MEDIAN_NORM = 3.0  # absolute length = relative length x the median norm, as the runner resolves
# per direction: KL and L2 scale (the published ordering: real > cov-random > isotropic; difference
# directions above mixture ones)
GAIN = {
    "isotropic": 1.0,
    "isotropic-difference": 1.3,
    "cov-random-difference": 2.6,
    "cov-random-mixture": 1.9,
    "real-difference": 4.0,
    "real-mixture": 2.2,
}
REL_TOL = 1e-9


def _config() -> dict:
    cfg = resolve_depths(load_config(PRESET), SMOLLM2_LAYERS).model_dump(mode="json")
    cfg["name"] = "bench_analysis"
    cfg["data"]["seq_len"] = SEQ_LEN
    cfg["shard_seqs"] = SHARD_SEQS
    return cfg


def _labels(cfg: dict) -> list[str]:
    return [d if isinstance(d, str) else d.get("label") or d["name"] for d in cfg["directions"]]


def shard_rows(seqs: range, directions: list[str], lengths: np.ndarray, seed: int) -> pd.DataFrame:
    """The rows of one shard in the engine's column types and order (direction, seq, length,
    pos). KL grows as the square of the length, L2 linearly, each token with its own scale
    (exponential: heavy right tail, so the mean and the median differ)."""
    n_seq, n_len, n_dir = len(seqs), lengths.size, len(directions)
    rng = np.random.default_rng([seed, seqs.start])
    shape = (n_dir, n_seq, n_len, SEQ_LEN)
    scale = rng.exponential(size=(n_dir, n_seq, 1, SEQ_LEN))
    gain = np.array([GAIN.get(d, 1.0) for d in directions]).reshape(-1, 1, 1, 1)
    x = (lengths / MEDIAN_NORM).reshape(1, 1, -1, 1)
    noise = rng.random(shape, dtype=np.float32)
    kl = (gain * scale * x**2 + 1e-3 * noise).astype(np.float32)
    l2 = (gain * scale * x * 10.0 + 0.1 * noise).astype(np.float32)
    idx = np.indices(shape, dtype=np.int32).reshape(4, -1)
    return pd.DataFrame(
        {
            "seq": (idx[1] + seqs.start).astype(np.int32),
            "pos": idx[3].astype(np.int16),
            "direction": pd.Categorical.from_codes(idx[0], directions),
            "length": lengths.astype(np.float32)[idx[2]],
            "kl": kl.ravel(),
            "l2": l2.ravel(),
        }
    )


def disk_bytes(run: Path) -> dict[str, int]:
    """Bytes on disk of a run directory: ``total``, ``shards`` (``shards/``), ``sketch`` (the
    shards' sketch files and the run-level sketch) and ``other`` (manifest, lock)."""
    out = {"total": 0, "shards": 0, "sketch": 0, "other": 0}
    for f in (f for f in run.rglob("*") if f.is_file()):
        rel = f.relative_to(run).as_posix()
        part = "shards" if rel.startswith("shards/") else "other"
        if rel.startswith("sketches/") or (rel.startswith("sketch-") and "/" not in rel):
            part = "sketch"
        size = f.stat().st_size
        out[part] += size
        out["total"] += size
    return out


def write_run(
    folder: Path,
    n_rows: int,
    *,
    aggregate: bool = False,
    seed: int = 0,
    shard_seqs: int = SHARD_SEQS,
) -> tuple[int, dict[str, float]]:
    """A complete synthetic run of at least ``n_rows`` rows (whole sequences), written shard by
    shard through :class:`ResultStore`. Returns the number of rows written and, for an aggregate
    run (compacted as the runner does: every ``COMPACT_EVERY`` shards and at the end), its bytes
    on disk without compaction (the shards' sketch files as written, all kept) and with it, and
    the seconds (wall, CPU) the compactions took."""
    cfg = _config()
    cfg["shard_seqs"] = shard_seqs
    sizes: dict[str, float] = {}
    if aggregate:
        cfg["results"] = "aggregate"
    directions = _labels(cfg)
    lengths = np.asarray(cfg["lengths"], np.float64) * MEDIAN_NORM
    per_seq = SEQ_LEN * len(directions) * lengths.size
    n_seqs = math.ceil(n_rows / per_seq)
    cfg["data"]["n_seqs"] = n_seqs
    meta = {
        "model": cfg["model"],
        "model_source": "synthetic (bench_analysis)",
        "architecture": "llama",
        "frame": "centered",
        "dtype": "float32",
        "hook": cfg["hook"],
        "read": "blocks.29.hook_resid_post",
        "scope": cfg["scope"],
        "lengths": lengths.tolist(),
        "n_seqs": n_seqs,
        "seq_len": SEQ_LEN,
        "seed": seed,
        "median_norm": MEDIAN_NORM,
        "stats": {"n_samples": 20 * 576, "d_model": 576, "source": "synthetic"},
        "include_bos": True,
        "drop_last_position": True,
    }
    written, sketch_files, wall, cpu = 0, 0, 0.0, 0.0
    with ResultStore(folder) as store:
        store.create(cfg, config_hash(cfg), meta, resume=False)
        for i, sid in enumerate(shard_ids(n_seqs, shard_seqs)):
            seqs = range(i * shard_seqs, min(n_seqs, (i + 1) * shard_seqs))
            rows = shard_rows(seqs, directions, lengths, seed)
            info = {"seqs": [seqs.start, seqs.stop]}
            if aggregate:
                table = aggregate_rows(rows, cfg["metrics"], meta)
                write_aggregate_shard(store, sid, table, info=info)
                sketch_files += (
                    (folder / store.manifest["shards"][sid]["sketch"]["file"]).stat().st_size
                )
                t0, c0 = time.perf_counter(), time.process_time()
                compact(store, min_pending=COMPACT_EVERY)
                wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
            else:
                store.write_shard(sid, rows, info=info)
            written += len(rows)
        if aggregate:
            t0, c0 = time.perf_counter(), time.process_time()
            compact(store)
            wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
            after = disk_bytes(folder)
            sizes = {"shards": i + 1, "compact_s": wall, "compact_cpu_s": cpu}
            sizes.update({f"after_{k}": v for k, v in after.items()})
            sizes["before_total"] = after["total"] - after["sketch"] + sketch_files
            sizes["sketch_files"] = sketch_files
        store.finish({"seconds": 0.0, "shards": i + 1})
    return written, sizes


def _timed(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``cmd``: its wall seconds, CPU seconds (user + system, its children included) and
    peak RSS in MB (of the largest process, from ``os.wait4``). The CPU time is the steadier
    figure on a shared machine."""
    before = os.times()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read().decode() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    after = os.times()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return {"s": wall, "cpu_s": cpu, "MB": usage.ru_maxrss / 1024}


def naive(run_dir: Path, out: Path) -> None:
    """The naive reference (in a child process): every summary row in pandas, then
    ``analysis.curves`` per metric; the curves go to ``out/naive_{metric}.csv``."""
    from perturb_lens.analysis.tables import curves
    from perturb_lens.results.summary import summary_rows

    rows = summary_rows(run_dir)
    for metric in ("kl", "l2"):
        curves(rows, metric).to_csv(out / f"naive_{metric}.csv", index=False)


def compare(report_dir: Path, naive_dir: Path, quantile_tol: float = REL_TOL) -> dict[str, float]:
    """Largest relative difference, per statistic, between the report's plotted curves and the
    naive ones (counts must be equal); raises ``SystemExit`` above :data:`REL_TOL` (means) or
    ``quantile_tol`` (medians and quantiles: a sketch's relative error in aggregate runs)."""
    worst: dict[str, float] = {}
    for metric in ("kl", "l2"):
        ours = pd.read_csv(report_dir / "figures" / f"all_{metric}.csv")
        ref = pd.read_csv(naive_dir / f"naive_{metric}.csv")
        for frame in (ours, ref):  # the rows' float32 lengths, written as float32 or as float64
            frame["length"] = frame["length"].astype(np.float32)
        keys = ["direction", "length"]
        both = ours.merge(ref, on=keys, suffixes=("", "_naive"), validate="one_to_one")
        if len(both) != len(ref) or (both["n"] != both["n_naive"]).any():
            raise SystemExit(f"{metric}: the report's groups or counts differ from the naive ones")
        for stat in ("mean", "median", "q05", "q25", "q75", "q95"):
            a, b = both[stat].to_numpy(), both[f"{stat}_naive"].to_numpy()
            rel = np.abs(a - b) / np.maximum(np.abs(b), np.finfo(float).tiny)
            worst[stat] = max(worst.get(stat, 0.0), float(rel.max()))
    bad = {k: v for k, v in worst.items() if v > (REL_TOL if k == "mean" else quantile_tol)}
    if bad:
        raise SystemExit(f"the report disagrees with the naive reference: {bad}")
    return worst


def _size(text: str) -> int:
    return int(float(text))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=_size, nargs="+", default=[10**6, 10**7], help="rows per run")
    p.add_argument("--naive-max", type=_size, default=10**7, help="largest size run naively too")
    p.add_argument("--aggregate", action="store_true", help="write results: aggregate shards")
    p.add_argument(
        "--sizes-only", action="store_true", help="write the runs and measure their bytes only"
    )
    p.add_argument("--shard-seqs", type=int, default=SHARD_SEQS, help="sequences per shard")
    p.add_argument("--out", type=Path, default=None, help="folder for the runs (default: a temp)")
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument(
        "--log-y", action="store_true", help="time `report --log-y` (the log-y figure views too)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--src", type=Path, default=REPO / "src", help="perturb_lens sources to time (before/after)"
    )
    p.add_argument("--naive-child", nargs=2, metavar=("RUN", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.naive_child:
        naive(Path(args.naive_child[0]), Path(args.naive_child[1]))
        return
    root = args.out or Path(tempfile.mkdtemp(prefix="bench_analysis_"))
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(args.src.resolve())}
    results = []
    try:
        for n in args.sizes:
            run = root / f"rows_{n:.0e}".replace("+", "")
            shutil.rmtree(run, ignore_errors=True)
            t0, c0 = time.perf_counter(), time.process_time()
            rows, sizes = write_run(
                run, n, aggregate=args.aggregate, seed=args.seed, shard_seqs=args.shard_seqs
            )
            t_write, c_write = time.perf_counter() - t0, time.process_time() - c0
            disk = disk_bytes(run)["total"] / 2**20
            print(
                f"{rows:,} rows written in {t_write:.1f} s ({c_write:.1f} s CPU; {disk:,.2f} MiB)",
                flush=True,
            )
            row = {"rows": rows, "write_s": t_write, "write_cpu_s": c_write, "MiB": disk}
            if sizes:
                print(
                    f"  {sizes['shards']} shards; without compaction {sizes['before_total']:,} B "
                    f"(shards {sizes['after_shards']:,}, sketch files {sizes['sketch_files']:,})"
                    f"; compacted {sizes['after_total']:,} B (run-level sketch "
                    f"{sizes['after_sketch']:,}, manifest + lock {sizes['after_other']:,}); "
                    f"compactions {sizes['compact_s']:.1f} s ({sizes['compact_cpu_s']:.1f} s CPU)",
                    flush=True,
                )
                row.update(MiB_before=sizes["before_total"] / 2**20, **sizes)
            if args.sizes_only:
                results.append(row)
                if not args.keep:
                    shutil.rmtree(run, ignore_errors=True)
                continue
            cmd = [sys.executable, "-m", "perturb_lens.cli.app", "report", str(run)]
            cmd += ["--log-y"] if args.log_y else []
            rep = _timed(cmd, env)
            row.update({f"report_{k}": v for k, v in rep.items()})
            print(
                f"  report: {rep['s']:.1f} s ({rep['cpu_s']:.1f} s CPU), peak RSS "
                f"{rep['MB']:,.0f} MB",
                flush=True,
            )
            if n <= args.naive_max:
                plain, tol = run, DEFAULT_ALPHA  # quantiles: the sketch's, in either mode
                if args.aggregate:  # the naive side needs the rows: the same ones, rows mode
                    plain = root / f"{run.name}_rows"
                    shutil.rmtree(plain, ignore_errors=True)
                    write_run(plain, n, seed=args.seed, shard_seqs=args.shard_seqs)
                naive_cmd = [sys.executable, __file__, "--naive-child", str(plain), str(run)]
                nai = _timed(naive_cmd, env)
                worst = compare(run, run, tol)
                if plain != run and not args.keep:
                    shutil.rmtree(plain, ignore_errors=True)
                row.update({f"naive_{k}": v for k, v in nai.items()})
                row.update(ratio=nai["s"] / rep["s"], max_rel_diff=max(worst.values()))
                print(
                    f"  naive (pandas load_results + curves): {nai['s']:.1f} s ({nai['cpu_s']:.1f}"
                    f" s CPU), peak RSS {nai['MB']:,.0f} MB; naive / report = {row['ratio']:.2f};"
                    f" agree (max relative difference {row['max_rel_diff']:.1e})",
                    flush=True,
                )
            results.append(row)
            if not args.keep:
                shutil.rmtree(run, ignore_errors=True)
    finally:
        if not args.keep and args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    print(pd.DataFrame(results).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
