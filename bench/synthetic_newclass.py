"""The paper's Tab. 3 in a world where the model can reach its labels: synthetic scenes, car as the new class.

MaSS13K (Tab. 3) trains on precise labels plus Grounded-SAM pseudo labels of "car" and reports that inverse
edge reweighting beats plain mixing and the pseudo labels themselves at the edges. On CamVid
(`bench/camvid_newclass.py`) nothing at CPU scale reaches its labels, so the rows cannot be told apart. Here
the data is the demo's procedural street scenes (`tasks.data.synthetic_scenes`), where a tiny model trained from
scratch does reach them:

- **precise classes** have exact, pixel-sharp labels (sky, building, vegetation, ground, water, human;
  cars, poles and signs are "others");
- **pseudo labels** of car come from the simulated Grounded-SAM (`models.labelers.simulated_labeler`, the
  demo's settings): low-resolution (SAM-grid) boundaries, 25 % of instances bleeding 3 px into their
  neighbours, 5 % missed, small objects dropped. They are made on train and val; on test they are made in
  memory for the Pseudo Label row only (`tasks.demo.pseudo_label_scores`) and train nothing;
- the **oracle** trains on the exact car masks carved into "others": what the model and schedule reach with
  perfect labels.

Rows: Pseudo Label; Pseudo only (car/others from the raw pseudo masks, no precise labels); Mixed, no
reweight; Mixed + edge reweight (``1 + 5W`` on every class); Mixed + inverse reweight (``1 - W`` on car and
the band of precise classes next to it); Oracle (exact car, no reweight). Every model row trains the tiny
MaSSFormer (``--variant``, default ``tiny``; e.g. ``mask2former_tiny`` or ``maskformer_tiny`` for the baselines)
from scratch with the ``scratch`` recipe (`models.training.optim.SCRATCH_RECIPE`), for each of
``--seeds`` (the seed of the initialisation, data order and loss points; the data and pseudo labels stay
fixed), and is scored on val and test: car IoU / BIoU / BF1 class vs rest against the exact masks and the
7-class mIoU against the precise labels. The table gives mean ± sample sd over the seeds.

Outputs in ``--out`` (default ``runs/synthetic_newclass``): ``results.md``, ``results.json`` (every run's
numbers, the settings, wall times, the machine), ``store/`` and ``runs/<row>-s<seed>/``. Measured on the
2-core machine: see docs/experiments.md "New-class experiment (synthetic)"; ``--quick`` is a ~2-minute smoke run.

Example::

    .venv/bin/python bench/synthetic_newclass.py                 # 3 seeds, 5 model rows (~55 min, 2 cores)
    .venv/bin/python bench/synthetic_newclass.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/camvid_newclass.py

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

import camvid_newclass as common  # noqa: E402  (derived label versions and score helpers)

from addclass.models.build import MODEL_BUILDERS  # noqa: E402
from addclass.storage.store import open_label_store  # noqa: E402
from addclass.tasks.data.ingest import ingest_synthetic  # noqa: E402
from addclass.tasks.demo import pseudo_label_scores  # noqa: E402
from addclass.tasks.evaluation.evaluate import evaluate_model, evaluate_pseudo  # noqa: E402
from addclass.tasks.evaluation.report import format_fraction, format_percent  # noqa: E402
from addclass.tasks.labels.merge import merge  # noqa: E402
from addclass.tasks.labels.pseudo_label import LabelerConfig, pseudo_label  # noqa: E402
from addclass.tasks.training.train import TrainConfig, train  # noqa: E402

CLASS = common.CLASS
DEFAULT_OUT = REPO / "runs" / "synthetic_newclass"
TRAIN_ROWS: tuple[common.Row, ...] = (
    common.ROWS["pseudo_only"], common.ROWS["mixed_none"], common.ROWS["mixed_edge"], common.ROWS["mixed_inverse"],
    common.Row("oracle", "Oracle (exact car masks)", "train", "hand_car", "none"),
)
METRICS = ("iou", "biou", "bf1")


def prepare_store(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Ingest, pseudo-label (train, val), merge, and build the pseudo-only and oracle versions."""
    store = out / "store"
    out.mkdir(parents=True, exist_ok=True)
    if store.exists():
        shutil.rmtree(store)  # the bench's own store (under --out)
    t = time.perf_counter()
    ingest_synthetic(store, images=args.images, size=tuple(args.size), seed=args.data_seed, progress=False)
    labeler = LabelerConfig(kind="simulated", seed=args.data_seed)
    for split in ("train", "val"):
        pseudo_label(store, prompt=CLASS, split=split, labeler=labeler, batch_size=8, progress=False)
    mixed = merge(store, classes=CLASS, parent="v1", policy="carve-others", allow_partial=True, progress=False)
    versions = {"mixed": mixed, "pseudo_only": common.build_pseudo_only_version(store, parent=mixed),
                "hand_car": common.build_hand_car_version(store, parent="v1")}
    st = open_label_store(store)
    return {"store": str(store), "versions": versions, "labeler": labeler.to_dict(),
            "images": {s: len(st.image_ids(s)) for s in st.splits()}, "setup_s": round(time.perf_counter() - t, 1)}


