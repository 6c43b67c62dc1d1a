"""Task runners for the scale-out stages (pseudo-label, merge).

- `dask_address` given: `DaskTaskRunner(address=...)` on an existing `dask scheduler`, checked first: a scheduler
  that does not answer is an error naming the address; one with no workers is logged (an adaptive cluster starts
  them on demand), since its tasks wait until a worker joins.
- A real Prefect API (PREFECT_API_URL set, e.g. a deployment run): a local Dask cluster (2 workers x 1 thread).
- Prefect's ephemeral API (no server, the CLI's default): a thread pool. Never Dask there: every Dask worker
  process would start its own temporary Prefect server (docs/design.md §7.3).
- ``gpus`` given (a real Prefect API): a local cluster of one worker per GPU, each a process that sees only its
  GPU (``CUDA_VISIBLE_DEVICES``), so a labeler's models load once per GPU (`gpu_cluster`).
Worker environment: BLAS threads pinned to 1 and no `MALLOC_TRIM_THRESHOLD_` (docs/design.md §7.3). A local
cluster's nannies live in the flow process and write that environment into it for good (distributed does
`os.environ.update` before spawning a worker): run the stages under `restored_environ`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from addclass.common.errors import InputError

WORKER_ENV = {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1}


@contextmanager
def restored_environ() -> Iterator[None]:
    """Put back every environment variable a block changed, e.g. the OMP_NUM_THREADS=1 and PYTHONHASHSEED a
    local Dask cluster's nannies set in this process, which later subprocesses (data-loader workers) inherit."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def has_real_api() -> bool:
    from prefect.settings import PREFECT_API_URL

    return bool(os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value())


def gpu_worker_specs(gpus: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Dask worker specs: one nanny process per GPU, 1 thread, pinned by ``CUDA_VISIBLE_DEVICES`` (its "cuda"
    is that GPU), with the BLAS threads of `WORKER_ENV`."""
    from distributed import Nanny

    env = {k: str(v) for k, v in WORKER_ENV.items()}
    return {f"gpu{g}": {"cls": Nanny, "options": {"nthreads": 1, "env": {**env, "CUDA_VISIBLE_DEVICES": str(g)}}}
            for g in gpus}


def gpu_cluster(*, gpus: Sequence[int], asynchronous: bool = False) -> Any:
    """A local Dask cluster with one worker per GPU (`gpu_worker_specs`), no dashboard."""
    from distributed import Scheduler, SpecCluster

    return SpecCluster(workers=gpu_worker_specs(gpus), asynchronous=asynchronous,
                       scheduler={"cls": Scheduler, "options": {"dashboard_address": None}})


def scale_out_runner(dask_address: str | None = None, *, mode: str = "auto", workers: int = 2,
                     gpus: Sequence[int] | None = None) -> Any:
    """The task runner for the mapped stages (see module docstring); `mode` 'threads' or 'dask' forces one;
    ``gpus``: one local Dask worker per GPU."""
    if mode not in ("auto", "threads", "dask"):
        raise InputError(f"Expected scale_out 'auto', 'threads' or 'dask'. Got {mode!r} instead.")
    if gpus:
        if dask_address or mode == "threads" or not has_real_api():
            raise InputError(f"labeling.gpus {list(gpus)} starts a local Dask cluster of one worker per GPU: it needs "
                             f"a Prefect server (PREFECT_API_URL), scale_out 'auto' or 'dask' and no dask_address "
                             f"(on a cluster of your own, start one worker per GPU with CUDA_VISIBLE_DEVICES set).")
        import dask
        from prefect_dask import DaskTaskRunner

        dask.config.set({"distributed.logging.distributed": "warning"})
        return DaskTaskRunner(cluster_class=gpu_cluster, cluster_kwargs={"gpus": list(gpus)})  # type: ignore[arg-type]
    if mode == "dask" and not (dask_address or has_real_api()):
        raise InputError("scale_out='dask' needs a Prefect server (PREFECT_API_URL) or a dask_address: with the "
                         "ephemeral API every Dask worker would start its own temporary server.")
    if mode != "threads" and (dask_address or has_real_api()):
        import dask
        from prefect_dask import DaskTaskRunner

        dask.config.set({"distributed.nanny.pre-spawn-environ": WORKER_ENV,
                         "distributed.logging.distributed": "warning"})
        if dask_address:
            check_dask_scheduler(dask_address)
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                              "dashboard_address": None})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=workers)


def check_dask_scheduler(address: str) -> int:
    """Ask the scheduler at `address` who it is (within `distributed.comm.timeouts.connect`) and return its number
    of workers. No answer, or an answer from something other than a scheduler, is a ConnectionError naming the
    address; a scheduler with no workers is logged, not refused (adaptive clusters start workers on demand)."""
    import asyncio
    import logging
    from concurrent.futures import ThreadPoolExecutor

    import dask
    from distributed.comm import connect

    timeout = dask.config.get("distributed.comm.timeouts.connect")

    async def identity() -> dict[str, Any]:
        comm = await connect(address, timeout=timeout)
        try:
            await comm.write({"op": "identity", "reply": True})
            return dict(await comm.read())
        finally:
            await comm.close()

    try:
        with ThreadPoolExecutor(1) as pool:  # its own event loop, whatever the caller runs in
            info = pool.submit(asyncio.run, identity()).result()
    except (OSError, ValueError) as e:
        raise ConnectionError(f"No Dask scheduler answers at dask_address={address!r} (waited {timeout}): start one "
                              f"with `dask scheduler` and workers with `dask worker ADDRESS`, or leave dask_address "
                              f"unset for a local cluster. ({type(e).__name__}: {e})") from e
    if info.get("type") != "Scheduler":
        raise ConnectionError(f"dask_address={address!r} is a Dask {info.get('type')!r}, not the scheduler: pass the "
                              f"address `dask scheduler` printed.")
    n_workers = int(info.get("n_workers", len(info.get("workers", ()))))
    if n_workers == 0:
        logging.getLogger(__name__).warning("the Dask scheduler at %s has no workers yet: the mapped tasks wait "
                                            "until one joins (`dask worker %s`)", address, address)
    return n_workers
