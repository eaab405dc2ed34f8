"""Sketch compaction of aggregate runs: the shards' sketch files merged into one run-level sketch.

Every reader gives the same numbers before, during and after compaction (counts exactly); the
run-level sketch equals bucket counts made by hand from the summary rows; a run stopped anywhere
around a compaction resumes to the same files, bit for bit, as one run straight through."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import run_files

import perturb_lens.results.compaction as compaction
from perturb_lens.analysis import claim_intervals
from perturb_lens.config.schema import validate_config
from perturb_lens.results import ChecksumError, ResultStore, config_hash
from perturb_lens.results import load_manifest as manifest_of
from perturb_lens.results.aggregate import (
    aggregate_curves,
    aggregate_rows,
    run_metric_aggregates,
    threshold_summary,
)
from perturb_lens.results.compaction import compact, write_aggregate_shard
from perturb_lens.results.sketch import DEFAULT_ALPHA
from perturb_lens.workflows.experiment import run_experiment

METRICS = ["kl", "dce"]
SEQ_LEN = 6
META = {"scope": "all-positions", "seq_len": SEQ_LEN, "lengths": [0.0, 1.0, 3.0, 9.0]}
SHARDS = [f"s{i}" for i in range(4)]  # 3 sequences each


def _rows(n_seq: int = 12, seed: int = 0) -> pd.DataFrame:
    """Heavy-tailed, tied, zero, negative and NaN values (in ``dce``) for 3 directions x 4
    lengths; the last position of each sequence is outside the summary (drop_last_position)."""
    rng = np.random.default_rng(seed)
    idx = pd.MultiIndex.from_product(
        [range(n_seq), range(SEQ_LEN), ["a", "b", "c"], META["lengths"]],
        names=["seq", "pos", "direction", "length"],
    ).to_frame(index=False)
    kl = rng.pareto(1.5, len(idx)) * idx["length"] / 9
    kl[rng.random(len(idx)) < 0.1] = 0.25
    idx["kl"] = kl.astype(np.float32)
    idx["dce"] = rng.standard_t(2, len(idx)) * idx["length"]
    idx.loc[11, "dce"] = np.nan
    idx["direction"] = pd.Categorical(idx["direction"], categories=["a", "b", "c"])
    return idx


def _config() -> dict:
    cfg = {"directions": ["a", "b", "c"], "metrics": METRICS, "results": "aggregate"}
    return validate_config(cfg).model_dump(mode="json")


def _part(rows: pd.DataFrame, shard: str) -> pd.DataFrame:
    """The rows of one shard (3 sequences)."""
    i = SHARDS.index(shard)
    return rows[(rows.seq >= 3 * i) & (rows.seq < 3 * i + 3)]


def _drive(
    folder: Path, rows: pd.DataFrame, shards: list[str], every: int | None, final: bool = True
) -> Path:
    """The runner's loop on synthetic rows: create (or resume), write the shards not done, a
    compaction every ``every`` pending sketch files (None: none) and, with ``final`` once all
    shards are written, the last compaction and ``finish``."""
    cfg = _config()
    with ResultStore(folder) as store:
        store.create(cfg, config_hash(cfg), META, resume=(folder / "manifest.json").exists())
        done = store.done_shards()
        for sid in (s for s in shards if s not in done):
            write_aggregate_shard(store, sid, aggregate_rows(_part(rows, sid), METRICS, META))
            if every is not None:
                compact(store, min_pending=every)
        if final and shards == SHARDS:
            compact(store)
            store.finish()
    return folder


def _numbers(run: Path) -> dict[str, pd.DataFrame]:
    """What the readers give: every merged aggregate frame, curves (exact moments, sketch
    quantiles, sequence bootstrap), crossing summary and a claim's intervals."""
    out: dict[str, pd.DataFrame] = {}
    for metric, agg in run_metric_aggregates(run, METRICS).items():
        for kind in ("moments", "sketch", "seq", "threshold", "sample"):
            out[f"{metric}/{kind}"] = getattr(agg, kind)
        stat = ("mean", "std", "min", "max", "median", "q05", "q25", "q75", "q95")
        out[f"{metric}/curves"] = aggregate_curves(agg, stat=stat, n_boot=200)
    out["kl/threshold_summary"] = threshold_summary(run_metric_aggregates(run, ["kl"])["kl"])
    out["claims"] = claim_intervals(run, ["b > a", "c ~ b"], metric="kl", n_boot=200)
    return out


