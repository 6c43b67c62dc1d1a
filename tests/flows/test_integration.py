"""End to end against a real Prefect server on 127.0.0.1 (deploy, worker, run), an external Dask cluster, and a
kill -9 in the middle of pseudo-labelling. One server for the module (~15-20 s to start)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from addclass.flows.runners import check_dask_scheduler
from addclass.storage.pseudo import missing_pseudo
from addclass.storage.store import open_label_store
from addclass.tasks.data.ingest import ingest_synthetic
from tests.crash import die_after_writes
from tests.flows.prefect_server import BIN, REPO, free_port, run, stop

pytestmark = pytest.mark.integration

# add-class's parameters as JSON (a deployment run's `--param`s, the subprocesses' keyword arguments)
TINY = {"labeling": {"kind": "simulated"}, "eval_splits": ["test"],
        "training": {"variant": "tiny", "iters": 4, "crop_size": 128, "num_points": 256, "num_workers": 0}}
TINY_BY_IMAGE = {**TINY, "labeling": {"kind": "simulated", "batch_size": 1}}  # one labelling task per image


@pytest.fixture
def server(deployment_run: dict[str, Any]) -> dict[str, str]:
    """The session's server (tests/flows/conftest.py), after its add-class deployment run."""
    return dict(deployment_run["env"])


def _store(tmp: Path, name: str, images: int = 6) -> Path:
    return ingest_synthetic(tmp / f"{name}.zarr", images=images, size=(64, 96), seed=11, progress=False)


def test_deployment_run_add_class(deployment_run: dict[str, Any]) -> None:
    """The add-class deployment, run by a worker (the session's run): completed, artifacts published, the store
    holds the new class's version and the registered champion with its report."""
    assert deployment_run["flow_run"]["state"]["type"] == "COMPLETED", deployment_run["flow_run"]["state"]
    assert {"add-class-car-metrics", "add-class-car-report"} <= set(deployment_run["artifacts"])
    store = deployment_run["store"]
    st = open_label_store(store)
    assert st.resolve_version("latest") == "v2" and st.class_by_name("car").source == "pseudo"
    models = st.section("models")
    assert models["champion"] in models["models"]
    assert Path(models["models"][models["champion"]]["path"]).exists()
    assert "Pseudo Label" in (Path(f"{store}.runs") / models["champion"] / "report" / "report.md").read_text()


def test_missing_prompt_is_rejected_by_the_server(server: dict[str, str]) -> None:
    prefect = str(BIN / "prefect")
    # the pool and the deployments exist: the session's deployment run made them (tests/flows/conftest.py)
    out = run([prefect, "deployment", "run", "add-class/add-class"], server, check=False)
    assert "prompt" in out and "required" in out


def test_cli_deployment_run_names_the_run_at_once_and_does_not_wait_forever(server: dict[str, str],
                                                                            tmp_path: Path) -> None:
    store = _store(tmp_path, "nowork", images=3)
    # the pool and the deployments exist: the session's deployment run made them (tests/flows/conftest.py)
    t0 = time.monotonic()
    out = run([str(BIN / "addclass"), "add-class", "--prompt", "car", "--store", str(store), "--labeler",
               "simulated", "--deployment", "--timeout", "5"], server, check=False)  # no worker polls the pool
    assert time.monotonic() - t0 < 120
    assert "submitted flow run" in out and "has not finished after 5 s" in out, out
    flow_run_id = next(w.strip("()") for w in out.split() if len(w.strip("()")) == 36 and w.count("-") == 4)
    run([sys.executable, "-c", (  # no scheduled run may be left for a later test's worker
        "import asyncio, sys\n"
        "from prefect.client.orchestration import get_client\n"
        "async def main():\n"
        "    async with get_client() as c:\n"
        "        await c.delete_flow_run(sys.argv[1])\n"
        "asyncio.run(main())\n"), flow_run_id], server)


