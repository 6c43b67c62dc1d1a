"""One real Prefect server (web UI on) for the integration and browser tests, with the add-class deployment run
to completion by a worker on a tiny store: both files check that one run (the API's view and the UI's), so the
server start and the run are paid once per session."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from addclass.tasks.data.ingest import ingest_synthetic
from tests.flows.prefect_server import BIN, prefect_server, run

# add-class's parameters as JSON (`--param`s); 20 steps, so the progress artifact is created early and updated
# to 100 % at the end
DEPLOYMENT_RUN = {"labeling": {"kind": "simulated"}, "eval_splits": ["test"],
                  "training": {"variant": "tiny", "iters": 20, "crop_size": 128, "num_points": 256,
                               "num_workers": 0}}


def api(env: dict[str, str], path: str, body: dict[str, Any] | None = None) -> Any:
    """A JSON call to the server's REST API (POST when ``body`` is given)."""
    url = env["PREFECT_API_URL"] + path
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="session")
def deployment_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The server (``env``) and its finished add-class deployment run: ``flow_run``, ``task_runs``, ``store``
    and the ``artifacts`` by key, read right after the run (later tests add runs of their own)."""
    home = tmp_path_factory.mktemp("prefect_home")
    with prefect_server(home, ui=True) as env:
        store = ingest_synthetic(home / "dep.zarr", images=6, size=(64, 96), seed=11, progress=False)
        prefect = str(BIN / "prefect")
        run([prefect, "work-pool", "create", "local", "--type", "process", "--overwrite"], env)
        run([prefect, "--no-prompt", "deploy", "--all"], env)
        params = ["--param", "prompt=car", "--param", f"store={store}"]
        for k, v in DEPLOYMENT_RUN.items():
            params += ["--param", f"{k}={json.dumps(v)}"]  # e.g. training='{"iters": 20, ...}'
        out = run([prefect, "deployment", "run", "add-class/add-class", *params], env)
        flow_run_id = next(w for w in out.split() if len(w) == 36 and w.count("-") == 4)
        run([prefect, "worker", "start", "--pool", "local", "--run-once"], env, timeout=600)
        flow_run = api(env, f"/flow_runs/{flow_run_id}")
        task_runs = api(env, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
        artifacts = api(env, "/artifacts/filter", {})
        yield {"env": env, "base": env["PREFECT_API_URL"].removesuffix("/api"), "flow_run": flow_run,
               "task_runs": task_runs, "artifacts": {a["key"]: a for a in artifacts if a["key"]}, "store": store}
