"""The `addclass` sub-commands that run a flow: add-class, retrain (in-process or as a run of a deployment) and demo
(`cli.main.HANDLERS`; imports are lazy)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, cast

from addclass.cli.args import FLOW_GROUPS


# ---------------------------------------------------------------------------- flows: add-class, retrain, demo
def _absolute(path: str | None) -> str | None:
    """A path as the user meant it: a deployment's worker runs in another working directory."""
    return None if path is None else str(Path(path).expanduser().resolve())


# The flow sub-commands' flags (add-class, retrain) have destination PARAMETER, or GROUP.FIELD for a field of
# the flow's `labeling` / `training` / `review` parameter (generated: `cli.fields`).
FLOW_OPTIONAL_GROUPS = frozenset({"review"})  # None unless one of its flags is given
FLOW_CONTROL = frozenset({"command", "deployment", "deployment_name", "timeout", "flow_groups"})  # steer the command
FLOW_PATHS = frozenset({"store", "runs_dir", "labeling.sam_checkpoint", "labeling.dino_checkpoint", "review.out"})
FLOW_MODELS = frozenset({"init_model", "review.model"})  # a model folder (made absolute) or "champion"


def flow_params(a: argparse.Namespace) -> dict[str, Any]:
    """The parameters of the flow that sub-command `a.command` runs (add-class, retrain), from the parsed flags:
    each flag sets one top-level parameter or one field of `labeling` / `training` / `review`, which are built
    here from the fields the user set (the models' own defaults fill the rest). Paths go out absolute: a
    deployment's worker runs in another working directory."""
    from addclass.flows.params import parse_params

    params: dict[str, Any] = {}
    fields: dict[str, dict[str, Any]] = {group: {} for group in a.flow_groups}
    for dest, value in vars(a).items():
        if dest in FLOW_CONTROL:
            continue
        if dest in FLOW_PATHS or (dest in FLOW_MODELS and value != "champion"):
            value = _absolute(value)
        if isinstance(value, list | tuple):
            value = list(value)  # JSON; and not argparse's shared default list
        group, _, name = dest.rpartition(".")
        (fields[group] if group else params)[name] = value
    for group, values in fields.items():
        if group in FLOW_OPTIONAL_GROUPS and not values:
            params[group] = None
        else:
            params[group] = parse_params(FLOW_GROUPS[group], values, group)
    return params


def _json_params(params: dict[str, Any]) -> dict[str, Any]:
    """A deployment run's parameters: the parameter objects as JSON objects, unset top-level ones left out."""
    from pydantic import BaseModel

    return {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v
            for k, v in params.items() if v is not None}


def _run_deployment(name: str, params: dict[str, Any], timeout: float | None) -> int:
    """Submit a run of deployment `name`, say so at once (with its id), then follow it to its final state."""
    import asyncio

    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.exceptions import FlowRunWaitTimeout
    from prefect.flow_runs import wait_for_flow_run

    # timeout=0: create the run and return; from sync code this is the FlowRun (the type also admits a coroutine)
    run = cast(FlowRun, run_deployment(name, parameters=params, timeout=0))
    print(f"submitted flow run {run.name} ({run.id}) of {name}; waiting for it (a worker of the deployment's "
          f"work pool must be running: `prefect worker start --pool POOL`; Ctrl-C stops waiting, not the run)",
          flush=True)
    try:
        run = asyncio.run(wait_for_flow_run(run.id, timeout=None if timeout is None else int(timeout)))
    except FlowRunWaitTimeout:
        print(f"flow run {run.name} ({run.id}) has not finished after {timeout:.0f} s; it goes on on the server "
              f"(`prefect flow-run inspect {run.id}`)")
        return 1
    state = run.state
    print(f"flow run {run.name} ({run.id}): {state.type.value if state else 'unknown'}")
    return 0 if state is not None and state.is_completed() else 1


def cmd_add_class(a: argparse.Namespace) -> int:
    params = flow_params(a)
    if a.deployment:
        return _run_deployment(a.deployment_name, _json_params(params), a.timeout)
    from addclass.flows.add_class import add_class, plan_add_class
    from addclass.flows.runners import has_real_api

    plan_add_class(params)  # a bad parameter is one line now, before Prefect starts its API (~30 s)
    if a.dask_address is None and not has_real_api():
        print("running in-process (Prefect ephemeral API, thread pool); --deployment submits to a server")
    out = add_class(**params)
    keys = ("class", "version", "review") if out.get("waiting_for_review") else (
        "class", "version", "checkpoint", "report", "registry")
    print(json.dumps({k: out[k] for k in keys}, indent=2, default=str))
    if out.get("waiting_for_review"):
        from addclass.tasks.labels.review import review_steps

        print("waiting for the review: " + " ".join(review_steps(a.store, out["review"], params["review"].format)))
    return 0


def cmd_retrain(a: argparse.Namespace) -> int:
    params = flow_params(a)
    if a.deployment:
        return _run_deployment(a.deployment_name, _json_params(params), a.timeout)
    from addclass.flows.retrain import retrain

    out = retrain(**params)
    print(json.dumps({k: out[k] for k in ("checkpoint", "report", "registry")}, indent=2, default=str))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from addclass.flows.demo import run_demo
    from addclass.tasks.demo import DemoConfig

    base = None if a.base_model in (None, "none") else a.base_model
    result = run_demo(DemoConfig(out=a.out, images=a.images, size=(a.size[0], a.size[1]), base_model=base,
                                 iters=a.iters, lr=a.lr,
                                 crop=a.crop, points=a.points, test_scale=a.test_scale,
                                 test_ratios=tuple(a.test_ratios), val_every=a.val_every,
                                 seed=a.seed, progress=not a.quiet))
    print(f"\ndemo finished in {result['seconds']:.0f} s ({os.environ.get('ADDCLASS_THREADS', 'threads: default')})")
    print(f"label store: {result['store']}  (addclass inspect {result['store']})")
    print(f"model:       {result['checkpoint']}")
    print(f"report:      {result['report']['report.md']}\n")
    print("\n".join(result["comparison"]["lines"]))
    return 0
