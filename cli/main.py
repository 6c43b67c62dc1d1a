"""The `addclass` console script: one handler per sub-command (`HANDLERS`) over tasks/ and flows/; the parser is
`cli.args` and imports are lazy."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from addclass.cli.args import FLOW_GROUPS, build_parser
from addclass.cli.fields import model_values
from addclass.common.errors import InputError, UserError

Handler = Callable[[argparse.Namespace], int]


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


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
        _print_json(summary)
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
    _print_json(out) if a.json else print(
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
    _print_json(out)
    return 0


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

    _print_json(export_model(a.model, a.out, format=a.format, overwrite=a.overwrite))
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
        _print_json(info)
    else:
        for k, v in info.items():
            print(f"{k:<28} {v:>14,}" if isinstance(v, int) else f"{k:<28} {v}")
    return 0


# ---------------------------------------------------------------------------- flows: add-class, retrain, demo
def _absolute(path: str | None) -> str | None:
    """A path as the user meant it: a deployment's worker runs in another working directory."""
    return None if path is None else str(Path(path).expanduser().resolve())


# The flow sub-commands' flags (add-class, retrain) have destination PARAMETER, or GROUP.FIELD for a field of
# the flow's `labeling` / `training` / `review` parameter (generated: `cli.fields`).
FLOW_OPTIONAL_GROUPS = frozenset({"review"})  # None unless one of its flags is given
FLOW_CONTROL = frozenset({"command", "deployment", "deployment_name", "timeout", "flow_groups"})  # steer the command
FLOW_PATHS = frozenset({"store", "runs_dir", "labeling.sam_checkpoint", "labeling.dino_checkpoint", "review.out"})
FLOW_MODELS = frozenset({"init_model", "review.model"})  # a model folder (made absolute) or "champion"


def flow_params(a: argparse.Namespace) -> dict[str, Any]:
    """The parameters of the flow that sub-command `a.command` runs (add-class, retrain), from the parsed flags:
    each flag sets one top-level parameter or one field of `labeling` / `training` / `review`, which are built
    here from the fields the user set (the models' own defaults fill the rest). Paths go out absolute: a
    deployment's worker runs in another working directory."""
    from addclass.flows.params import parse_params

    params: dict[str, Any] = {}
    fields: dict[str, dict[str, Any]] = {group: {} for group in a.flow_groups}
    for dest, value in vars(a).items():
        if dest in FLOW_CONTROL:
            continue
        if dest in FLOW_PATHS or (dest in FLOW_MODELS and value != "champion"):
            value = _absolute(value)
        if isinstance(value, list | tuple):
            value = list(value)  # JSON; and not argparse's shared default list
        group, _, name = dest.rpartition(".")
        (fields[group] if group else params)[name] = value
    for group, values in fields.items():
        if group in FLOW_OPTIONAL_GROUPS and not values:
            params[group] = None
        else:
            params[group] = parse_params(FLOW_GROUPS[group], values, group)
    return params


def _json_params(params: dict[str, Any]) -> dict[str, Any]:
    """A deployment run's parameters: the parameter objects as JSON objects, unset top-level ones left out."""
    from pydantic import BaseModel

    return {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v
            for k, v in params.items() if v is not None}


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
    params = flow_params(a)
    if a.deployment:
        return _run_deployment(a.deployment_name, _json_params(params), a.timeout)
    from addclass.flows.add_class import add_class, plan_add_class
    from addclass.flows.runners import has_real_api

    plan_add_class(params)  # a bad parameter is one line now, before Prefect starts its API (~30 s)
    if a.dask_address is None and not has_real_api():
        print("running in-process (Prefect ephemeral API, thread pool); --deployment submits to a server")
    out = add_class(**params)
    keys = ("class", "version", "review") if out.get("waiting_for_review") else (
        "class", "version", "checkpoint", "report", "registry")
    print(json.dumps({k: out[k] for k in keys}, indent=2, default=str))
    if out.get("waiting_for_review"):
        from addclass.tasks.labels.review import review_steps

        print("waiting for the review: " + " ".join(review_steps(a.store, out["review"], params["review"].format)))
    return 0


def cmd_retrain(a: argparse.Namespace) -> int:
    params = flow_params(a)
    if a.deployment:
        return _run_deployment(a.deployment_name, _json_params(params), a.timeout)
    from addclass.flows.retrain import retrain

    out = retrain(**params)
    print(json.dumps({k: out[k] for k in ("checkpoint", "report", "registry")}, indent=2, default=str))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from addclass.flows.demo import run_demo
    from addclass.tasks.demo import DemoConfig

    base = None if a.base_model in (None, "none") else a.base_model
    result = run_demo(DemoConfig(out=a.out, images=a.images, size=(a.size[0], a.size[1]), base_model=base,
                                 iters=a.iters, lr=a.lr,
                                 crop=a.crop, points=a.points, test_scale=a.test_scale,
                                 test_ratios=tuple(a.test_ratios), val_every=a.val_every,
                                 seed=a.seed, progress=not a.quiet))
    print(f"\ndemo finished in {result['seconds']:.0f} s ({os.environ.get('ADDCLASS_THREADS', 'threads: default')})")
    print(f"label store: {result['store']}  (addclass inspect {result['store']})")
    print(f"model:       {result['checkpoint']}")
    print(f"report:      {result['report']['report.md']}\n")
    print("\n".join(result["comparison"]["lines"]))
    return 0


