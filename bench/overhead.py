"""Prefect (+ Dask) overhead as a share of the demo's wall time.

Runs the demo pipeline (synthetic store -> simulated pseudo labels -> merge -> tiny MaSSFormer -> evaluate)
three ways on fresh copies of the same store, and prints JSON:
- `plain`: the task functions called directly (the anchor: no orchestration at all);
- `flow`: the add-class flow in-process (Prefect ephemeral API + thread pool: what `addclass demo` does);
- `flow_dask` (with --server): the flow against a real local Prefect server, mapped stages on a local Dask
  cluster (2 workers), as a deployment run would.
overhead share = (orchestrated - plain) / orchestrated.
Run: .venv/bin/python bench/overhead.py [--iters 300] [--images 12] [--server]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Both modes pin torch to the same thread count (the anchor must not differ in its thread pool).
_COMMON = ("import sys, json, time\nargs = json.loads(sys.argv[1])\n"
           "import torch\ntorch.set_num_threads(args['threads'])\n")
PLAIN = _COMMON + """
from addclass.tasks.labels.pseudo_label import LabelerConfig, pseudo_label
from addclass.tasks.labels.merge import merge
from addclass.tasks.training.train import TrainConfig, train
from addclass.tasks.evaluation.evaluate import evaluate_model, evaluate_pseudo
from addclass.tasks.evaluation.evaluation_report import write_evaluation_report
t = time.perf_counter()
s = args["store"]
for split in ("train", "val"):
    pseudo_label(s, prompt="car", split=split, labeler=LabelerConfig(kind="simulated"), progress=False)
v = merge(s, classes="car", allow_partial=True, progress=False)
out = args["runs"] + "/plain"
ckpt = train(TrainConfig(store=s, out_dir=out, version=v, variant="tiny", iters=args["iters"], batch_size=2,
             crop_size=(256, 256), num_points=2048, num_workers=0, device="cpu",
             checkpoint_every=100), progress=False)  # as the flow's default (flows.params.TrainingParams)
m = evaluate_model(s, ckpt, splits=("val", "test"), progress=False)
write_evaluation_report(out + "/report", model_results=m, pseudo_results=evaluate_pseudo(s))
print("SECONDS", time.perf_counter() - t)
"""
FLOW = _COMMON + """
t0 = time.perf_counter()
from addclass.flows.add_class import add_class
from addclass.flows.params import LabelingParams, TrainingParams
t = time.perf_counter()
add_class(prompt="car", store=args["store"], labeling=LabelingParams(kind="simulated"),
          training=TrainingParams(variant="tiny", iters=args["iters"], batch_size=2, crop_size=256,
                                  num_points=2048, num_workers=0),
          eval_splits=["val", "test"], runs_dir=args["runs"], scale_out=args["scale_out"])
print("SECONDS", time.perf_counter() - t)
"""


def _run(script: str, args: dict, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds of the subprocess, seconds the script itself measured)."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", script, json.dumps(args)], cwd=REPO, env=env, capture_output=True,
                       text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(p.stdout[-2000:] + p.stderr[-4000:])
    inner = float(p.stdout.rsplit("SECONDS", 1)[1].split()[0])
    return round(wall, 2), round(inner, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--server", action="store_true", help="also run against a real server with Dask")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, the same in every mode")
    a = ap.parse_args()
    from addclass.tasks.data.ingest import ingest_synthetic

    tmp = Path(tempfile.mkdtemp(prefix="overhead-"))
    base = ingest_synthetic(tmp / "base.zarr", images=a.images, size=(256, 384), seed=0, progress=False)
    threads_env = {"OMP_NUM_THREADS": str(a.threads), "OMP_WAIT_POLICY": "PASSIVE"}  # every mode alike
    env = {**os.environ, **threads_env, "PREFECT_HOME": str(tmp / "prefect"), "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    env.pop("PREFECT_API_URL", None)
    results = {}
    try:
        for mode in ["plain", "flow"] + (["flow_dask"] if a.server else []):
            store = tmp / f"{mode}.zarr"
            shutil.copytree(base, store)
            args = {"store": str(store), "runs": str(tmp / f"{mode}.runs"), "iters": a.iters, "threads": a.threads,
                    "scale_out": "dask" if mode == "flow_dask" else "threads"}
            if mode == "flow_dask":
                from tests.flows.prefect_server import prefect_server

                (tmp / "server").mkdir()
                with prefect_server(tmp / "server") as server_env:
                    results[mode] = _run(FLOW, args, {**server_env, **threads_env})
            else:
                results[mode] = _run(PLAIN if mode == "plain" else FLOW, args, env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    plain_wall = results["plain"][0]
    report = {"iters": a.iters, "images": a.images, "threads": a.threads,
              "plain_s": {"process": results["plain"][0], "pipeline": results["plain"][1]}}
    for mode in results:
        if mode == "plain":
            continue
        wall, inner = results[mode]
        report[f"{mode}_s"] = {"process": wall, "flow_call": inner}
        report[f"{mode}_overhead_share_process"] = round((wall - plain_wall) / wall, 4)
        report[f"{mode}_overhead_share_flow_call"] = round((inner - results["plain"][1]) / inner, 4)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