def _assert_same(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        pd.testing.assert_frame_equal(a[key], b[key], check_exact=True, obj=key)


def _sketch_by_hand(rows: pd.DataFrame) -> pd.DataFrame:
    """Bucket counts of the summary rows' finite values, written plainly: drop the last
    position, bucket ceil(log|x| / log gamma) per sign (zeros apart), count per group."""
    kept = rows[rows["pos"] < SEQ_LEN - 1]
    gamma = (1 + DEFAULT_ALPHA) / (1 - DEFAULT_ALPHA)
    frames = []
    for metric in METRICS:
        ok = np.isfinite(kept[metric].to_numpy(np.float64))
        x = kept[metric].to_numpy(np.float64)[ok]
        with np.errstate(divide="ignore"):
            k = np.where(x != 0, np.ceil(np.log(np.abs(x)) / np.log(gamma)), 0)
        f = pd.DataFrame(
            {
                "metric": metric,
                "direction": kept["direction"].astype(str).to_numpy()[ok],
                "length": kept["length"].to_numpy(np.float64)[ok],
                "sign": np.sign(x).astype(np.int8),
                "bucket": k.astype(np.int64),
            }
        )
        frames.append(f.value_counts().rename("count").reset_index())
    out = pd.concat(frames, ignore_index=True)
    value = out["sign"] * (2**32 + out["bucket"])  # negatives, zero, positives
    return (
        out.assign(_v=value)
        .sort_values(["metric", "direction", "length", "_v"], ignore_index=True)
        .drop(columns="_v")
    )


def test_compaction_leaves_every_number_identical(tmp_path: Path) -> None:
    rows = _rows()
    loose = _drive(tmp_path / "loose", rows, SHARDS, every=None, final=False)  # 4 sketch files
    assert "sketch" not in manifest_of(loose) and len(list((loose / "sketches").iterdir())) == 4
    ref = _numbers(loose)
    partial = _drive(tmp_path / "partial", rows, SHARDS[:2], every=2)  # s0, s1 merged ...
    partial = _drive(partial, rows, SHARDS[2:3], every=None)  # ... s2 in its own file
    m = manifest_of(partial)
    assert m["sketch"]["shards"] == ["s0", "s1"] and (partial / "sketches" / "s2.parquet").exists()
    for every in (None, 1, 3):
        run = _drive(tmp_path / f"every{every}", rows, SHARDS, every=every)
        _assert_same(_numbers(run), ref)
        names = sorted(p.name for p in run.iterdir())
        assert names == [".lock", "manifest.json", "shards", "sketch-4.parquet"]
        assert run_files(run) == run_files(tmp_path / "everyNone")
    # a partially compacted run reads as the same run without compaction
    _assert_same(_numbers(partial), _numbers(_drive(tmp_path / "p2", rows, SHARDS[:3], None)))


def test_run_level_sketch_equals_bucket_counts_by_hand(tmp_path: Path) -> None:
    rows = _rows(seed=4)
    run = _drive(tmp_path / "run", rows, SHARDS, every=2)
    m = manifest_of(run)
    got = pq.read_table(run / m["sketch"]["file"]).to_pandas()
    expected = _sketch_by_hand(rows)
    pd.testing.assert_frame_equal(
        got.astype({"bucket": np.int64}), expected, check_exact=True, check_dtype=False
    )
    assert m["sketch"]["rows"] == len(expected) and m["sketch"]["shards"] == SHARDS
    for sid in SHARDS:  # the shards keep everything but the sketch
        kinds = pq.read_table(run / m["shards"][sid]["file"], columns=["kind"]).column("kind")
        assert "sketch" not in set(kinds.to_pylist())


class Killed(BaseException):
    """Stands for SIGKILL at one step of a compaction."""


def _kill(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Stop the next compaction after its run-level file is written but before the manifest
    commits it ("before-commit"), or after the commit before the merged files are deleted
    ("after-commit")."""
    name = {"before-commit": "file_sha256", "after-commit": "remove_unused"}[where]

    def boom(*args: object, **kwargs: object) -> None:
        raise Killed(where)

    monkeypatch.setattr(compaction, name, boom)


@pytest.mark.parametrize("where", ["before-commit", "after-commit"])
def test_run_killed_mid_compaction_resumes_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    rows = _rows(seed=2)
    ref = _drive(tmp_path / "ref", rows, SHARDS, every=None)
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        _kill(patch, where)
        with pytest.raises(Killed):
            _drive(run, rows, SHARDS, every=2)
    m = manifest_of(run)
    assert sorted(m["shards"]) == ["s0", "s1"] and not m["complete"]
    if where == "before-commit":  # a run-level file no manifest names; the sketch files stay
        assert "sketch" not in m and (run / "sketch-2.parquet").exists()
    else:  # committed; the merged sketch files not yet deleted (readers must skip them)
        assert m["sketch"]["shards"] == ["s0", "s1"]
        assert (run / "sketches" / "s0.parquet").exists()
    _assert_same(_numbers(run), _numbers(_drive(tmp_path / "two", rows, SHARDS[:2], None)))
    _drive(run, rows, SHARDS, every=2)  # resume
    assert run_files(run) == run_files(ref)
    assert manifest_of(run)["sketch"] == manifest_of(ref)["sketch"]
    _assert_same(_numbers(run), _numbers(ref))


def test_damaged_sketch_files_are_recomputed_on_resume(tmp_path: Path) -> None:
    rows = _rows(seed=3)
    ref = _drive(tmp_path / "ref", rows, SHARDS, every=None)
    run = _drive(tmp_path / "run", rows, SHARDS[:3], every=2)  # s0, s1 merged; s2 a file
    (run / "sketches" / "s2.parquet").write_bytes(b"damaged")
    with pytest.raises(ChecksumError, match=r"sketch of shard s2 .* --resume"):
        run_metric_aggregates(run, ["kl"])
    with ResultStore(run) as store:
        store.create(_config(), config_hash(_config()), META, resume=True)
        assert store.done_shards() == {"s0", "s1"}
    (run / "sketch-2.parquet").write_bytes(b"damaged too")  # loses s0's and s1's sketches
    _drive(run, rows, SHARDS, every=2)  # resume: all four recomputed
    assert run_files(run) == run_files(ref)
    # a shard damaged after its sketch was merged: recomputed, its sketch not counted twice
    (run / "shards" / "s1.parquet").write_bytes(b"damaged")
    _drive(run, rows, SHARDS, every=2)
    assert run_files(run) == run_files(ref) and "sketch" not in manifest_of(run)["shards"]["s1"]
    _assert_same(_numbers(run), _numbers(ref))


def test_run_with_the_sketch_inside_older_shards_reads_and_resumes(tmp_path: Path) -> None:
    """Shards written before sketch files (the sketch inside the shard) and after, in one run:
    the numbers of a run written all in the new layout."""
    rows = _rows(seed=5)
    ref = _drive(tmp_path / "ref", rows, SHARDS, every=None)
    run, cfg = tmp_path / "run", _config()
    with ResultStore(run) as store:
        store.create(cfg, config_hash(cfg), META, resume=False)
        for sid in SHARDS[:2]:
            store.write_shard(sid, aggregate_rows(_part(rows, sid), METRICS, META))
    _drive(run, rows, SHARDS, every=1)  # resumed: the other two with sketch files, compacted
    assert manifest_of(run)["sketch"]["shards"] == ["s2", "s3"]
    _assert_same(_numbers(run), _numbers(ref))


def test_real_run_compacted_at_any_schedule_or_stop_gives_the_same_files(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    shard_config: dict,
    aggregate_reference: Path,
) -> None:
    """The runner compacting every 2 shards, stopped in its first compaction (after the commit,
    before the deletions) and resumed: the files of the reference run (one compaction at the
    end), bit for bit."""
    import perturb_lens.workflows.experiment as runner

    cfg = {**shard_config, "results": "aggregate"}
    run_dir = tmp_path / "run"
    monkeypatch.setattr(runner, "COMPACT_EVERY", 2)
    with monkeypatch.context() as patch:
        _kill(patch, "after-commit")
        with pytest.raises(Killed):
            run_experiment(cfg, run_dir, progress=False)
    assert manifest_of(run_dir)["sketch"]["shards"] == ["s00000", "s00001"]
    run_experiment(cfg, run_dir, resume=True, progress=False)
    assert run_files(run_dir) == run_files(aggregate_reference)
    ref = aggregate_curves(run_metric_aggregates(aggregate_reference, ["kl"])["kl"])
    pd.testing.assert_frame_equal(
        aggregate_curves(run_metric_aggregates(run_dir, ["kl"])["kl"]), ref, check_exact=True
    )
