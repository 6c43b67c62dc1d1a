"""The `addclass` argument parser: one sub-command per stage, each setting ``command`` (`cli.main.HANDLERS`
runs it). Imports nothing heavy, so ``--help`` is instant."""

from __future__ import annotations

import argparse
from typing import get_args

from pydantic import BaseModel

from addclass.cli.fields import add_model_flags
from addclass.flows.choices import MergePolicy, ModelVariant, Promote, ScaleOut
from addclass.flows.settings import (
    RUN_SIZES,
    SIZED_FIELDS,
    TRAIN_COMMAND_DEFAULTS,
    LabelingParams,
    PredictionParams,
    ReviewParams,
    TrainingParams,
)
from addclass.models import release

# The choices of the flags not generated from a settings model (`cli.fields` takes those from the
# fields' Literals). Each is equal to the list of the module that owns it
# (tests/flows/test_cli.py::test_cli_choices_are_their_owners_lists).
VARIANTS: tuple[str, ...] = get_args(ModelVariant)
PIXEL_DECODERS = ("hr", "fpn", "msdeform", "semantic_fpn")  # models.massformer.build.PIXEL_DECODERS
PIXEL_DECODER_HELP = ("MaSSFormer variants: hr (default) or fpn (ablation); the mask2former_* / maskformer_* "
                      "/ semask_fpn_* variants have their own (msdeform / fpn / semantic_fpn) and take no other")
MERGE_POLICIES: tuple[str, ...] = get_args(MergePolicy)


PROMPT_HELP = "the class prompt; phrases of one class separated by ' . ' ('car . van . truck'), named after the first"
DESCRIPTION = "Teach a segmentation model a new class from a text prompt: pseudo-label, merge, train, evaluate."


def add_labeler_args(p: argparse.ArgumentParser) -> None:
    """`addclass pseudo-label`'s labeler flags: the labeling settings but the flow's splits and GPUs, and the
    device and seed the flows take from the training settings."""
    g = p.add_argument_group("labeler", "the labeling settings (flows.settings.LabelingParams)")
    add_model_flags(g, LabelingParams, group="labeling", exclude=("splits", "gpus"))
    add_model_flags(g, TrainingParams, group="training", only=("device", "seed"))


# The flow sub-commands (add-class, retrain): one flag per top-level flow parameter, and one generated flag per
# field of its `labeling` / `training` / `review` parameter (flows.settings); `cli.commands_flows.flow_params`
# builds them, and tests/flows/test_settings_single_source.py checks every field has exactly one flag.
FLOW_GROUPS: dict[str, type[BaseModel]] = {"labeling": LabelingParams, "training": TrainingParams,
                                           "review": ReviewParams}


def add_flow_settings_args(p: argparse.ArgumentParser, groups: tuple[str, ...]) -> None:
    descriptions = {
        "labeling": "the flow's `labeling` parameter (flows.settings.LabelingParams); the labeler runs on the "
                    "training --device with its --seed",
        "training": "the flow's `training` parameter (flows.settings.TrainingParams)",
        "review": "the flow's `review` parameter (flows.settings.ReviewParams): any of these flags stops the "
                  "flow after the merge with images exported for a person's review; after `addclass review "
                  "import`, the same command trains on the reviewed version",
    }
    for group in groups:
        g = p.add_argument_group(group, descriptions[group])
        add_model_flags(g, FLOW_GROUPS[group], group=group, flow=True, prefix="review-" if group == "review" else "")
    p.set_defaults(flow_groups=groups)


def _sized_help(field: str) -> str:
    gpu, cpu = getattr(RUN_SIZES["cuda"], field), getattr(RUN_SIZES["cpu"], field)
    return f"{gpu} on a GPU, {cpu} on the CPU"


def add_flow_run_args(p: argparse.ArgumentParser, deployment: str) -> None:
    p.add_argument("--init-model", help="fine-tune this model folder, or 'champion' (the store's champion)")
    p.add_argument("--eval-splits", nargs="+", default=["val", "test"], help="splits to evaluate on")
    p.add_argument("--runs-dir", help="where models and reports go (default: STORE.runs/)")
    p.add_argument("--wait", dest="wait_for_lock", action="store_true",
                   help="wait for another writer of the store")
    p.add_argument("--deployment", action="store_true",
                   help=f"submit to the {deployment} deployment and follow it")
    p.add_argument("--deployment-name", default=deployment)
    p.add_argument("--timeout", type=float, default=None,
                   help="with --deployment: seconds to wait (default: until done)")


def _add_data_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """ingest, inspect: a label store made and looked at (`cli.commands_store`)."""
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


def _add_label_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """pseudo-label, import-pseudo, evaluate-masks, merge, discard-draft, export: a label store's labels
    (`cli.commands_store`)."""
    pl = sub.add_parser("pseudo-label", help="pseudo-label a prompt over a split (Grounded-SAM or simulated)")
    pl.add_argument("store")
    pl.add_argument("--prompt", required=True, help=PROMPT_HELP)
    pl.add_argument("--split", default="train")
    add_labeler_args(pl)
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


