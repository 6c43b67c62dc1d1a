"""The measurements that chose the scratch recipe: one training run per named setting, scored on val and test.

Each setting trains the tiny MaSSFormer from random weights on the demo's data (40 synthetic 256 x 384 scenes,
simulated Grounded-SAM car labels merged with carve-others: label version v2) and scores car IoU / BIoU
(class vs rest, against the exact masks) and the 7-class mIoU at inference scales 1 and 2 (`--test-scales`).
Settings are chosen on **val**; test is reported alongside. `SETTINGS` lists the ones in docs/recipes.md; ``--only`` runs a subset, ``--set KEY=VALUE`` adds an ad-hoc one. Prints one JSON line per run and
writes them to ``--out``/results.jsonl. One run of 600 steps takes ~3.5 min on 2 idle cores.

Example::

    .venv/bin/python bench/recipe_search.py --only paper_300,scratch_600   # ~6 min
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/camvid_newclass.py

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

from addclass.tasks.data.ingest import ingest_synthetic  # noqa: E402
from addclass.tasks.evaluation.evaluate import evaluate_model  # noqa: E402
from addclass.tasks.labels.merge import merge  # noqa: E402
from addclass.tasks.labels.pseudo_label import LabelerConfig, pseudo_label  # noqa: E402
from addclass.tasks.model_files.model_folder import load_trained_model  # noqa: E402
from addclass.tasks.training.train import TrainConfig, train  # noqa: E402

DEFAULT_OUT = REPO / "runs" / "recipe_search"
BASE: dict[str, Any] = dict(variant="tiny", batch_size=2, crop_size=(256, 256), num_points=2048, reweight="inverse",
                            num_workers=0, device="cpu", seed=0, val_every=0)
SCRATCH = dict(recipe="scratch", lr=2e-3, backbone_lr_mult=1.0, grad_clip=1.0, ema_decay=0.0)
EMA = dict(SCRATCH, ema_decay=0.99, iters=600, warmup_iters=60, scale_range=(0.75, 1.5))
SETTINGS: dict[str, dict[str, Any]] = {
    "paper_300": dict(recipe="paper", iters=300, scale_range=(0.5, 2.0)),
    "lr1e-3_noclip_300": dict(recipe="scratch", lr=1e-3, backbone_lr_mult=1.0, grad_clip=0.0, iters=300,
                              warmup_iters=30, scale_range=(0.5, 2.0)),
    "lr2e-3_300": dict(SCRATCH, iters=300, warmup_iters=30, scale_range=(0.5, 2.0)),
    "lr2e-3_scale0.75-1.5_300": dict(SCRATCH, iters=300, warmup_iters=30, scale_range=(0.75, 1.5)),
    "points8192_300": dict(SCRATCH, iters=300, warmup_iters=30, scale_range=(0.75, 1.5), num_points=8192),
    "edge_300": dict(SCRATCH, iters=300, warmup_iters=30, scale_range=(0.75, 1.5), reweight="edge"),
    "scratch_600": dict(SCRATCH, iters=600, warmup_iters=60, scale_range=(0.75, 1.5)),
    "scratch_600_seed1": dict(SCRATCH, iters=600, warmup_iters=60, scale_range=(0.75, 1.5), seed=1),
    "scale1-2_600": dict(SCRATCH, iters=600, warmup_iters=60, scale_range=(1.0, 2.0)),
    "scale1.5-3_600": dict(SCRATCH, iters=600, warmup_iters=60, scale_range=(1.5, 3.0)),
    "lr1e-3_600": dict(SCRATCH, lr=1e-3, iters=600, warmup_iters=60, scale_range=(0.75, 1.5)),
    "lr4e-3_600": dict(SCRATCH, lr=4e-3, iters=600, warmup_iters=60, scale_range=(0.75, 1.5)),
    "scratch_600_seed2": dict(SCRATCH, iters=600, warmup_iters=60, scale_range=(0.75, 1.5), seed=2),
    "ema_600": EMA,
    "ema_600_seed1": dict(EMA, seed=1),
    "ema_600_seed2": dict(EMA, seed=2),
}


def prepare_store(store: Path, *, images: int = 40) -> None:
    """The demo's data: 40 scenes (seed 0), simulated car pseudo labels on train/val, carve-others merge."""
    ingest_synthetic(store, images=images, size=(256, 384), seed=0, progress=False)
    labeler = LabelerConfig(kind="simulated", seed=0)
    for split in ("train", "val"):
        pseudo_label(store, prompt="car", split=split, labeler=labeler, progress=False)
    merge(store, classes="car", parent="v1", policy="carve-others", allow_partial=True, progress=False)


