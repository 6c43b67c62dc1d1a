"""Where a CPU training step of the demo's model goes, and what makes it faster.

One training step as the demo runs it: the tiny MaSSFormer with 8 classes (the 7 precise ones and car), a batch
of 2 crops of 256 x 256 from the synthetic scenes, the MaSSFormer criterion on ``--points`` points per mask with
inverse reweighting, AdamW. Three parts, in one process, one after the other (never beside another heavy job):

1. **profile**: ``--profile-steps`` steps under ``torch.profiler`` (CPU); the table of the operators with the
   most self CPU time, and the forward / loss / backward / optimiser split by wall time;
2. **side by side**: the mean step time of each variant over ``--steps`` steps (after ``--warmup``), in turns
   (round robin, so a change in the machine's load hits every variant alike): the default; ``channels_last``
   model and images; the loss on half the points; ``torch.compile`` of the model (its compile time is
   reported apart, next to the steps it would have to save);
3. JSON on stdout: per variant seconds per step and the ratio to the default measured in the same run.

    .venv/bin/python bench/profile_step.py                      # ~4 min on 2 cores
    .venv/bin/python bench/profile_step.py --steps 4 --no-compile
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from addclass.models.build import build_massformer_tiny
from addclass.models.training.criterion import build_criterion
from addclass.models.training.optim import build_optimizer
from addclass.models.training.targets import build_targets
from addclass.tasks.data.synthetic_scenes import make_scene

CAR = 7  # the new class's index in the demo's 8-class model


def batch(seed: int, crop: int = 256) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Two crops of synthetic scenes with their labels, car (the scene's car mask) as class 7."""
    images, targets = [], []
    for k in range(2):
        scene = make_scene(height=crop, width=crop + 128, seed=seed * 2 + k)
        labels = torch.from_numpy(scene.labels[:, :crop].astype("int64"))
        labels[torch.from_numpy(scene.car[:, :crop].astype(bool))] = CAR
        images.append(torch.from_numpy(scene.image[:, :crop].copy()).permute(2, 0, 1).float())  # 3 x H x W
        targets.append(build_targets(labels, pseudo_classes={CAR}))
    return torch.stack(images), targets


class Stepper:
    """A model, criterion and optimiser: ``step()`` runs one training step and returns its parts' times."""

    def __init__(self, *, points: int, channels_last: bool = False, compile_model: bool = False) -> None:
        torch.manual_seed(0)
        self.model = build_massformer_tiny(8).train()
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.criterion = build_criterion(num_classes=8, num_points=points)
        self.optimizer = build_optimizer(self.model, lr=1e-4)
        self.net: Callable[[torch.Tensor], Any] = torch.compile(self.model) if compile_model else self.model
        self.images, self.targets = batch(0)
        if channels_last:
            self.images = self.images.contiguous(memory_format=torch.channels_last)

    def step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        outputs = self.net(self.images)
        t1 = time.perf_counter()
        losses = self.criterion(outputs, self.targets)
        total = torch.stack(list(losses.values())).sum()
        t2 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        t3 = time.perf_counter()
        self.optimizer.step()
        t4 = time.perf_counter()
        return {"forward": t1 - t0, "loss": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3, "step": t4 - t0}


def profile(points: int, steps: int) -> dict[str, Any]:
    stepper = Stepper(points=points)
    for _ in range(2):
        stepper.step()
    parts: dict[str, float] = {}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            for k, v in stepper.step().items():
                parts[k] = parts.get(k, 0.0) + v / steps
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    total_self = sum(e.self_cpu_time_total for e in prof.key_averages())
    top = [{"op": e.key, "self_cpu_share": round(e.self_cpu_time_total / total_self, 3), "calls": e.count // steps}
           for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]]
    return {"parts_s": {k: round(v, 4) for k, v in parts.items()}, "top_ops": top, "table": table}


def side_by_side(points: int, steps: int, warmup: int, compile_model: bool) -> dict[str, Any]:
    variants = {"default": dict(points=points), "channels_last": dict(points=points, channels_last=True),
                "half_points": dict(points=points // 2)}
    compile_s = None
    if compile_model:
        variants["compile"] = dict(points=points, compile_model=True)
    steppers, errors = {}, {}
    for name, kw in variants.items():
        t = time.perf_counter()
        try:
            stepper = Stepper(**kw)  # type: ignore[arg-type]
            for _ in range(warmup):
                stepper.step()
        except Exception as e:  # a variant the model does not support is a result, not a crash
            errors[name] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        steppers[name] = stepper
        if name == "compile":
            compile_s = time.perf_counter() - t
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(steps):
        for name, s in steppers.items():
            times[name].append(s.step()["step"])
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    out: dict[str, Any] = {"seconds_per_step": {k: round(v, 4) for k, v in mean.items()},
           "ratio_to_default": {k: round(v / mean["default"], 3) for k, v in mean.items()}, "errors": errors}
    if compile_s is not None:
        saved = mean["default"] - mean["compile"]
        out["compile"] = {"compile_and_warmup_s": round(compile_s, 1),
                          "steps_to_pay_back": round(compile_s / saved) if saved > 0 else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=8192, help="points per mask (the demo's)")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out (it needs a C++ compiler)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prof = profile(a.points, a.profile_steps)
    print(prof.pop("table"), flush=True)
    result = {"threads": a.threads, "points": a.points, "cpus": os.cpu_count(), "torch": torch.__version__,
              "load_avg_start": list(os.getloadavg()), "profile": prof,
              "side_by_side": side_by_side(a.points, a.steps, a.warmup, not a.no_compile),
              "load_avg_end": list(os.getloadavg())}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
