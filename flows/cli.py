"""The `addclass` console script: thin argument parsing over tasks/ and flows/ (imports are lazy)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

Handler = Callable[[argparse.Namespace], int]


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


# ---------------------------------------------------------------------------- ingest / inspect
def cmd_ingest(a: argparse.Namespace) -> int:
    from tasks import ingest

    progress = not a.quiet
    if a.layout == "mass13k":
        ingest.ingest_mass13k(a.src, a.store, overwrite=a.overwrite, progress=progress)
    elif a.layout == "camvid":
        ingest.ingest_camvid(a.src, a.store, val_fraction=a.val_fraction, overwrite=a.overwrite, progress=progress)
    else:
        ingest.ingest_synthetic(a.store, images=a.images, size=(a.size[0], a.size[1]), seed=a.seed,
                                overwrite=a.overwrite, progress=progress)
    print(f"created {a.store}")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from tasks.inspect import format_summary, summarize_store, write_overlay_png

    if a.image:
        if not a.png:
            raise ValueError("--image needs --png OUT (where to write the overlay).")
        out = write_overlay_png(a.store, a.image, a.png, version=a.version, overwrite=a.overwrite)
        print(f"wrote {out}")
        return 0
    summary = summarize_store(a.store, max_images=a.max_images)
    if a.json:
        _print_json(summary)
    else:
        print(format_summary(summary))
    return 0


# ---------------------------------------------------------------------------- pseudo labels
def labeler_config_from_args(a: argparse.Namespace) -> Any:
    from tasks.pseudo_label import LabelerConfig

    return LabelerConfig(
        kind=a.labeler, sam_variant=a.sam, sam_checkpoint=a.sam_checkpoint, dino_config=a.dino,
        dino_checkpoint=a.dino_checkpoint, device=a.device, dtype=a.dtype, box_threshold=a.box_threshold,
        text_threshold=a.text_threshold, max_boxes=a.max_boxes, random_weights=a.random_weights, seed=a.seed,
    )


def cmd_pseudo_label(a: argparse.Namespace) -> int:
    from tasks.pseudo_label import pseudo_label

    out = pseudo_label(a.store, prompt=a.prompt, split=a.split, labeler=labeler_config_from_args(a),
                       batch_size=a.batch_size, progress=not a.quiet, wait_for_lock=a.wait)
    _print_json(out) if a.json else print(
        f"pseudo-labelled {out['class']!r} on {out['split']}: {out['detections_new']} new detections "
        f"({out['already_done']} images were already done)")
    return 0


def cmd_import_pseudo(a: argparse.Namespace) -> int:
    from tasks.pseudo_label import import_pseudo

    out = import_pseudo(a.store, class_name=a.class_name, masks_dir=a.masks, prompt=a.prompt)
    print(f"imported {out['class']!r}: " + ", ".join(f"{s} {n}" for s, n in out["images"].items()))
    return 0


def cmd_evaluate_masks(a: argparse.Namespace) -> int:
    from tasks.evaluate_masks import evaluate_mask_folders

    names = a.class_names.split(",") if a.class_names else None
    out = evaluate_mask_folders(a.pred, a.gt, num_classes=a.num_classes, ignore_index=a.ignore, class_names=names,
                                progress=not a.quiet)
    if a.json:
        _print_json(out)
    else:
        m = out["means"]
        print(f"mIoU {100 * m['miou']:.2f}  mBIoU {100 * m['mbiou']:.2f}  mBF1 {m['mbf1']:.4f}  "
              f"({out['num_images']} images)")
        for c in out["per_class"]:
            fmt = lambda x, pct=True: "  n/a" if x is None else (f"{100 * x:5.2f}" if pct else f"{x:.4f}")  # noqa: E731
            print(f"  {c['name']:<12} IoU {fmt(c['iou'])}  BIoU {fmt(c['biou'])}  BF1 {fmt(c['bf1'], False)}")
    return 0


# ---------------------------------------------------------------------------- merge / export
def cmd_merge(a: argparse.Namespace) -> int:
    from tasks.merge import merge

    version = merge(a.store, classes=a.classes, parent=a.parent, policy=a.policy, allow_partial=a.allow_partial,
                    workers=a.workers, progress=not a.quiet)
    print(f"published {version}")
    return 0


def cmd_discard_draft(a: argparse.Namespace) -> int:
    from tasks.merge import discard_draft

    discard_draft(a.store, a.version, wait_for_lock=a.wait)
    print(f"discarded draft {a.version}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from tasks.export import export_coco_rle, export_mmseg

    if a.format == "mmseg":
        out = export_mmseg(a.store, version=a.version, out_dir=a.dir, copy_images=a.copy_images,
                           overwrite=a.overwrite, progress=not a.quiet)
    else:
        out = export_coco_rle(a.store, classes=a.classes, out_dir=a.dir, overwrite=a.overwrite, progress=not a.quiet)
    _print_json(out)
    return 0


# ---------------------------------------------------------------------------- train / evaluate / model-info
def cmd_train(a: argparse.Namespace) -> int:
    import logging

    from tasks.train import TrainConfig, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig(store=a.store, out_dir=a.out, version=a.version, variant=a.variant,
                      pixel_decoder=a.pixel_decoder, iters=a.iters, batch_size=a.batch_size,
                      crop_size=(a.crop_size, a.crop_size), reweight=a.reweight,
                      inverse_weight_near_pseudo=not a.no_inverse_near_pseudo, num_points=a.points,
                      checkpoint_every=a.checkpoint_every, seed=a.seed, device=a.device, num_workers=a.workers,
                      backbone_checkpoint=a.backbone_checkpoint, init_model=a.init_model, lr=a.lr, amp=a.amp,
                      recipe=a.recipe, scale_range=tuple(a.scale_range), test_scale=a.test_scale,
                      val_every=a.val_every)
    final = train(cfg, resume=a.resume, progress=not a.quiet)
    print(f"model: {final}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from tasks.evaluate import evaluate_model, evaluate_pseudo
    from tasks.evaluation_report import write_evaluation_report

    model = evaluate_model(a.store, a.checkpoint, splits=tuple(a.splits), device=a.device, progress=not a.quiet,
                           pred_dir=a.pred_dir, overwrite=a.overwrite)
    paths = write_evaluation_report(a.out, model_results=model, pseudo_results=evaluate_pseudo(a.store),
                                    pred_dir=a.pred_dir)
    print(Path(paths["report.md"]).read_text())
    print(f"report: {paths['report.md']}")
    return 0


def cmd_model_info(a: argparse.Namespace) -> int:
    from models.massformer.build import model_info

    info = model_info(a.variant, num_classes=a.num_classes, pixel_decoder=a.pixel_decoder)
    if a.json:
        _print_json(info)
    else:
        for k, v in info.items():
            print(f"{k:<28} {v:>14,}" if isinstance(v, int) else f"{k:<28} {v}")
    return 0


# ---------------------------------------------------------------------------- demo
def _absolute(path: str | None) -> str | None:
    """A path as the user meant it: a deployment's worker runs in another working directory."""
    return None if path is None else str(Path(path).expanduser().resolve())


