"""The Ray executor on a local cluster (2 worker CPUs): bit-identical to the local executor, a
worker killed mid-shard is retried, a killed driver's run completes with resume, identically."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_in_subprocess, shard_hashes

from perturb_lens.engine.run import compute_shard, run_experiment
from perturb_lens.results import load_manifest, load_results

ray = pytest.importorskip(
    "ray", reason="the Ray executor tests need Ray: pip install 'perturb-lens[ray]'"
)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> str:
    """A local Ray cluster with 2 CPUs (2 workers); its address."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # crash_once, for workers
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def assert_identical(run_dir: Path, reference: Path) -> None:
    """Bit-identical: the same shard files (sha256) and so the same rows."""
    assert load_manifest(run_dir)["complete"] and len(shard_hashes(reference)) == 4
    assert shard_hashes(run_dir) == shard_hashes(reference)
    pd.testing.assert_frame_equal(load_results(run_dir), load_results(reference))


def crash_once(ctx, shard_id: str, *, victim: str, marker: str) -> pd.DataFrame:
    """compute_shard, but the worker process dies after computing ``victim`` the first time."""
    rows = compute_shard(ctx, shard_id)
    if shard_id == victim and not Path(marker).exists():
        Path(marker).write_text(str(os.getpid()))
        os._exit(1)  # real process death, mid-task, the result never sent
    return rows


def test_local_and_ray_are_bit_identical(
    cluster: str, tmp_path: Path, shard_config: dict, shard_reference: Path
) -> None:
    run_dir = run_experiment(shard_config, tmp_path / "run", progress=False, executor="ray")
    assert_identical(run_dir, shard_reference)


def test_worker_killed_mid_shard_is_retried(
    cluster: str, tmp_path: Path, shard_config: dict, shard_reference: Path
) -> None:
    marker = tmp_path / "crashed"
    shard_fn = functools.partial(crash_once, victim="s00002", marker=str(marker))
    run_dir = run_experiment(
        shard_config, tmp_path / "run", progress=False, executor="ray", shard_fn=shard_fn
    )
    assert marker.exists()  # a worker died computing s00002 ...
    assert_identical(run_dir, shard_reference)  # ... and the shard was computed again, identically


def test_driver_killed_resumes_identically(
    cluster: str, tmp_path: Path, shard_config: dict, shard_reference: Path
) -> None:
    run_dir = tmp_path / "run"
    run_in_subprocess(
        shard_config, run_dir, kill_after_first_shard=True, executor="ray", address=cluster
    )
    partial = load_manifest(run_dir)
    assert 1 <= len(partial["shards"]) < 4 and not partial["complete"]
    run_experiment(shard_config, run_dir, resume=True, progress=False, executor="ray")
    assert_identical(run_dir, shard_reference)
