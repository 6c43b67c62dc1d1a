"""The `addclass` sub-commands on models: train, evaluate, predict, export-model, import-model, review, model-info
(`cli.main.HANDLERS`; imports are lazy)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from addclass.cli.fields import model_values
from addclass.cli.output import print_json
from addclass.common.errors import InputError


# ---------------------------------------------------------------------------- train / evaluate / model-info
def cmd_train(a: argparse.Namespace) -> int:
    import logging

    from addclass.flows.params import TrainingParams, launch, parse_params, task_train_config
    from addclass.tasks.training.train_launch import run_training

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    training = parse_params(TrainingParams, with_sized_defaults(model_values(a, "training")), "training")
    cfg = task_train_config(training, store=a.store, version=a.version, out_dir=a.out, init_model=a.init_model,
                            pixel_decoder=a.pixel_decoder, ema_decay=a.ema_decay, amp=a.amp,
                            backbone_checkpoint=a.backbone_checkpoint)
    final = run_training(cfg, launch=launch(training), resume=a.resume, progress=not a.quiet)
    print(f"model: {final}")
    return 0


def with_sized_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with the sizes left unset at the defaults of its device (`flows.settings.sized_defaults`),
    said in one line."""
    from addclass.flows.settings import sized_defaults
    from addclass.tasks.training.train import resolve_device

    kind = "cuda" if resolve_device(values["device"]).type == "cuda" else "cpu"
    filled = sized_defaults(values, device_kind=kind)
    if filled:
        print(f"{kind} defaults: " + ", ".join(f"{k} {v}" for k, v in filled.items()), flush=True)
    return {**values, **filled}


def cmd_evaluate(a: argparse.Namespace) -> int:
    from addclass.tasks.evaluation.evaluate import evaluate_model, evaluate_pseudo
    from addclass.tasks.evaluation.evaluation_report import write_evaluation_report

    model = evaluate_model(a.store, a.checkpoint, splits=tuple(a.splits), device=a.device, progress=not a.quiet,
                           pred_dir=a.pred_dir, overwrite=a.overwrite)
    paths = write_evaluation_report(a.out, model_results=model, pseudo_results=evaluate_pseudo(a.store),
                                    pred_dir=a.pred_dir)
    print(Path(paths["report.md"]).read_text())
    print(f"report: {paths['report.md']}")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from addclass.flows.params import PredictionParams, parse_params, predict_config
    from addclass.tasks.prediction.predict import predict_images

    if a.into_store and (a.inputs or a.out):
        raise InputError("--into-store predicts the store's own images: give no INPUT and no --out with it.")
    if not a.into_store and (not a.inputs or not a.out):
        raise InputError("predict needs INPUT images and --out DIR (or --into-store STORE).")
    if a.split and not a.into_store:
        raise InputError("--split goes with --into-store.")
    model = a.model
    if model == "champion":
        if not (a.store or a.into_store):
            raise InputError("MODEL 'champion' needs --store STORE (whose champion to use).")
        from addclass.tasks.model_files.model_registry import resolve_init_model

        model = resolve_init_model(a.store or a.into_store, "champion")
    prediction = parse_params(PredictionParams, model_values(a, "prediction"), "prediction")
    config = predict_config(prediction)
    if a.into_store:
        if prediction.overlays or prediction.scores or prediction.overwrite:
            raise InputError("--overlays, --scores and --overwrite apply to files, not to --into-store.")
        from addclass.tasks.prediction.predict_store import predict_into_store

        done = predict_into_store(model, a.into_store, splits=a.split, config=config, progress=not a.quiet)
        what = "already published by the same command" if done["existing"] else f"{done['images']} images predicted"
        print(f"label version {done['version']} (parent {done['parent']}, splits {', '.join(done['splits'])}): "
              f"{what}; addclass inspect {a.into_store}")
        return 0
    out = predict_images(model, a.inputs, a.out, config=config, progress=not a.quiet)
    print(f"{len(out['written'])} predicted, {len(out['skipped'])} already done, {len(out['failed'])} failed: "
          f"{out['out_dir']}")
    for path, message in out["failed"].items():
        print(f"addclass: error: {path}: {message}", file=sys.stderr)
    return 1 if out["failed"] else 0


def cmd_export_model(a: argparse.Namespace) -> int:
    from addclass.tasks.model_files.export_model import export_model

    print_json(export_model(a.model, a.out, format=a.format, overwrite=a.overwrite))
    return 0


def cmd_import_model(a: argparse.Namespace) -> int:
    from addclass.tasks.model_files.import_model import import_mass13k

    out = import_mass13k(a.file, a.out, variant=a.variant, overwrite=a.overwrite)
    print(f"model: {out}  (use it as --init-model, or with predict)")
    return 0


def cmd_review(a: argparse.Namespace) -> int:
    from addclass.tasks.labels import review

    if a.action == "import":
        done = review.import_review(a.store, a.folder)
        what = "already published from the same file" if done["existing"] else f"{done['images']} images reviewed"
        print(f"label version {done['version']} (parent {done['parent']}, class {done['class']}): {what}")
        return 0
    from addclass.flows.params import ReviewParams, parse_params

    r = parse_params(ReviewParams, model_values(a, "review"), "review")
    model = r.model
    if model == "champion":
        from addclass.tasks.model_files.model_registry import resolve_init_model

        model = resolve_init_model(a.store, "champion")
    manifest = review.export_review(a.store, a.class_name, a.out, version=a.version, top=r.top, by=r.by,
                                    model=model, fmt=r.format)
    print(f"{len(manifest['images'])} images of {a.class_name} ({manifest['version']}, by {r.by}) in {a.out}. "
          + " ".join(review.review_steps(a.store, a.out, r.format)[:2]))
    return 0


def cmd_model_info(a: argparse.Namespace) -> int:
    from addclass.models.build import model_info

    info = model_info(a.variant, num_classes=a.num_classes, pixel_decoder=a.pixel_decoder)
    if a.macs_size:
        from addclass.models.macs import count_macs

        h, w = a.macs_size
        macs = count_macs(a.variant, height=h, width=w, num_classes=a.num_classes, pixel_decoder=a.pixel_decoder)
        info["macs"] = {"input_hw": [h, w], **macs}
    if a.json:
        print_json(info)
    else:
        for k, v in info.items():
            print(f"{k:<28} {v:>14,}" if isinstance(v, int) else f"{k:<28} {v}")
    return 0
