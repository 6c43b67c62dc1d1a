"""The scale-out runner's check of an external Dask scheduler (in-process clusters, no Prefect API needed)."""

from __future__ import annotations

import logging
import os

import dask
import distributed
import pytest

from addclass.flows.params import LabelingParams, labeler_config
from addclass.flows.runners import check_dask_scheduler, gpu_cluster, restored_environ, scale_out_runner
from tests.flows.prefect_server import free_port


def test_counts_the_workers_of_a_scheduler(caplog: pytest.LogCaptureFixture) -> None:
    with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        with caplog.at_level(logging.WARNING, logger="addclass.flows.runners"):
            assert check_dask_scheduler(cluster.scheduler_address) == 0
        assert "has no workers yet" in caplog.text  # logged, not refused: adaptive clusters start them on demand
        cluster.scale(2)
        cluster.wait_for_workers(2, timeout=30)
        assert check_dask_scheduler(cluster.scheduler_address) == 2
        worker = next(iter(cluster.scheduler.workers))
        with pytest.raises(ConnectionError, match="is a Dask 'Worker', not the scheduler"):
            check_dask_scheduler(worker)


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:{port}", "nonsense://{port}"])
def test_a_scheduler_that_does_not_answer_names_the_address(address: str) -> None:
    address = address.format(port=free_port())
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(ConnectionError, match=f"No Dask scheduler answers at dask_address='{address}'"):
            check_dask_scheduler(address)



def test_one_dask_worker_per_gpu_sees_only_its_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """`labeling.gpus`: each worker process is pinned with CUDA_VISIBLE_DEVICES (checked in the workers; no GPU
    is needed to see the pinning), and the runner refuses setups where it cannot start that cluster."""
    environ = dict(os.environ)
    with restored_environ(), gpu_cluster(gpus=[0, 1]) as cluster, distributed.Client(cluster) as client:
        seen = client.run(lambda: (os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("OMP_NUM_THREADS")))
        nthreads = client.nthreads()
    assert sorted(seen.values()) == [("0", "1"), ("1", "1")]
    assert list(nthreads.values()) == [1, 1]
    assert dict(os.environ) == environ  # the nannies' environment did not stay here (the add-class flow does the same)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr("addclass.flows.runners.has_real_api", lambda: False)
    with pytest.raises(ValueError, match=r"labeling.gpus \[0, 1\] .* needs a Prefect server"):
        scale_out_runner(gpus=[0, 1])
    monkeypatch.setattr("addclass.flows.runners.has_real_api", lambda: True)
    with pytest.raises(ValueError, match="no dask_address"):
        scale_out_runner("tcp://127.0.0.1:8786", gpus=[0])
    runner = scale_out_runner(gpus=[2, 3])
    assert runner.cluster_kwargs == {"gpus": [2, 3]}


def test_labeling_gpus_need_a_cuda_device() -> None:
    with pytest.raises(ValueError, match=r"labeling.gpus.*device 'cpu'"):
        labeler_config(LabelingParams(gpus=[0]), device="cpu", seed=0)
    assert labeler_config(LabelingParams(gpus=[3]), device="cuda:1", seed=0).device == "cuda"