HANDLERS: dict[str, Handler] = {
    "ingest": cmd_ingest, "inspect": cmd_inspect, "pseudo-label": cmd_pseudo_label,
    "import-pseudo": cmd_import_pseudo, "evaluate-masks": cmd_evaluate_masks, "merge": cmd_merge,
    "discard-draft": cmd_discard_draft, "export": cmd_export, "train": cmd_train, "evaluate": cmd_evaluate,
    "model-info": cmd_model_info, "predict": cmd_predict, "export-model": cmd_export_model,
    "import-model": cmd_import_model, "review": cmd_review,
    "add-class": cmd_add_class, "retrain": cmd_retrain, "demo": cmd_demo,
}


# What the user caused (`common.errors.UserError`) and OS errors about a path (they name it) are one line and exit 2;
# anything else is a bug or an environment failure and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, FileExistsError, PermissionError,
                                               NotADirectoryError, IsADirectoryError, ConnectionError)


# Local, offline defaults for Prefect (a user's own settings win): no telemetry, and enough time for the
# ephemeral API server to start on a 2-core machine (docs/design.md §7.6).
PREFECT_DEFAULTS = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
                    # the stages' own log lines (validation scores, warnings) in the flow run's logs
                    "PREFECT_LOGGING_EXTRA_LOGGERS": "addclass.tasks"}


def main(argv: Sequence[str] | None = None) -> int:
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)

    args = build_parser().parse_args(argv)
    try:
        return HANDLERS[args.command](args)
    except USER_ERRORS as e:  # clear one-line errors for bad input; tracebacks for bugs
        print(f"addclass: error: {e}", file=sys.stderr)
        return 2


IN_PROCESS_FLOWS = ("demo", "add-class", "retrain")  # they start Prefect's temporary server in-process


def busy_cores(window: float = 0.25, *, stat: str = "/proc/stat") -> float | None:
    """Cores that other processes keep busy, measured now: the share of non-idle CPU time in the kernel's
    counters (``/proc/stat``) over ``window`` seconds, times the number of cores, while this process sleeps.

    Unlike the load average (a 1-minute mean), it does not remember a job that just ended: right after
    ``scripts/setup.sh`` the load average still says "busy" for a minute. None where there is no
    ``/proc/stat`` (not Linux).
    """
    def sample() -> tuple[int, int] | None:
        try:
            with open(stat) as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    first = sample()
    if first is None:
        return None
    time.sleep(window)
    second = sample()
    if second is None or second[0] <= first[0]:
        return None
    total, idle = second[0] - first[0], second[1] - first[1]
    return (os.cpu_count() or 1) * (total - idle) / total


def passive_threads(*, busy: float | None = None, cpus: int | None = None) -> str:
    """On a busy machine, makes torch's OpenMP threads sleep, not spin, while they wait for work; returns the
    decision as a line for the log. Must run before torch is imported.

    Spinning threads take whole cores from every other job: with two busy processes on 2 cores a tiny training
    step took 9.3 s instead of 0.81 s idle, 2.1 s with passive waiting, which costs 25 % on an idle machine
    (1.02 s; docs/reliability.md). So the policy is passive when other processes keep at least half the cores
    busy right now (``busy``, default `busy_cores`; the 1-minute load average where that cannot be measured)
    and left to OpenMP otherwise; a user who set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` decides.
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return "threads: OpenMP wait policy as set in the environment"
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    measure = "busy now"
    if busy is None:
        busy = busy_cores()
    if busy is None:
        busy, measure = os.getloadavg()[0], "1-minute load average"
    if busy < cpus / 2:
        return f"threads: active waiting (other processes: {busy:.1f} of {cpus} cores {measure})"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return f"threads: passive waiting, a shared machine (other processes: {busy:.1f} of {cpus} cores {measure})"


def console_main() -> int:
    """The `addclass` console script: `main`, with in-process flow commands supervised (`flows.supervise`) so
    that the temporary Prefect server they start ends with them, however they end; on a busy machine torch
    threads wait passively (`passive_threads`)."""
    os.environ["ADDCLASS_THREADS"] = passive_threads()  # the training log and the demo print it
    argv = sys.argv[1:]
    args = build_parser().parse_args(argv)  # --help and usage errors stay in the user's process
    if args.command in IN_PROCESS_FLOWS and not getattr(args, "deployment", False):
        from addclass.flows.supervise import supervise

        rc = supervise(argv)
        if rc is not None:
            return rc if rc >= 0 else 128 - rc  # a child killed by signal N exits 128 + N, as a shell reports it
    return main(argv)


if __name__ == "__main__":
    sys.exit(console_main())
