"""Task runners for the scale-out stages (pseudo-label, merge).

- `dask_address` given: `DaskTaskRunner(address=...)` on an existing `dask scheduler`.
- A real Prefect API (PREFECT_API_URL set, e.g. a deployment run): a local Dask cluster (2 workers x 1 thread).
- Prefect's ephemeral API (no server, the CLI's default): a thread pool. Never Dask there: every Dask worker
  process would start its own temporary Prefect server (orchestration.md §6).
Worker environment: BLAS threads pinned to 1 and no `MALLOC_TRIM_THRESHOLD_` (orchestration.md §9).
"""

from __future__ import annotations

import os
from typing import Any

WORKER_ENV = {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1}


def has_real_api() -> bool:
    from prefect.settings import PREFECT_API_URL

    return bool(os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value())


def scale_out_runner(dask_address: str | None = None, *, mode: str = "auto", workers: int = 2) -> Any:
    """The task runner for the mapped stages (see module docstring); `mode` 'threads' or 'dask' forces one."""
    if mode not in ("auto", "threads", "dask"):
        raise ValueError(f"Expected scale_out 'auto', 'threads' or 'dask'. Got {mode!r} instead.")
    if mode == "dask" and not (dask_address or has_real_api()):
        raise ValueError("scale_out='dask' needs a Prefect server (PREFECT_API_URL) or a dask_address: with the "
                         "ephemeral API every Dask worker would start its own temporary server.")
    if mode != "threads" and (dask_address or has_real_api()):
        import dask
        from prefect_dask import DaskTaskRunner

        dask.config.set({"distributed.nanny.pre-spawn-environ": WORKER_ENV,
                         "distributed.logging.distributed": "warning"})
        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                              "dashboard_address": None})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=workers)