def test_external_dask_cluster_scales_the_mapped_stages(server: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in ("scheduler", "workers")}
    cluster_env = {**server, "DASK_DISTRIBUTED__LOGGING__DISTRIBUTED": "info"}  # their logs explain a timeout
    sched = subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                              "--no-dashboard"], env=cluster_env, cwd=REPO, stdout=logs["scheduler"],
                             stderr=subprocess.STDOUT, start_new_session=True)
    workers = subprocess.Popen([str(BIN / "dask"), "worker", f"tcp://127.0.0.1:{port}", "--nworkers", "2",
                                "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"], env=cluster_env,
                               cwd=REPO, stdout=logs["workers"], stderr=subprocess.STDOUT, start_new_session=True)

    def tails() -> str:
        return "".join(f"\n{n} log:\n{(tmp_path / f'{n}.log').read_text(errors='replace')[-4000:]}" for n in logs)

    try:
        deadline = time.monotonic() + 180  # the cluster is up (both workers joined) before the flow starts
        while _workers(f"tcp://127.0.0.1:{port}") < 2:
            assert time.monotonic() < deadline and workers.poll() is None, f"the Dask workers did not start{tails()}"
            time.sleep(1)
        store = _store(tmp_path, "dask")
        script = (
            "import json, sys\n"
            "from addclass.flows.add_class import add_class\n"
            "out = add_class(prompt='car', store=sys.argv[1], dask_address=sys.argv[2],\n"
            "                **json.loads(sys.argv[3]))\n"
            "import os\n"
            "print('RESULT', json.dumps({'pseudo': out['pseudo'], 'pid': os.getpid()}))\n"
        )
        try:
            out = run([sys.executable, "-c", script, str(store), f"tcp://127.0.0.1:{port}",
                       json.dumps(TINY_BY_IMAGE)],
                      server, timeout=300)
        except subprocess.TimeoutExpired as e:  # show what the cluster did, not only that the flow waited
            flow_log = (e.stderr or b"")[-4000:]
            raise AssertionError(f"the flow timed out\nflow stderr:\n{flow_log!r}{tails()}") from e
        result = json.loads(out.split("RESULT", 1)[1].strip().splitlines()[0])
        assert [p["split"] for p in result["pseudo"]] == ["train", "val"]
        pids = {pid for p in result["pseudo"] for pid in p["worker_pids"]}
        assert pids and result["pid"] not in pids  # the batches ran in the Dask worker processes
        assert open_label_store(store).resolve_version("latest") == "v2"
    finally:
        stop(workers)
        stop(sched)
        for f in logs.values():
            f.close()


def _workers(address: str) -> int:
    try:
        return check_dask_scheduler(address)
    except ConnectionError:
        return 0  # the scheduler is not listening yet


_CRASH = die_after_writes("addclass.tasks.labels.pseudo_label", "write_pseudo_result", 2) + """
import sys, json
from addclass.flows.add_class import add_class
add_class(prompt="car", store=sys.argv[1], scale_out="threads", **json.loads(sys.argv[2]))
"""


def test_kill_9_mid_pseudo_label_then_rerun_completes(server: dict[str, str], tmp_path: Path) -> None:
    store = _store(tmp_path, "crash", images=8)
    proc = subprocess.Popen([sys.executable, "-c", _CRASH, str(store), json.dumps(TINY_BY_IMAGE)], env=server,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(300)
    finally:
        stop(proc)
    assert proc.returncode == -9
    st = open_label_store(store)
    n_train = len(st.image_ids("train"))
    assert len(missing_pseudo(st, "car", "train")) == n_train - 2
    assert list(st.versions()) == ["v1"]
    time.sleep(0.5)  # the killed flow's lock is released by the kernel
    script = (
        "import json, sys\n"
        "from addclass.flows.add_class import add_class\n"
        "out = add_class(prompt='car', store=sys.argv[1], scale_out='threads', **json.loads(sys.argv[2]))\n"
        "print('RESULT', json.dumps(out['pseudo']))\n"
    )
    out = run([sys.executable, "-c", script, str(store), json.dumps(TINY_BY_IMAGE)], server, timeout=600)
    pseudo = json.loads(out.split("RESULT", 1)[1].strip().splitlines()[0])
    train = next(p for p in pseudo if p["split"] == "train")
    assert train["already_done"] == 2  # no image labelled twice
    assert open_label_store(store).resolve_version("latest") == "v2"


def test_second_add_class_on_a_locked_store_fails_clearly(server: dict[str, str], tmp_path: Path) -> None:
    store = _store(tmp_path, "locked")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom addclass.storage.lock import store_lock\n"
        "with store_lock(sys.argv[1], purpose='add-class busy'):\n    print('ready', flush=True)\n    time.sleep(120)\n"),
        str(store)], cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        out = run([str(BIN / "addclass"), "add-class", "--prompt", "car", "--store", str(store), "--labeler",
                   "simulated", "--iters", "2"], server, check=False, timeout=300)
        assert "is locked by pid" in out and "add-class busy" in out
    finally:
        stop(holder)
