"""The `addclass` sub-commands on a label store: ingest, inspect, pseudo-label, import-pseudo, evaluate-masks, merge,
discard-draft, export (`cli.main.HANDLERS`; imports are lazy)."""

from __future__ import annotations

import argparse
from typing import Any

from addclass.cli.fields import model_values
from addclass.cli.output import print_json
from addclass.common.errors import InputError


# ---------------------------------------------------------------------------- ingest / inspect
def cmd_ingest(a: argparse.Namespace) -> int:
    from addclass.tasks.data import ingest

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
    from addclass.tasks.data.inspect import format_summary, summarize_store, write_overlay_png

    if a.image:
        if not a.png:
            raise InputError("--image needs --png OUT (where to write the overlay).")
        out = write_overlay_png(a.store, a.image, a.png, version=a.version, overwrite=a.overwrite)
        print(f"wrote {out}")
        return 0
    summary = summarize_store(a.store, max_images=a.max_images)
    if a.json:
        print_json(summary)
    else:
        print(format_summary(summary))
    return 0


# ---------------------------------------------------------------------------- pseudo labels
def labeler_config_from_args(a: argparse.Namespace) -> Any:
    """`addclass pseudo-label`'s `LabelerConfig`: its labeling flags, on the device and with the seed of its
    --device / --seed, as the flows build theirs (`flows.params.labeler_config`)."""
    from addclass.flows.params import LabelingParams, TrainingParams, labeler_config, parse_params

    labeling = parse_params(LabelingParams, model_values(a, "labeling"), "labeling")
    training = parse_params(TrainingParams, model_values(a, "training"), "training")
    return labeler_config(labeling, device=training.device, seed=training.seed)


def cmd_pseudo_label(a: argparse.Namespace) -> int:
    from addclass.flows.params import LabelingParams, parse_params
    from addclass.tasks.labels.pseudo_label import pseudo_label

    batch_size = parse_params(LabelingParams, model_values(a, "labeling"), "labeling").batch_size
    out = pseudo_label(a.store, prompt=a.prompt, split=a.split, labeler=labeler_config_from_args(a),
                       batch_size=batch_size, progress=not a.quiet, wait_for_lock=a.wait)
    print_json(out) if a.json else print(
        f"pseudo-labelled {out['class']!r} on {out['split']}: {out['detections']} detections, "
        f"{out['detections_new']} of them new ({out['already_done']} images were already done)")
    return 0


def cmd_import_pseudo(a: argparse.Namespace) -> int:
    from addclass.tasks.labels.pseudo_label import import_pseudo

    out = import_pseudo(a.store, class_name=a.class_name, masks_dir=a.masks, prompt=a.prompt)
    print(f"imported {out['class']!r}: " + ", ".join(f"{s} {n}" for s, n in out["images"].items())
          + (f" ({out['kept']} images already had a mask, kept)" if out["kept"] else ""))
    return 0


def cmd_evaluate_masks(a: argparse.Namespace) -> int:
    from addclass.tasks.evaluation.evaluate_masks import evaluate_mask_folders

    names = a.class_names.split(",") if a.class_names else None
    out = evaluate_mask_folders(a.pred, a.gt, num_classes=a.num_classes, ignore_index=a.ignore, class_names=names,
                                progress=not a.quiet)
    if a.json:
        print_json(out)
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
    from addclass.tasks.labels.merge import merge

    version = merge(a.store, classes=a.classes, parent=a.parent, policy=a.policy, allow_partial=a.allow_partial,
                    workers=a.workers, progress=not a.quiet)
    print(f"published {version}")
    return 0


def cmd_discard_draft(a: argparse.Namespace) -> int:
    from addclass.tasks.labels.merge import discard_draft

    discard_draft(a.store, a.version, wait_for_lock=a.wait)
    print(f"discarded draft {a.version}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from addclass.tasks.data.export import export_coco_rle, export_mmseg

    if a.format == "mmseg":
        out = export_mmseg(a.store, version=a.version, out_dir=a.dir, copy_images=a.copy_images,
                           overwrite=a.overwrite, progress=not a.quiet)
    else:
        out = export_coco_rle(a.store, classes=a.classes, out_dir=a.dir, overwrite=a.overwrite, progress=not a.quiet)
    print_json(out)
    return 0