# add-class flags whose names differ from the flow parameters they set; the flags that only steer the command
ADD_CLASS_RENAMED = {"sam": "sam_variant", "dino": "dino_config", "train_batch_size": "batch_size",
                     "points": "num_points", "workers": "num_workers", "wait": "wait_for_lock"}
ADD_CLASS_CONTROL = frozenset({"command", "func", "deployment", "deployment_name", "timeout"})
ADD_CLASS_PATHS = ("store", "sam_checkpoint", "dino_checkpoint", "runs_dir")


def add_class_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """The add-class flow's parameters from the parsed flags: every flag sets exactly one parameter
    (`ADD_CLASS_RENAMED` where the names differ; tests/flows/test_cli.py checks the two lists match)."""
    params = {ADD_CLASS_RENAMED.get(k, k): v for k, v in vars(a).items() if k not in ADD_CLASS_CONTROL}
    params["inverse_weight_near_pseudo"] = not params.pop("no_inverse_near_pseudo")
    for key in ADD_CLASS_PATHS:
        params[key] = _absolute(params[key])
    if params["init_model"] not in (None, "champion"):
        params["init_model"] = _absolute(params["init_model"])
    for key in ("scale_range", "pseudo_splits", "eval_splits"):
        params[key] = list(params[key])
    return params


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
    params = add_class_kwargs(a)
    if a.deployment:
        return _run_deployment(a.deployment_name, {k: v for k, v in params.items() if v is not None}, a.timeout)
    from flows.add_class import add_class, plan_add_class
    from flows.runners import has_real_api

    plan_add_class(params)  # a bad parameter is one line now, before Prefect starts its API (~30 s)
    if a.dask_address is None and not has_real_api():
        print("running in-process (Prefect ephemeral API, thread pool); --deployment submits to a server")
    out = add_class(**params)
    print(json.dumps({k: out[k] for k in ("class", "version", "checkpoint", "report", "registry")}, indent=2,
                     default=str))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from flows.demo import run_demo
    from tasks.demo import DemoConfig

    result = run_demo(DemoConfig(out=a.out, images=a.images, size=(a.size[0], a.size[1]), iters=a.iters,
                                 crop=a.crop, points=a.points, seed=a.seed, progress=not a.quiet))
    print(f"\ndemo finished in {result['seconds']:.0f} s")
    print(f"label store: {result['store']}  (addclass inspect {result['store']})")
    print(f"model:       {result['checkpoint']}")
    print(f"report:      {result['report']['report.md']}\n")
    print("\n".join(result["comparison"]["lines"]))
    return 0


