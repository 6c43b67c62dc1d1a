"""Training speed on an idle and on a shared machine, with torch's OpenMP threads spinning or waiting passively.

Each case times ``--steps`` training steps of the tiny MaSSFormer (batch 2, 256 x 256 random images with a
few rectangles as labels, 2048 points, AdamW) in a fresh process with ``--threads`` torch threads, while ``--load``
busy-looping processes compete for the cores (0 = idle). Cases: OpenMP's default (threads spin a while before
they sleep: the anchor, idle) and ``OMP_WAIT_POLICY=PASSIVE`` (what the ``addclass`` command sets unless you
chose a policy on a busy machine) and what the ``addclass`` command decides itself (``addclass_*``: the
policy `addclass.cli.main.passive_threads` picks, measured with the load already running), each idle and
loaded. Prints one JSON object: seconds per step per case and its ratio to the
idle default, measured in the same run.

    .venv/bin/python bench/threads_under_load.py            # ~3 min on 2 cores
    .venv/bin/python bench/threads_under_load.py --load 4 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

STEPS = """
import json, os, sys, time
decision = os.environ.get("OMP_WAIT_POLICY", "OpenMP default")
if {policy}:  # what the addclass command decides, before torch loads OpenMP
    from addclass.cli.main import passive_threads
    decision = passive_threads()
import torch
from addclass.models.build import build_massformer_tiny
from addclass.models.training.criterion import build_criterion
from addclass.models.training.optim import build_optimizer
from addclass.models.training.targets import build_targets
torch.manual_seed(0)
torch.set_num_threads({threads})
model = build_massformer_tiny(8).train()
criterion = build_criterion(num_classes=8, num_points=2048)
optimizer = build_optimizer(model, lr=1e-3)
images = torch.rand(2, 3, 256, 256) * 255
labels = torch.zeros(2, 256, 256, dtype=torch.long)
labels[:, 100:180, 40:200] = 7
labels[:, :90] = 5
labels[:, 200:] = 4
targets = [build_targets(lab, pseudo_classes={{7}}) for lab in labels]
times = []
for step in range({warmup} + {steps}):
    t = time.perf_counter()
    losses = criterion(model(images), targets)
    optimizer.zero_grad()
    torch.stack(list(losses.values())).sum().backward()
    optimizer.step()
    times.append(time.perf_counter() - t)
print(json.dumps({{"seconds": sum(times[{warmup}:]) / {steps}, "decision": decision}}))
"""


def seconds_per_step(*, passive: bool, load: int, threads: int, steps: int, warmup: int,
                     policy: bool = False) -> dict:
    """Seconds per step and the wait policy in force (``policy``: the one `addclass.cli.main.passive_threads`
    picks with the load running)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
    try:
        code = STEPS.format(threads=threads, steps=steps, warmup=warmup, policy=policy)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--load", type=int, default=os.cpu_count() or 1, help="busy processes in the loaded cases")
    a = ap.parse_args()
    cases = {}
    for load in (0, a.load):
        where = "idle" if load == 0 else f"load{load}"
        for mode in ("default", "passive", "addclass"):
            cases[f"{mode}_{where}"] = seconds_per_step(passive=mode == "passive", policy=mode == "addclass",
                                                        load=load, threads=a.threads, steps=a.steps,
                                                        warmup=a.warmup)
    anchor = cases["default_idle"]["seconds"]
    print(json.dumps({
        "threads": a.threads, "load": a.load, "steps": a.steps, "cpus": os.cpu_count(),
        "seconds_per_step": {k: round(v["seconds"], 3) for k, v in cases.items()},
        "ratio_to_default_idle": {k: round(v["seconds"] / anchor, 2) for k, v in cases.items()},
        "addclass_decision": {k: v["decision"] for k, v in cases.items() if k.startswith("addclass")},
    }))


if __name__ == "__main__":
    main()