def pseudo_row(info: dict[str, Any]) -> dict[str, Any]:
    """The pseudo labels against the exact masks: stored ones on val, in-memory ones on test."""
    stored = evaluate_pseudo(info["store"], classes=[CLASS]).classes[CLASS]
    labeler = LabelerConfig(**{k: v for k, v in info["labeler"].items() if k in ("kind", "seed", "simulated")})
    test = pseudo_label_scores(info["store"], class_name=CLASS, split="test", labeler=labeler)
    scores = {"val": {"car": common.car_scores(stored["val"].scores), "miou7": None},
              "test": {"car": common.car_scores(test), "miou7": None}}
    return {"id": "pseudo_label", "name": "Pseudo Label", "kind": "pseudo", "runs": [{"seed": None, "scores": scores}]}


def train_row(args: argparse.Namespace, row: common.Row, info: dict[str, Any], out: Path, seed: int) -> dict[str, Any]:
    """Trains and scores one row for one seed."""
    run_dir = out / "runs" / f"{row.id}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = TrainConfig(
        store=info["store"], out_dir=str(run_dir), version=info["versions"][row.version], variant=args.variant,
        iters=args.iters, batch_size=args.batch_size, crop_size=(args.crop, args.crop), scale_range=tuple(args.scale),
        reweight=row.reweight, inverse_weight_near_pseudo=row.inverse_weight_near_pseudo, num_points=args.points,
        checkpoint_every=args.iters, keep_checkpoints=1, seed=seed, device="cpu", num_workers=0, val_every=0,
        test_scale=args.test_scale, test_ratios=tuple(args.test_ratios), init_model=args.init_model,
        recipe=args.recipe, lr=args.lr,
    )
    t0 = time.perf_counter()
    final = train(config, progress=False)
    t1 = time.perf_counter()
    result = evaluate_model(info["store"], final, splits=("val", "test"), progress=False)
    wall = time.perf_counter() - t0
    scores = common.model_scores(result)
    car = scores["val"]["car"] or {}
    print(f"[{row.id} seed {seed}] {wall:.0f} s: val car IoU {format_percent(car.get('iou'))} "
          f"BIoU {format_percent(car.get('biou'))}", flush=True)
    return {"seed": seed, "scores": scores, "train_s": round(t1 - t0, 1), "wall_s": round(wall, 1),
            "run_dir": str(run_dir)}


def spread(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample sd or None with fewer than 2 values, n) of the finite values."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def summarize(row: dict[str, Any]) -> dict[str, Any]:
    """Mean, sd and n per split and metric over the row's runs."""
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        for key in (*METRICS, "miou7"):
            values = [((r["scores"].get(split) or {}).get("car") or {}).get(key) if key != "miou7"
                      else (r["scores"].get(split) or {}).get("miou7") for r in row["runs"]]
            mean, sd, n = spread(values)
            out[f"{key}_{split}"] = {"mean": mean, "sd": sd, "n": n}
    return out