def _add_training_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """train, evaluate (`cli.commands_models`)."""
    tr = sub.add_parser("train", help="train MaSSFormer on a label version (resumable)")
    tr.add_argument("store")
    tr.add_argument("--version", default="latest")
    g = tr.add_argument_group("training", "the training settings (flows.settings.TrainingParams); the defaults "
                              "that differ from the flows' are flows.settings.TRAIN_COMMAND_DEFAULTS")
    add_model_flags(g, TrainingParams, group="training", defaults=TRAIN_COMMAND_DEFAULTS,
                    default_help={name: _sized_help(name) for name in SIZED_FIELDS})
    tr.add_argument("--pixel-decoder", choices=PIXEL_DECODERS, default=None, help=PIXEL_DECODER_HELP)
    tr.add_argument("--ema-decay", type=float, default=None,
                    help="decay of the weight average the run keeps, 0 for none (default: the recipe's)")
    tr.add_argument("--amp", action="store_true",
                    help="bf16 autocast of the forward pass on a GPU (MaSSFormer's recipe: fp32)")
    tr.add_argument("--backbone-checkpoint", help="torchvision ImageNet ResNet weights (resnet50-0676ba61.pth)")
    tr.add_argument("--init-model", help="fine-tune a trained model folder (final/ of an earlier run); "
                    "classes matched by name, new classes start untrained")
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


def _add_model_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """predict, export-model, import-model, review, model-info (`cli.commands_models`)."""
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
    add_model_flags(pr.add_argument_group("prediction", "the prediction settings (flows.settings.PredictionParams)"),
                    PredictionParams, group="prediction")
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
    add_model_flags(rx, ReviewParams, group="review", only=("top", "by", "model", "format"))
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


def _add_flow_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """add-class, retrain: the flows (`cli.commands_flows`)."""
    ac = sub.add_parser("add-class", help="run the add-class flow (in-process, or on a deployment)")
    ac.add_argument("--prompt", required=True, help=PROMPT_HELP)
    ac.add_argument("--store", required=True)
    ac.add_argument("--policy", choices=MERGE_POLICIES, default="carve-others")
    ac.add_argument("--dask-address", help="tcp://host:port of a running dask scheduler")
    ac.add_argument("--scale-out", choices=get_args(ScaleOut), default="auto",
                    help="runner of the mapped stages (auto: Dask with a server, threads without)")
    add_flow_run_args(ac, "add-class/add-class")
    add_flow_settings_args(ac, ("labeling", "training", "review"))

    rt = sub.add_parser("retrain", help="run the retrain flow: train a challenger on a label version, evaluate, "
                        "register (in-process, or on a deployment)")
    rt.add_argument("--store", required=True)
    rt.add_argument("--version", default="latest", help="label version to train on")
    rt.add_argument("--promote", choices=get_args(Promote), default="if-better",
                    help="make the challenger the champion: if it beats it on val, always, or never")
    add_flow_run_args(rt, "retrain/retrain")
    add_flow_settings_args(rt, ("training",))


def _add_demo_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """demo (`cli.commands_flows`)."""
    demo = sub.add_parser("demo", help="add car to the shipped 7-class tiny model on synthetic data, no downloads "
                                       "(~4 min on 2 cores)")
    from addclass.tasks.demo import DemoConfig

    d = DemoConfig()
    demo.add_argument("--out", default=d.out)
    demo.add_argument("--images", type=int, default=d.images)
    demo.add_argument("--size", type=int, nargs=2, default=d.size, metavar=("H", "W"))
    demo.add_argument("--base-model", default=d.base_model, metavar="MODEL",
                      help="the 7-class model car is added to ('none': train every class from scratch)")
    demo.add_argument("--iters", type=int, default=d.iters, help="fine-tuning steps (from scratch: ~600)")
    demo.add_argument("--lr", type=float, default=d.lr,
                      help="learning rate (default: 1e-3 to fine-tune the base model, the recipe's from scratch)")
    demo.add_argument("--crop", type=int, default=d.crop)
    demo.add_argument("--points", type=int, default=d.points,
                      help=f"sampled points per mask (MaSSFormer's release: {release.NUM_POINTS})")
    demo.add_argument("--test-scale", type=float, default=d.test_scale,
                      help="the model's inference scale (masks at test_scale / 2 of the image's resolution)")
    demo.add_argument("--test-ratios", type=float, nargs="+", default=list(d.test_ratios), metavar="R",
                      help="scales the model averages, as ratios of --test-scale")
    demo.add_argument("--val-every", type=int, default=d.val_every,
                      help="steps between validations on val during training (0: none)")
    demo.add_argument("--seed", type=int, default=d.seed)
    demo.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="addclass", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)
    _add_data_commands(sub)
    _add_label_commands(sub)
    _add_training_commands(sub)
    _add_model_commands(sub)
    _add_flow_commands(sub)
    _add_demo_command(sub)
    return p