# ---------------------------------------------------------------------------- parser
# models.training.optim.RECIPE_CHOICES (a test keeps them equal)
RECIPE_CHOICES = ("auto", "paper", "scratch")


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", choices=RECIPE_CHOICES, default="auto",
                   help="auto: 'scratch' for a random start, 'paper' from ImageNet weights or --init-model")
    p.add_argument("--scale-range", type=float, nargs=2, default=(0.5, 2.0), metavar=("LOW", "HIGH"),
                   help="random resize ratio of the training images")
    p.add_argument("--test-scale", type=float, default=1.0,
                   help="the model's inference scale (e.g. 2 with --scale-range 0.75 1.5 on small images)")


def add_labeler_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("labeler")
    g.add_argument("--labeler", choices=("grounded-sam", "simulated"), default="grounded-sam",
                   help="simulated: degraded reference masks, for experiments and the demo only")
    g.add_argument("--sam", default="vit_b", choices=("vit_b", "vit_l", "vit_h", "tiny"))
    g.add_argument("--sam-checkpoint", help="SAM checkpoint (else $ADDCLASS_SAM_CHECKPOINT, else "
                   "~/.cache/addclass/weights/)")
    g.add_argument("--dino", default="swint_ogc", choices=("swint_ogc", "swinb", "test"))
    g.add_argument("--dino-checkpoint", help="GroundingDINO checkpoint (else $ADDCLASS_DINO_CHECKPOINT)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", choices=("bfloat16", "float16"), help="autocast on GPU")
    g.add_argument("--box-threshold", type=float, default=0.35)
    g.add_argument("--text-threshold", type=float, default=0.25)
    g.add_argument("--max-boxes", type=int, default=20)
    g.add_argument("--random-weights", action="store_true", help="smoke tests only: random model weights")
    g.add_argument("--seed", type=int, default=0)



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="addclass", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="command", required=True)

    ing = sub.add_parser("ingest", help="create a label store from a dataset")
    ing_sub = ing.add_subparsers(dest="layout", required=True)
    for layout, helptext in (("mass13k", "MaSS13K layout: images/{split}/*.jpg, annotations/{split}/*.png"),
                             ("camvid", "CamVid layout: train/ trainannot/ test/ testannot/ (car hidden in others)")):
        sp = ing_sub.add_parser(layout, help=helptext)
        sp.add_argument("src")
        sp.add_argument("store")
        if layout == "camvid":
            sp.add_argument("--val-fraction", type=float, default=0.2, help="last part of train held out as val")
    syn = ing_sub.add_parser("synthetic", help="procedural demo scenes with exact car masks")
    syn.add_argument("store")
    syn.add_argument("--images", type=int, default=12)
    syn.add_argument("--size", type=int, nargs=2, default=(256, 384), metavar=("H", "W"))
    syn.add_argument("--seed", type=int, default=0)
    for sp in ing_sub.choices.values():
        sp.add_argument("--overwrite", action="store_true", help="replace an existing store")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")
    ing.set_defaults(func=cmd_ingest)

    ins = sub.add_parser("inspect", help="summarize a label store")
    ins.add_argument("store")
    ins.add_argument("--json", action="store_true")
    ins.add_argument("--max-images", type=int, default=200, help="images read per split for pixel shares")
    ins.add_argument("--image", help="render this image id as an overlay (with --png)")
    ins.add_argument("--png", help="overlay output file")
    ins.add_argument("--overwrite", action="store_true", help="replace an existing --png file")
    ins.add_argument("--version", default="latest")
    ins.set_defaults(func=cmd_inspect)

    pl = sub.add_parser("pseudo-label", help="pseudo-label a prompt over a split (Grounded-SAM or simulated)")
    pl.add_argument("store")
    pl.add_argument("--prompt", required=True)
    pl.add_argument("--split", default="train")
    add_labeler_args(pl)
    pl.add_argument("--batch-size", type=int, default=8, help="images per batch (one task per batch)")
    pl.add_argument("--wait", action="store_true", help="wait for another writer instead of failing")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--quiet", action="store_true")
    pl.set_defaults(func=cmd_pseudo_label)

    ip = sub.add_parser("import-pseudo", help="import binary PNG masks (one per image id) as pseudo labels")
    ip.add_argument("store")
    ip.add_argument("--class", dest="class_name", required=True)
    ip.add_argument("--masks", required=True, help="folder of <image id>.png masks (0/1 or 0/255)")
    ip.add_argument("--prompt", help="the prompt the masks came from (default: the class name)")
    ip.set_defaults(func=cmd_import_pseudo)

    em = sub.add_parser("evaluate-masks", help="mIoU / BIoU / BF1 of two folders of PNG label maps")
    em.add_argument("--pred", required=True)
    em.add_argument("--gt", required=True)
    em.add_argument("--num-classes", type=int, required=True)
    em.add_argument("--ignore", type=int, default=255)
    em.add_argument("--class-names", help="comma-separated names, in id order")
    em.add_argument("--json", action="store_true")
    em.add_argument("--quiet", action="store_true")
    em.set_defaults(func=cmd_evaluate_masks)

    mg = sub.add_parser("merge", help="merge pseudo classes into a new, immutable label version")
    mg.add_argument("store")
    mg.add_argument("--classes", required=True, help="car or car,bicycle (order breaks score ties)")
    mg.add_argument("--from", dest="parent", default="latest", help="parent version (default: latest)")
    mg.add_argument("--policy", choices=("carve-others", "overwrite"), default="carve-others")
    mg.add_argument("--allow-partial", action="store_true", help="images without pseudo labels keep the parent's")
    mg.add_argument("--workers", type=int, default=1)
    mg.add_argument("--quiet", action="store_true")
    mg.set_defaults(func=cmd_merge)

    dd = sub.add_parser("discard-draft",
                        help="delete an abandoned, unpublished label version (never a published one)")
    dd.add_argument("store")
    dd.add_argument("version", help="the draft's name, as `addclass inspect` lists it")
    dd.add_argument("--wait", action="store_true", help="wait for the store lock instead of failing")
    dd.set_defaults(func=cmd_discard_draft)

    ex = sub.add_parser("export", help="export a label version (mmseg PNGs) or pseudo instances (COCO RLE)")
    ex.add_argument("store")
    ex.add_argument("dir")
    ex.add_argument("--format", choices=("mmseg", "coco-rle"), default="mmseg")
    ex.add_argument("--version", default="latest")
    ex.add_argument("--classes", help="coco-rle: pseudo classes to export (default: all)")
    ex.add_argument("--copy-images", action="store_true", help="mmseg: copy images instead of symlinking")
    ex.add_argument("--overwrite", action="store_true")
    ex.add_argument("--quiet", action="store_true")
    ex.set_defaults(func=cmd_export)

    tr = sub.add_parser("train", help="train MaSSFormer on a label version (resumable)")
    tr.add_argument("store")
    tr.add_argument("--version", default="latest")
    tr.add_argument("--variant", choices=("tiny", "lite_r18", "r50"), default="r50")
    tr.add_argument("--pixel-decoder", choices=("hr", "fpn"), default="hr")
    tr.add_argument("--iters", type=int, default=80000)
    tr.add_argument("--batch-size", type=int, default=16)
    tr.add_argument("--crop-size", type=int, default=1024)
    add_recipe_args(tr)
    tr.add_argument("--lr", type=float, default=None, help="base learning rate (default: the recipe's)")
    tr.add_argument("--val-every", type=int, default=None,
                    help="steps between validations on val (default: 10 per run; 0: none)")
    tr.add_argument("--amp", action="store_true",
                    help="bf16 autocast of the forward pass on a GPU (MaSSFormer's recipe: fp32)")
    tr.add_argument("--reweight", choices=("none", "edge", "inverse"), default="inverse")
    tr.add_argument("--no-inverse-near-pseudo", action="store_true")
    tr.add_argument("--points", type=int, default=12544)
    tr.add_argument("--checkpoint-every", type=int, default=1000)
    tr.add_argument("--backbone-checkpoint", help="torchvision ImageNet ResNet weights (resnet50-0676ba61.pth)")
    tr.add_argument("--init-model", help="fine-tune a trained model folder (final/ of an earlier run); "
                    "classes matched by name, new classes start untrained")
    tr.add_argument("--device", default="auto")
    tr.add_argument("--workers", type=int, default=2, help="data loader processes")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", required=True)
    tr.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="evaluate a trained model (and the pseudo labels) against hand masks")
    ev.add_argument("store")
    ev.add_argument("--checkpoint", required=True, help="a run folder or its final/ folder")
    ev.add_argument("--splits", nargs="+", default=["val", "test"])
    ev.add_argument("--out", required=True, help="report folder")
    ev.add_argument("--pred-dir", help="also write predicted PNGs here (rescore with evaluate-masks)")
    ev.add_argument("--overwrite", action="store_true", help="replace prediction PNGs an earlier evaluate wrote")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=cmd_evaluate)

    mi = sub.add_parser("model-info", help="parameter counts per component")
    mi.add_argument("variant", choices=("tiny", "lite_r18", "r50"))
    mi.add_argument("--num-classes", type=int, default=7)
    mi.add_argument("--pixel-decoder", choices=("hr", "fpn"), default="hr")
    mi.add_argument("--json", action="store_true")
    mi.set_defaults(func=cmd_model_info)

    ac = sub.add_parser("add-class", help="run the add-class flow (in-process, or on a deployment)")
    ac.add_argument("--prompt", required=True)
    ac.add_argument("--store", required=True)
    add_labeler_args(ac)
    ac.add_argument("--policy", choices=("carve-others", "overwrite"), default="carve-others")
    ac.add_argument("--variant", choices=("tiny", "lite_r18", "r50"), default="tiny")
    ac.add_argument("--iters", type=int, default=300)
    ac.add_argument("--train-batch-size", type=int, default=2)
    ac.add_argument("--crop-size", type=int, default=256)
    ac.add_argument("--reweight", choices=("none", "edge", "inverse"), default="inverse")
    ac.add_argument("--no-inverse-near-pseudo", action="store_true",
                    help="precise pixels next to the new class keep the edge weight (inverse reweight only)")
    ac.add_argument("--pseudo-splits", nargs="+", default=["train", "val"], help="splits to pseudo-label")
    ac.add_argument("--pseudo-batch-size", type=int, default=8, help="images per labelling task")
    ac.add_argument("--eval-splits", nargs="+", default=["val", "test"], help="splits to evaluate on")
    add_recipe_args(ac)
    ac.add_argument("--points", type=int, default=12544, help="sampled points per mask (CPU: ~2048)")
    ac.add_argument("--workers", type=int, default=2, help="training data-loader processes")
    ac.add_argument("--init-model", help="fine-tune this model folder, or 'champion' (the store's champion)")
    ac.add_argument("--runs-dir", help="where models and reports go (default: STORE.runs/)")
    ac.add_argument("--dask-address", help="tcp://host:port of a running dask scheduler")
    ac.add_argument("--scale-out", choices=("auto", "threads", "dask"), default="auto",
                    help="runner of the mapped stages (auto: Dask with a server, threads without)")
    ac.add_argument("--wait", action="store_true", help="wait for another writer of the store")
    ac.add_argument("--deployment", action="store_true", help="submit to the add-class deployment and follow it")
    ac.add_argument("--deployment-name", default="add-class/add-class")
    ac.add_argument("--timeout", type=float, default=None, help="with --deployment: seconds to wait (default: until done)")
    ac.set_defaults(func=cmd_add_class)

    demo = sub.add_parser("demo", help="the whole pipeline on synthetic data, no downloads (~4 min on 2 cores)")
    from tasks.demo import DemoConfig

    d = DemoConfig()
    demo.add_argument("--out", default=d.out)
    demo.add_argument("--images", type=int, default=d.images)
    demo.add_argument("--size", type=int, nargs=2, default=d.size, metavar=("H", "W"))
    demo.add_argument("--iters", type=int, default=d.iters)
    demo.add_argument("--crop", type=int, default=d.crop)
    demo.add_argument("--points", type=int, default=d.points,
                      help="sampled points per mask (MaSSFormer's default: 12544)")
    demo.add_argument("--seed", type=int, default=d.seed)
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=cmd_demo)
    return p


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, FileNotFoundError, FileExistsError,
                                               PermissionError, RuntimeError, NotADirectoryError,
                                               IsADirectoryError, ConnectionError)


# Local, offline defaults for Prefect (a user's own settings win): no telemetry, and enough time for the
# ephemeral API server to start on a 2-core machine (docs/design.md §7.6).
PREFECT_DEFAULTS = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
                    # the stages' own log lines (validation scores, warnings) in the flow run's logs
                    "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks"}


def main(argv: Sequence[str] | None = None) -> int:
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)

    args = build_parser().parse_args(argv)
    func: Handler = args.func
    try:
        return func(args)
    except USER_ERRORS as e:  # clear one-line errors for bad input; tracebacks for bugs
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"addclass: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