def _cell(stat: dict[str, Any], key: str) -> str:
    fmt = format_fraction if key.startswith("bf1") else format_percent
    if stat["mean"] is None:
        return "n/a"
    return fmt(stat["mean"]) + ("" if stat["sd"] is None else f" ± {fmt(stat['sd'])}")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    keys = ("iou_val", "biou_val", "bf1_val", "iou_test", "biou_test", "bf1_test", "miou7_val", "miou7_test")
    header = ["Row", "n", "car IoU val", "car BIoU val", "car BF1 val", "car IoU test", "car BIoU test",
              "car BF1 test", "7-cls mIoU val", "7-cls mIoU test"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for r in rows:
        s = r["summary"]
        lines.append("| " + " | ".join([r["name"], str(len(r["runs"]))] + [_cell(s[k], k) for k in keys]) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--seeds", default="0,1,2", help="training seeds (comma-separated)")
    ap.add_argument("--rows", default=",".join(r.id for r in TRAIN_ROWS), help="model rows (comma-separated)")
    ap.add_argument("--images", type=int, default=40, help="synthetic scenes (60/20/20 %% train/val/test)")
    ap.add_argument("--size", type=int, nargs=2, default=(256, 384), metavar=("H", "W"))
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the scenes and of the pseudo labels")
    ap.add_argument("--iters", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--scale", type=float, nargs=2, default=(0.75, 1.5), help="training resize range")
    ap.add_argument("--test-scale", type=float, default=2.0, help="inference scale (the demo's)")
    ap.add_argument("--test-ratios", type=float, nargs="+", default=[1.0],
                    help="scales the model averages, as ratios of --test-scale (the demo's: 1 1.5)")
    ap.add_argument("--points", type=int, default=2048)
    ap.add_argument("--variant", choices=sorted(MODEL_BUILDERS), default="tiny",
                    help="model variant every row trains (e.g. mask2former_tiny, maskformer_tiny)")
    ap.add_argument("--init-model", default=None, metavar="MODEL",
                    help="fine-tune this 7-class model folder (e.g. models/pretrained/demo_tiny_7class, the demo's "
                         "base) instead of training from scratch, as a user adding a class would")
    ap.add_argument("--recipe", choices=("auto", "paper", "scratch"), default="auto",
                    help="optimiser recipe (auto: scratch from random weights, paper from --init-model)")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke run: 12 images, 1 seed, 20 iters")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.seeds, args.iters = 12, "0", 20
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    known = {r.id for r in TRAIN_ROWS}
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if not rows or not set(rows) <= known:
        ap.error(f"--rows: expected a subset of {','.join(sorted(known))}. Got {args.rows}.")
    args.rows = rows
    return args


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs every row for every seed; returns the results (also written to ``--out``, after each run)."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    info = prepare_store(args, out)
    settings = {k: getattr(args, k) for k in ("images", "size", "data_seed", "iters", "batch_size", "crop", "scale",
                                              "test_scale", "test_ratios", "points", "threads", "seeds", "rows",
                                              "quick", "variant", "init_model", "recipe", "lr")}
    results: dict[str, Any] = {
        "experiment": "synthetic_newclass", "class": CLASS, "settings": settings, "store": info, "rows": [],
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "load_avg_start": list(os.getloadavg())},
        "command": " ".join(["bench/synthetic_newclass.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    pseudo = pseudo_row(info)
    results["rows"].append({**pseudo, "summary": summarize(pseudo)})
    for row in (r for r in TRAIN_ROWS if r.id in args.rows):
        rec: dict[str, Any] = {"id": row.id, "name": row.name, "kind": "train", "reweight": row.reweight, "runs": []}
        results["rows"].append(rec)
        for seed in args.seeds:
            rec["runs"].append(train_row(args, row, info, out, seed))
            rec["summary"] = summarize(rec)
            write_results(out, results)  # partial results survive a crash
    common.close_results(results, t_start=t_start)
    write_results(out, results)
    return results


def write_results(out: Path, results: dict[str, Any]) -> None:
    s = results["settings"]
    start = (f"fine-tuned from {s['init_model']}" if s.get("init_model") else "from scratch")
    note = (f"\nMean ± sd over training seeds {s['seeds']}; {s.get('variant', 'tiny')} {start} "
            f"(recipe {s.get('recipe', 'auto')}, lr {s.get('lr') or 'the recipe default'}), "
            f"{s['iters']} iters, batch {s['batch_size']}, crop {s['crop']}, scale {s['scale'][0]}-{s['scale'][1]}, "
            f"test scale {s['test_scale']} x ratios {s.get('test_ratios', [1.0])}, "
            f"{s['points']} points; {s['images']} scenes of {s['size'][0]}x{s['size'][1]} "
            f"({results['store']['images']}). IoU/BIoU in %, BF1 as a fraction, against the exact car masks.\n")
    (out / "results.md").write_text(f"# Synthetic new class: {CLASS}\n\n" + markdown_table(results["rows"]) + note)
    (out / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    results = run(argv)
    print()
    print(markdown_table(results["rows"]))
    print(json.dumps({k: v for k, v in results.items() if k != "rows"} | {
        "rows": [{"id": r["id"], "summary": r["summary"]} for r in results["rows"]]}, indent=2, allow_nan=False))
    print(f"total {results['total_s']} s; results in {Path(results['store']['store']).parent}")


if __name__ == "__main__":
    main()
