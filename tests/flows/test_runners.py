"""The scale-out runner's check of an external Dask scheduler (in-process clusters, no Prefect API needed)."""

from __future__ import annotations

import logging

import dask
import distributed
import pytest

from flows.runners import check_dask_scheduler
from tests.flows.prefect_server import free_port


def test_counts_the_workers_of_a_scheduler(caplog: pytest.LogCaptureFixture) -> None:
    with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        with caplog.at_level(logging.WARNING, logger="flows.runners"):
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