def scores(store: Path, final: Path, scale: float, window: int | None = None,
           ratios: Sequence[float] = (1.0,)) -> dict[str, Any]:
    model = load_trained_model(final)
    model.test_scale, model.test_ratios = scale, tuple(ratios)
    if window is not None:  # None: the model's own test_window (its training crop)
        model.test_window = window
    result = evaluate_model(store, model=model, splits=("val", "test"), label_version="v2", progress=False)
    out = {}
    for split, r in result.splits.items():
        car = r.new_classes["car"]
        out[split] = {"car_iou": round(100 * (car.iou or 0), 2), "car_biou": round(100 * (car.biou or 0), 2),
                      "miou7": round(100 * (r.precise.miou or 0), 2)}
    return out


def run_setting(name: str, setting: dict[str, Any], *, store: Path, out: Path,
                test_scales: Sequence[float], test_windows: Sequence[int | None] = (None,),
                test_ratios: Sequence[float] = (1.0,)) -> dict[str, Any]:
    run_dir = out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    fields = {**BASE, **setting}
    config = TrainConfig(store=str(store), out_dir=str(run_dir), version="v2", checkpoint_every=fields["iters"],
                         keep_checkpoints=1, **fields)
    t0 = time.perf_counter()
    final = train(config, progress=False)
    seconds = time.perf_counter() - t0
    row = {"setting": name, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
           "train_s": round(seconds, 1)}
    ratios = "" if tuple(test_ratios) == (1.0,) else "_ratios_" + "+".join(f"{r:g}" for r in test_ratios)
    row["scores"] = {f"test_scale_{s:g}{ratios}" + ("" if w is None else f"_window_{w}"):
                     scores(store, final, s, w, test_ratios) for s in test_scales for w in test_windows}
    return row


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--only", default=",".join(SETTINGS), help="comma-separated setting names")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="run one extra setting 'custom' from scratch_600 with these TrainConfig fields "
                         "(JSON values, e.g. --set iters=800 --set 'scale_range=[0.75,1.5]')")
    ap.add_argument("--test-scales", default="1,2")
    ap.add_argument("--test-windows", default="",
                    help="comma-separated test_window values to score with (0: whole images); "
                         "default: the model's own (its training crop)")
    ap.add_argument("--test-ratios", default="1",
                    help="comma-separated scales the model averages, as ratios of each test scale (e.g. 1,1.5: "
                         "scales 2 and 3 at --test-scales 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=40, help="scenes in the store (the demo's: 40)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    chosen = {n: SETTINGS[n] for n in args.only.split(",") if n} if not args.set else {}
    unknown = [n for n in args.only.split(",") if n and n not in SETTINGS]
    if unknown:
        ap.error(f"unknown settings {unknown}; choose from {','.join(SETTINGS)}")
    if args.set:
        extra = {k: parse_value(v) for k, v in (kv.split("=", 1) for kv in args.set)}
        chosen["custom"] = {**SCRATCH, "iters": 600, "warmup_iters": 60, "scale_range": (0.75, 1.5), **extra}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "store"
    if not store.exists():
        prepare_store(store, images=args.images)
    scales = [float(s) for s in args.test_scales.split(",")]
    windows = [int(w) for w in args.test_windows.split(",")] if args.test_windows else [None]
    for name, setting in chosen.items():
        row = run_setting(name, setting, store=store, out=out, test_scales=scales, test_windows=windows,
                          test_ratios=[float(r) for r in args.test_ratios.split(",")])
        print(json.dumps(row), flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
