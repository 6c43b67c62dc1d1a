"""The `addclass` argument parser: one sub-command per stage, each setting ``command`` (`flows.cli.HANDLERS`
runs it). Imports nothing heavy, so ``--help`` is instant."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import get_args

from flows.choices import (
    AutocastDtype,
    DinoConfig,
    MergePolicy,
    ModelVariant,
    PredictMode,
    Promote,
    RecipeChoice,
    ReviewFormat,
    ReviewRanking,
    SamVariant,
    ScaleOut,
)
from models.labelers.build import LABELER_KINDS  # the table itself: it imports nothing heavy


@dataclass(frozen=True)
class TrainSizes:
    """`addclass train`'s defaults for what decides a run's time and memory, by device."""

    iters: int
    batch_size: int
    crop_size: int
    points: int


# On a GPU: the released recipe per device (its config is 8 GPUs x 2 images: 1024 crops, 12544 points, 80k
# steps). On the CPU: a run that fits a laptop and learns (the demo's measured setting, a few times longer).
TRAIN_SIZES = {"cuda": TrainSizes(iters=80000, batch_size=2, crop_size=1024, points=12544),
               "cpu": TrainSizes(iters=2000, batch_size=2, crop_size=256, points=8192)}


def _sized_help(field: str) -> str:
    gpu, cpu = getattr(TRAIN_SIZES["cuda"], field), getattr(TRAIN_SIZES["cpu"], field)
    return f"default: {gpu} on a GPU, {cpu} on the CPU"


# The choices of the flags. Most are `flows.choices`' Literal aliases (light, like this module); the others are
# spelled here so that `addclass --help` does not import torch. Each is equal to the list of the module that owns
# it (tests/flows/test_cli.py::test_cli_choices_are_their_owners_lists).
RECIPE_CHOICES: tuple[str, ...] = get_args(RecipeChoice)
VARIANTS: tuple[str, ...] = get_args(ModelVariant)
PIXEL_DECODERS = ("hr", "fpn", "msdeform", "semantic_fpn")  # models.massformer.build.PIXEL_DECODERS
PIXEL_DECODER_HELP = ("MaSSFormer variants: hr (default) or fpn (ablation); the mask2former_* / maskformer_* "
                      "/ semask_fpn_* variants have their own (msdeform / fpn / semantic_fpn) and take no other")
REWEIGHT_MODES = ("none", "edge", "inverse")  # models.training.loss_weights.REWEIGHT_MODES
MERGE_POLICIES: tuple[str, ...] = get_args(MergePolicy)
SAM_VARIANTS: tuple[str, ...] = get_args(SamVariant)
DINO_CONFIGS: tuple[str, ...] = get_args(DinoConfig)
PREDICT_MODES: tuple[str, ...] = get_args(PredictMode)
REVIEW_RANKINGS: tuple[str, ...] = get_args(ReviewRanking)
REVIEW_FORMATS: tuple[str, ...] = get_args(ReviewFormat)


PROMPT_HELP = "the class prompt; phrases of one class separated by ' . ' ('car . van . truck'), named after the first"
DESCRIPTION = "Teach a segmentation model a new class from a text prompt: pseudo-label, merge, train, evaluate."


def add_recipe_args(p: argparse._ActionsContainer) -> None:
    p.add_argument("--recipe", choices=RECIPE_CHOICES, default="auto",
                   help="auto: 'scratch' for a random start, 'paper' from ImageNet weights or --init-model")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (default: the recipe's)")
    p.add_argument("--scale-range", type=float, nargs=2, default=(0.5, 2.0), metavar=("LOW", "HIGH"),
                   help="random resize ratio of the training images")
    p.add_argument("--test-scale", type=float, default=1.0,
                   help="the model's inference scale (e.g. 2 with --scale-range 0.75 1.5 on small images)")
    p.add_argument("--test-ratios", type=float, nargs="+", default=[1.0], metavar="R",
                   help="scales the model averages at inference, as ratios of --test-scale (e.g. 1 1.5)")
    p.add_argument("--test-window", type=int, default=None, metavar="N",
                   help="the model predicts larger images in N x N tiles (network pixels; default: the "
                        "crop size it trains on; 0: whole images)")


def add_labeler_args(p: argparse.ArgumentParser, *, device_and_seed: bool = True,
                     title: str = "labeler", description: str | None = None) -> argparse._ArgumentGroup:
    g = p.add_argument_group(title, description)
    g.add_argument("--labeler", choices=LABELER_KINDS, default="grounded-sam",
                   help="simulated: degraded reference masks, for experiments and the demo only")
    g.add_argument("--sam", default="vit_b", choices=SAM_VARIANTS)
    g.add_argument("--sam-checkpoint", help="SAM checkpoint (else $ADDCLASS_SAM_CHECKPOINT, else "
                   "~/.cache/addclass/weights/)")
    g.add_argument("--dino", default="swint_ogc", choices=DINO_CONFIGS)
    g.add_argument("--dino-checkpoint", help="GroundingDINO checkpoint (else $ADDCLASS_DINO_CHECKPOINT)")
    if device_and_seed:
        g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", choices=get_args(AutocastDtype), help="autocast on GPU")
    g.add_argument("--box-threshold", type=float, default=0.35)
    g.add_argument("--text-threshold", type=float, default=0.25)
    g.add_argument("--max-boxes", type=int, default=20)
    g.add_argument("--tile-size", type=int, default=None,
                   help="also detect on overlapping tiles of this many px (large images, small objects)")
    g.add_argument("--tile-overlap", type=int, default=128, help="overlap of neighbouring detection tiles, px")
    g.add_argument("--min-region-area", type=int, default=0,
                   help="remove mask islands and fill holes smaller than this many px")
    g.add_argument("--negative-phrases", nargs="+", default=[], metavar="PHRASE",
                   help="phrases whose boxes remove the prompt's boxes they overlap (e.g. 'toy car')")
    g.add_argument("--negative-iou", type=float, default=0.5, help="IoU at which a negative box removes a box")
    g.add_argument("--refine", action="store_true",
                   help="decode every box again on a crop around it (finer masks; one encoder pass per box)")
    g.add_argument("--refine-margin", type=float, default=0.25, help="context around a refined box, x its side")
    g.add_argument("--hq-token-only", action="store_true", help="HQ-SAM: the HQ token's mask alone")
    g.add_argument("--random-weights", action="store_true", help="smoke tests only: random model weights")
    if device_and_seed:
        g.add_argument("--seed", type=int, default=0)
    return g


# The flow sub-commands (add-class, retrain): one flag per top-level flow parameter and per field of its
# `labeling` / `training` parameter (flows.params); `flows.cli.flow_params` maps them, and
# tests/flows/test_cli.py checks that every parameter and field has one flag with its default.
def add_flow_labeling_args(p: argparse.ArgumentParser) -> None:
    g = add_labeler_args(p, device_and_seed=False, title="labeling",  # the labeler uses the training --device
                         description="the flow's `labeling` parameter (flows.params.LabelingParams)")
    g.add_argument("--pseudo-batch-size", type=int, default=8, help="images per labelling task")
    g.add_argument("--pseudo-splits", nargs="+", default=["train", "val"], help="splits to pseudo-label")
    g.add_argument("--gpus", type=int, nargs="+", default=None,
                   help="label on these GPUs, one local Dask worker each (with --device cuda and a Prefect server)")


def add_flow_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training", "the flow's `training` parameter (flows.params.TrainingParams)")
    g.add_argument("--variant", choices=VARIANTS, default="tiny")
    g.add_argument("--iters", type=int, default=300)
    g.add_argument("--train-batch-size", type=int, default=2)
    g.add_argument("--crop-size", type=int, default=256)
    g.add_argument("--reweight", choices=REWEIGHT_MODES, default="inverse")
    g.add_argument("--no-inverse-near-pseudo", action="store_true",
                   help="precise pixels next to the new class keep the edge weight (inverse reweight only)")
    add_recipe_args(g)
    g.add_argument("--points", type=int, default=12544, help="sampled points per mask (CPU: ~8192)")
    g.add_argument("--workers", type=int, default=2, help="training data-loader processes")
    g.add_argument("--checkpoint-every", type=int, default=100,
                   help="steps between checkpoints (a stopped run resumes from the last one)")
    g.add_argument("--val-every", type=int, default=None,
                   help="steps between validations on val (default: 10 per run; 0: none)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu", help="where the models run (labeler, training, evaluation)")
    g.add_argument("--accumulate", type=int, default=1, help="forward/backward passes per step in each process")
    g.add_argument("--nproc", type=int, default=1,
                   help="training processes on this node (torchrun, one per GPU); the batch is split over them")
    g.add_argument("--nnodes", type=int, default=1, help="nodes training together")
    g.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="several nodes: where they meet (the first node)")


def add_flow_review_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("review", "the flow's `review` parameter (flows.params.ReviewParams): pause after "
                             "the merge for a person's review")
    g.add_argument("--review-top", type=int, default=None,
                   help="stop after the merge with this many images exported for review; after `addclass review "
                        "import`, the same command trains on the reviewed version")
    g.add_argument("--review-by", choices=REVIEW_RANKINGS, default="score", help="ranking (see review export)")
    g.add_argument("--review-model", help="--review-by disagreement|uncertainty: a model folder, or 'champion'")
    g.add_argument("--review-format", choices=REVIEW_FORMATS, default="coco")
    g.add_argument("--review-out", help="export folder (default: STORE.review/CLASS-VERSION)")


def add_flow_run_args(p: argparse.ArgumentParser, deployment: str) -> None:
    p.add_argument("--init-model", help="fine-tune this model folder, or 'champion' (the store's champion)")
    p.add_argument("--eval-splits", nargs="+", default=["val", "test"], help="splits to evaluate on")
    p.add_argument("--runs-dir", help="where models and reports go (default: STORE.runs/)")
    p.add_argument("--wait", action="store_true", help="wait for another writer of the store")
    p.add_argument("--deployment", action="store_true",
                   help=f"submit to the {deployment} deployment and follow it")
    p.add_argument("--deployment-name", default=deployment)
    p.add_argument("--timeout", type=float, default=None,
                   help="with --deployment: seconds to wait (default: until done)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="addclass", description=DESCRIPTION)
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

    ins = sub.add_parser("inspect", help="summarize a label store")
    ins.add_argument("store")
    ins.add_argument("--json", action="store_true")
    ins.add_argument("--max-images", type=int, default=200, help="images read per split for pixel shares")
    ins.add_argument("--image", help="render this image id as an overlay (with --png)")
    ins.add_argument("--png", help="overlay output file")
    ins.add_argument("--overwrite", action="store_true", help="replace an existing --png file")
    ins.add_argument("--version", default="latest")

    pl = sub.add_parser("pseudo-label", help="pseudo-label a prompt over a split (Grounded-SAM or simulated)")
    pl.add_argument("store")
    pl.add_argument("--prompt", required=True, help=PROMPT_HELP)
    pl.add_argument("--split", default="train")
    add_labeler_args(pl)
    pl.add_argument("--batch-size", type=int, default=8, help="images per batch (one task per batch)")
    pl.add_argument("--wait", action="store_true", help="wait for another writer instead of failing")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--quiet", action="store_true")

    ip = sub.add_parser("import-pseudo", help="import binary PNG masks (one per image id) as pseudo labels")
    ip.add_argument("store")
    ip.add_argument("--class", dest="class_name", required=True)
    ip.add_argument("--masks", required=True, help="folder of <image id>.png masks (0/1 or 0/255)")
    ip.add_argument("--prompt", help="the prompt the masks came from (default: the class name)")

    em = sub.add_parser("evaluate-masks", help="mIoU / BIoU / BF1 of two folders of PNG label maps")
    em.add_argument("--pred", required=True)
    em.add_argument("--gt", required=True)
    em.add_argument("--num-classes", type=int, required=True)
    em.add_argument("--ignore", type=int, default=255)
    em.add_argument("--class-names", help="comma-separated names, in id order")
    em.add_argument("--json", action="store_true")
    em.add_argument("--quiet", action="store_true")

    mg = sub.add_parser("merge", help="merge pseudo classes into a new, immutable label version")
    mg.add_argument("store")
    mg.add_argument("--classes", required=True, help="car or car,bicycle (order breaks score ties)")
    mg.add_argument("--from", dest="parent", default="latest", help="parent version (default: latest)")
    mg.add_argument("--policy", choices=MERGE_POLICIES, default="carve-others")
    mg.add_argument("--allow-partial", action="store_true", help="images without pseudo labels keep the parent's")
    mg.add_argument("--workers", type=int, default=1)
    mg.add_argument("--quiet", action="store_true")

    dd = sub.add_parser("discard-draft",
                        help="delete an abandoned, unpublished label version (never a published one)")
    dd.add_argument("store")
    dd.add_argument("version", help="the draft's name, as `addclass inspect` lists it")
    dd.add_argument("--wait", action="store_true", help="wait for the store lock instead of failing")

    ex = sub.add_parser("export", help="export a label version (mmseg PNGs) or pseudo instances (COCO RLE)")
    ex.add_argument("store")
    ex.add_argument("dir")
    ex.add_argument("--format", choices=("mmseg", "coco-rle"), default="mmseg")
    ex.add_argument("--version", default="latest")
    ex.add_argument("--classes", help="coco-rle: pseudo classes to export (default: all)")
    ex.add_argument("--copy-images", action="store_true", help="mmseg: copy images instead of symlinking")
    ex.add_argument("--overwrite", action="store_true")
    ex.add_argument("--quiet", action="store_true")

    tr = sub.add_parser("train", help="train MaSSFormer on a label version (resumable)")
    tr.add_argument("store")
    tr.add_argument("--version", default="latest")
    tr.add_argument("--variant", choices=VARIANTS, default="r50")
    tr.add_argument("--pixel-decoder", choices=PIXEL_DECODERS, default=None, help=PIXEL_DECODER_HELP)
    tr.add_argument("--iters", type=int, default=None, help=_sized_help("iters"))
    tr.add_argument("--batch-size", type=int, default=None, help=_sized_help("batch_size"))
    tr.add_argument("--crop-size", type=int, default=None, help=_sized_help("crop_size"))
    add_recipe_args(tr)
    tr.add_argument("--ema-decay", type=float, default=None,
                    help="decay of the weight average the run keeps, 0 for none (default: the recipe's)")
    tr.add_argument("--val-every", type=int, default=None,
                    help="steps between validations on val (default: 10 per run; 0: none)")
    tr.add_argument("--amp", action="store_true",
                    help="bf16 autocast of the forward pass on a GPU (MaSSFormer's recipe: fp32)")
    tr.add_argument("--reweight", choices=REWEIGHT_MODES, default="inverse")
    tr.add_argument("--no-inverse-near-pseudo", action="store_true")
    tr.add_argument("--points", type=int, default=None, help=_sized_help("points"))
    tr.add_argument("--checkpoint-every", type=int, default=1000)
    tr.add_argument("--accumulate", type=int, default=1,
                    help="forward/backward passes per step in each process (gradient accumulation): the batch "
                         "size stays the global one")
    tr.add_argument("--nproc", type=int, default=1,
                    help="training processes on this node (torchrun, one per GPU; gloo on the CPU); the batch "
                         "is split over them")
    tr.add_argument("--nnodes", type=int, default=1, help="nodes (run the same command on each)")
    tr.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="several nodes: where they meet (the first node)")
    tr.add_argument("--backbone-checkpoint", help="torchvision ImageNet ResNet weights (resnet50-0676ba61.pth)")
    tr.add_argument("--init-model", help="fine-tune a trained model folder (final/ of an earlier run); "
                    "classes matched by name, new classes start untrained")
    tr.add_argument("--device", default="auto")
    tr.add_argument("--workers", type=int, default=2, help="data loader processes")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", required=True)
    tr.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    tr.add_argument("--quiet", action="store_true")

    ev = sub.add_parser("evaluate", help="evaluate a trained model (and the pseudo labels) against hand masks")
    ev.add_argument("store")
    ev.add_argument("--checkpoint", required=True, help="a run folder or its final/ folder")
    ev.add_argument("--splits", nargs="+", default=["val", "test"])
    ev.add_argument("--out", required=True, help="report folder")
    ev.add_argument("--pred-dir", help="also write predicted PNGs here (rescore with evaluate-masks)")
    ev.add_argument("--overwrite", action="store_true", help="replace prediction PNGs an earlier evaluate wrote")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--quiet", action="store_true")

    pr = sub.add_parser("predict", help="label new images of any size with a trained model (PNG per image), or a "
                                         "store's images into a new label version (--into-store)")
    pr.add_argument("model", help="a run folder, its final/ folder, or 'champion' (with --store or --into-store)")
    pr.add_argument("inputs", nargs="*", help="image files, folders (searched recursively) or glob patterns")
    pr.add_argument("--out", help="output folder: NAME.png per image, classes.json")
    pr.add_argument("--store", help="the label store whose champion 'champion' means")
    pr.add_argument("--into-store", metavar="STORE",
                    help="instead of files: predict STORE's images into a new label version (policy 'predicted': "
                         "v1 with the model's new classes carved into 'others', provenance 2)")
    pr.add_argument("--split", action="append", default=None, metavar="NAME",
                    help="--into-store: a split to predict (repeatable; default: all; the others keep the "
                         "model's label version)")
    pr.add_argument("--mode", choices=PREDICT_MODES, default="auto",
                    help="auto: the model's own (tiles of the crop size it trained on); whole image at once; "
                         "or sliding windows of --window (memory bounded by it)")
    pr.add_argument("--window", type=int, default=1024, help="slide: tile size")
    pr.add_argument("--stride", type=int, default=None, help="slide: tile step (default: 3/4 of the window)")
    pr.add_argument("--tta", action="store_true", help="average over --tta-scales and horizontal flips")
    pr.add_argument("--tta-scales", type=float, nargs="+", default=None,
                    help="ratios of the model's test scale (default: 0.5 0.75 1 1.25 1.5 1.75)")
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--no-bf16", action="store_true", help="on a GPU: fp32 instead of bf16 autocast")
    pr.add_argument("--overlays", action="store_true", help="also write overlays/NAME.jpg")
    pr.add_argument("--scores", action="store_true", help="also write scores/NAME.npz (class scores, large)")
    pr.add_argument("--overwrite", action="store_true", help="replace predictions an earlier predict wrote")
    pr.add_argument("--quiet", action="store_true")

    xm = sub.add_parser("export-model", help="export a trained model to ONNX or torch.export")
    xm.add_argument("model", help="a run folder or its final/ folder")
    xm.add_argument("out", help="output file")
    xm.add_argument("--format", choices=("onnx", "torch-export"), default="onnx")
    xm.add_argument("--overwrite", action="store_true")

    im = sub.add_parser("import-model", help="convert released weights into an addclass model folder")
    im_sub = im.add_subparsers(dest="source", required=True)
    ms = im_sub.add_parser("mass13k", help="the MaSS13K release's mmengine checkpoint (read without running it)")
    ms.add_argument("file", help="the released checkpoint (.pth)")
    ms.add_argument("--out", required=True, help="the model folder to write (use it as --init-model)")
    ms.add_argument("--variant", choices=("r50", "lite_r18"), default="r50")
    ms.add_argument("--overwrite", action="store_true", help="replace a model folder an earlier import wrote")

    rv = sub.add_parser("review", help="send the labels most worth a look to a person (COCO), bring corrections "
                        "back as a label version (provenance 'reviewed')")
    rv_sub = rv.add_subparsers(dest="action", required=True)
    rx = rv_sub.add_parser("export", help="the top images of a class by --by, with their masks, as COCO or "
                           "Label Studio tasks")
    rx.add_argument("store")
    rx.add_argument("out", help="a new folder: images/, annotations.json (COCO), manifest.json")
    rx.add_argument("--class", dest="class_name", required=True, help="the class to review (e.g. car)")
    rx.add_argument("--version", default="latest", help="label version whose masks are reviewed")
    rx.add_argument("--top", type=int, default=20, help="how many images")
    rx.add_argument("--by", choices=REVIEW_RANKINGS, default="score",
                    help="score: lowest labeler confidence first; disagreement: lowest IoU between the version's "
                         "mask and --model's prediction first; uncertainty: --model least sure along the "
                         "version's boundary of the class first")
    rx.add_argument("--model", help="--by disagreement|uncertainty: a run folder, or 'champion' of the store")
    rx.add_argument("--format", choices=REVIEW_FORMATS, default="coco",
                    help="coco: annotations.json (CVAT 'COCO 1.0', FiftyOne, most tools); labelstudio: tasks.json "
                         "with brush pre-annotations and labeling_config.xml")
    ri = rv_sub.add_parser("import", help="publish the reviewed annotations of an export (COCO annotations.json, "
                           "or Label Studio's JSON export) as a label version")
    ri.add_argument("store")
    ri.add_argument("folder", help="the export's folder, with the reviewed annotations.json (coco) or "
                                   "the JSON Label Studio exported, saved as reviewed.json (labelstudio)")

    mi = sub.add_parser("model-info", help="parameter counts per component (and MACs with --macs-size)")
    mi.add_argument("variant", choices=VARIANTS)
    mi.add_argument("--num-classes", type=int, default=7)
    mi.add_argument("--pixel-decoder", choices=PIXEL_DECODERS, default=None, help=PIXEL_DECODER_HELP)
    mi.add_argument("--macs-size", nargs=2, type=int, default=None, metavar=("H", "W"),
                    help="also count the MACs of one forward at H x W (meta device, no memory)")
    mi.add_argument("--json", action="store_true")

    ac = sub.add_parser("add-class", help="run the add-class flow (in-process, or on a deployment)")
    ac.add_argument("--prompt", required=True, help=PROMPT_HELP)
    ac.add_argument("--store", required=True)
    ac.add_argument("--policy", choices=MERGE_POLICIES, default="carve-others")
    ac.add_argument("--dask-address", help="tcp://host:port of a running dask scheduler")
    ac.add_argument("--scale-out", choices=get_args(ScaleOut), default="auto",
                    help="runner of the mapped stages (auto: Dask with a server, threads without)")
    add_flow_run_args(ac, "add-class/add-class")
    add_flow_labeling_args(ac)
    add_flow_training_args(ac)
    add_flow_review_args(ac)

    rt = sub.add_parser("retrain", help="run the retrain flow: train a challenger on a label version, evaluate, "
                        "register (in-process, or on a deployment)")
    rt.add_argument("--store", required=True)
    rt.add_argument("--version", default="latest", help="label version to train on")
    rt.add_argument("--promote", choices=get_args(Promote), default="if-better",
                    help="make the challenger the champion: if it beats it on val, always, or never")
    add_flow_run_args(rt, "retrain/retrain")
    add_flow_training_args(rt)

    demo = sub.add_parser("demo", help="add car to the shipped 7-class tiny model on synthetic data, no downloads "
                                       "(~4 min on 2 cores)")
    from tasks.demo import DemoConfig

    d = DemoConfig()
    demo.add_argument("--out", default=d.out)
    demo.add_argument("--images", type=int, default=d.images)
    demo.add_argument("--size", type=int, nargs=2, default=d.size, metavar=("H", "W"))
    demo.add_argument("--base-model", default=d.base_model, metavar="MODEL",
                      help="the 7-class model car is added to ('none': train every class from scratch)")
    demo.add_argument("--iters", type=int, default=d.iters, help="fine-tuning steps (from scratch: ~600)")
    demo.add_argument("--lr", type=float, default=d.lr, help="learning rate (default: the recipe's)")
    demo.add_argument("--crop", type=int, default=d.crop)
    demo.add_argument("--points", type=int, default=d.points,
                      help="sampled points per mask (MaSSFormer's default: 12544)")
    demo.add_argument("--test-scale", type=float, default=d.test_scale,
                      help="the model's inference scale (masks at test_scale / 2 of the image's resolution)")
    demo.add_argument("--test-ratios", type=float, nargs="+", default=list(d.test_ratios), metavar="R",
                      help="scales the model averages, as ratios of --test-scale")
    demo.add_argument("--val-every", type=int, default=d.val_every,
                      help="steps between validations on val during training (0: none)")
    demo.add_argument("--seed", type=int, default=d.seed)
    demo.add_argument("--quiet", action="store_true")
    return p
