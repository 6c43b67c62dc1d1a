"""The `add-class` flow: teach the model a new class from a text prompt.

pseudo-label (train, val) -> merge into a new label version -> train MaSSFormer -> evaluate (pseudo labels and
model vs hand masks) -> register the model. Parameters are typed (`labeling` and `training` are structured:
`flows.params`) and validated before any work starts; the flow holds the store's writer lock for the whole
run, so a second add-class on the same store fails clearly (or waits, with `wait_for_lock`). Every stage is
resumable from the store itself (pseudo labels are skipped per image, a merge draft is continued, training
resumes from its last checkpoint), so a rerun after a crash finishes the job without redoing finished work.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import wait

from addclass.flows.choices import MergePolicy, ScaleOut
from addclass.flows.params import (
    LabelingParams,
    ReviewParams,
    TrainingParams,
    check_review,
    check_splits,
    labeler_config,
    launch,
    parse_params,
    train_config,
)
from addclass.flows.runners import restored_environ, scale_out_runner
from addclass.flows.ui import (
    ProgressArtifact,
    TrainProgress,
    artifact_key,
    logs_to_run,
    plain_str,
    publish_registry,
    publish_results,
    score_lines,
)
from addclass.storage.store import LabelStore, open_label_store
from addclass.tasks.labels import merge as merge_tasks
from addclass.tasks.labels import pseudo_label as pl
from addclass.tasks.model_files.model_registry import config_hash, register_model, resolve_init_model
from addclass.tasks.training.train import TrainConfig
from addclass.tasks.training.train_launch import Launch, run_training


# ---------------------------------------------------------------------------- thin tasks (paths and ids only)
@task(name="pseudo-label-batch", retries=2, retry_delay_seconds=[2, 5])
def label_batch_task(plan: pl.PseudoPlan, image_ids: list[str]) -> dict[str, int]:
    return pl.label_batch(plan, image_ids)


@task(name="merge-image", retries=2, retry_delay_seconds=[2, 5])
def merge_image_task(store: str, version: str, split: str, image_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    return merge_tasks.merge_image(store, version, split, image_id, spec=spec)


@task(name="train")
def train_task(config: TrainConfig, launch: Launch | None = None) -> str:
    """Trains (resuming), with progress in the run: a progress artifact ``train-progress-<run>``, about 20 log
    lines (step, loss, lr, it/s, ETA) and the periodic validation scores (`tasks.training.train` log lines). With
    ``launch`` asking for several processes, under torchrun (`tasks.training.train_launch`): one task, whose logs carry
    the processes' output."""
    logger = get_run_logger()
    # validation scores and warnings at INFO; `logs_to_run` sends them to the run's logs unless
    # PREFECT_LOGGING_EXTRA_LOGGERS already does (the addclass CLI sets it; a deployment's worker may not)
    logging.getLogger("addclass.tasks").setLevel(logging.INFO)
    key = artifact_key("train-progress", Path(config.out_dir).name)
    progress = TrainProgress(log=logger.info, publish=ProgressArtifact(key))
    with logs_to_run("addclass.tasks"):
        final = run_training(config, launch=launch, resume=True, progress=False, on_step=progress)
    progress.finish(config.iters)
    return str(final)


@task(name="review")
def review_task(store: str, class_name: str, version: str, review: ReviewParams) -> dict[str, str | None]:
    """Exports the images of ``version`` most worth a look (`tasks.labels.review.export_review`) once, and returns
    ``{"folder", "version"}``: the version imported from that export, or None while it waits for the import
    (the run then stops; a markdown artifact ``add-class-CLASS-review`` says what to do)."""
    from addclass.tasks.labels.review import default_review_folder, export_review, review_state, review_steps

    logger = get_run_logger()
    folder = Path(review.out) if review.out else default_review_folder(store, class_name, version)
    state = review_state(open_label_store(store), folder, class_name=class_name, version=version)
    if state not in ("none", "exported"):
        logger.info("review: %s was imported as label version %s; training on it", folder, state)
        return {"folder": str(folder), "version": state}
    if state == "none":
        manifest = export_review(store, class_name, folder, version=version, top=review.top, by=review.by,
                                 model=review.model, fmt=review.format)
        logger.info("review: %d images of %s (%s, by %s) exported to %s", len(manifest["images"]), class_name,
                    version, review.by, folder)
    steps = review_steps(store, folder, review.format)
    logger.info("review: waiting for the reviewed labels; %s", " ".join(steps))
    create_markdown_artifact(key=artifact_key("add-class", class_name, "review"),
                             markdown=f"# Review of {class_name} ({version})\n\n" + "\n".join(
                                 f"{i}. {step}" for i, step in enumerate(steps, start=1)) + "\n",
                             description=f"add-class {class_name!r}: waiting for the review of {folder}")
    return {"folder": str(folder), "version": None}


PREDICTIONS_DIR = "predictions"  # the evaluated model's label PNGs, in the report folder


@task(name="evaluate")
def evaluate_task(store: str, checkpoint: str, out_dir: str, splits: list[str], device: str) -> dict[str, Any]:
    from addclass.tasks.evaluation.evaluate import evaluate_model, evaluate_pseudo
    from addclass.tasks.evaluation.evaluation_report import write_evaluation_report

    logger = get_run_logger()
    logging.getLogger("addclass.tasks").setLevel(logging.INFO)
    with logs_to_run("addclass.tasks"):
        # the predictions are kept as PNGs (rescorable with `addclass evaluate-masks`), so the report draws its
        # overlays from them instead of running the model again; a rerun replaces the ones it wrote
        model_results = evaluate_model(store, checkpoint, splits=tuple(splits), device=device, progress=False,
                                       pred_dir=Path(out_dir) / PREDICTIONS_DIR, overwrite=True)
        pseudo_results = evaluate_pseudo(store)
        paths = write_evaluation_report(out_dir, model_results=model_results, pseudo_results=pseudo_results)
    report = {k: str(v) for k, v in paths.items()}
    results = {"model": model_results, "pseudo": pseudo_results, "report": report}
    for line in score_lines(results):
        logger.info("evaluate %s", line)
    return results


# ---------------------------------------------------------------------------- scale-out stages (subflows)
@flow(name="pseudo-label")
def pseudo_label_stage(store: str, prompt: str, splits: list[str], labeler: pl.LabelerConfig,
                       batch_size: int) -> list[dict[str, Any]]:
    logger = get_run_logger()
    summaries = []
    for split in splits:
        plan = pl.plan_pseudo_label(store, prompt=prompt, split=split, labeler=labeler, batch_size=batch_size)
        logger.info("pseudo-label %s/%s: %d batches to do, %d images already done", plan.class_name, split,
                    len(plan.batches), plan.already_done)
        futures = label_batch_task.map(plan=plan, image_ids=plan.batches) if plan.batches else []
        wait(futures)
        results = [f.result() for f in futures]
        summary = pl.finish_pseudo_label(plan, detections=sum(r["detections"] for r in results))
        summary["worker_pids"] = sorted({r["pid"] for r in results})
        summaries.append(summary)
    return summaries


@flow(name="merge")
def merge_stage(store: str, classes: list[str], policy: str) -> str:
    logger = get_run_logger()
    # allow_partial: only the splits the pseudo stage labelled (and verified complete) get the new class;
    # the others (test) keep the parent's labels, since evaluation masks never feed a labeler.
    plan = merge_tasks.plan_merge(store, classes=classes, policy=policy, allow_partial=True, take_lock=False)
    if plan.published:
        logger.info("merge: identical version %s already published", plan.version)
        return plan.version
    items = merge_tasks.pending_images(plan)
    logger.info("merge %s -> %s: %d images to write%s", plan.parent, plan.version, len(items),
                " (resumed draft)" if plan.resumed else "")
    futures = merge_image_task.map(store=store, version=plan.version, split=[s for s, _ in items],
                                   image_id=[i for _, i in items], spec=[plan.spec] * len(items)) if items else []
    wait(futures)
    for f in futures:
        f.result()
    info = merge_tasks.finish_merge(store, plan, take_lock=False)
    return info.name


def publish_artifacts(prompt: str, class_name: str, results: dict[str, Any], *, config: TrainConfig,
                      checkpoint: str) -> None:
    """The evaluation's artifacts ``add-class-<class>-{metrics,report,outputs}`` (`flows.ui.publish_results`):
    scores as in the report, the report with its pictures embedded, and where the files are."""
    publish_results(artifact_key("add-class", class_name), title=f"add-class {prompt!r}", results=results,
                    run_dir=config.out_dir, checkpoint=checkpoint, store=config.store,
                    label_version=config.version)


# ---------------------------------------------------------------------------- the flow
@dataclass(frozen=True)
class AddClassPlan:
    """What the checked parameters resolve to (`plan_add_class`)."""

    store_path: str
    store: LabelStore
    class_name: str
    labeling: LabelingParams
    labeler: pl.LabelerConfig
    training: TrainingParams
    start_model: str | None  # init_model resolved ("champion" -> its folder)
    runs_dir: str | None
    review: ReviewParams | None = None  # pause after the merge for a person's review

    def train_config(self, version: str) -> TrainConfig:
        """The training stage's config for a label version."""
        return train_config(self.training, store=self.store_path, version=version, runs_dir=self.runs_dir,
                            init_model=self.start_model)


def plan_add_class(params: Mapping[str, Any]) -> AddClassPlan:
    """Checks every parameter of `add_class` (given by name; `labeling` and `training` as models or JSON
    objects) without starting anything: the flow calls it first, and `addclass add-class` calls it before
    Prefect starts, so a bad parameter is one line at once.

    Raises:
        ValueError, FileNotFoundError: naming the parameter, file or class.
    """
    labeling = parse_params(LabelingParams, params["labeling"], "labeling")
    training = parse_params(TrainingParams, params["training"], "training")
    labeler = labeler_config(labeling, device=training.device, seed=training.seed)
    pl.validate_labeler(labeler)
    check_splits("labeling.splits", labeling.splits)
    check_splits("eval_splits", params["eval_splits"])
    st = open_label_store(params["store"])
    start_model = resolve_init_model(params["store"], params["init_model"])  # "champion" or a folder, checked
    class_name = pl.class_name_for(st, params["prompt"])  # resumes if this prompt's class is being added
    review = check_review(params.get("review"), store=params["store"])
    plan = AddClassPlan(store_path=params["store"], store=st, class_name=class_name, labeling=labeling,
                        labeler=labeler, training=training, start_model=start_model, runs_dir=params["runs_dir"],
                        review=review)
    plan.train_config("latest")  # the training parameters are checked now, not after pseudo-labelling
    launch(training)
    return plan


@flow(name="add-class", log_prints=True)
def add_class(
    prompt: str,
    store: str = "data/store.zarr",
    labeling: LabelingParams = LabelingParams(),  # noqa: B008 (a frozen model; Prefect parameters are JSON)
    training: TrainingParams = TrainingParams(),  # noqa: B008
    policy: MergePolicy = "carve-others",
    init_model: str | None = None,
    eval_splits: list[str] = ["val", "test"],  # noqa: B006
    runs_dir: str | None = None,
    dask_address: str | None = None,
    scale_out: ScaleOut = "auto",
    wait_for_lock: bool = False,
    review: ReviewParams | None = None,
) -> dict[str, Any]:
    """Add the class named by `prompt` to the store and train, evaluate and register a model for it.

    ``labeling`` says how the class is pseudo-labelled and ``training`` how the model is trained
    (`flows.params`). ``init_model`` (a trained model folder, e.g. the ``final/`` of your 7-class model, or
    ``"champion"``: the store's registered champion) fine-tunes that model on the new label version instead
    of training from scratch; the new class starts untrained. Models and reports go to ``runs_dir``
    (default: ``STORE.runs``); ``dask_address`` and ``scale_out`` pick the runner of the mapped stages
    (`flows.runners.scale_out_runner`). ``review`` stops the flow after the merge with the images most worth a
    look exported for a person (`review_task`); the same add-class run again after ``addclass review import``
    trains on the reviewed version.
    """
    plan = plan_add_class(locals())  # every parameter checked before any work
    st, class_name, training = plan.store, plan.class_name, plan.training
    runner = scale_out_runner(dask_address, mode=scale_out, gpus=plan.labeling.gpus)
    logger = get_run_logger()
    pseudo: list[dict[str, Any]] = []

    with st.lock(wait=wait_for_lock, purpose=f"add-class {prompt!r}"):
        # ---- 1. pseudo-label (scale-out)
        if class_name not in {c.name for c in st.classes()}:
            with restored_environ():  # a local Dask cluster's nannies would leave their workers' environment
                pseudo = pseudo_label_stage.with_options(task_runner=runner)(
                    store, prompt, plan.labeling.splits, plan.labeler, plan.labeling.batch_size)
                # ---- 2. merge into a new label version (scale-out)
                version = merge_stage.with_options(task_runner=scale_out_runner(dask_address, mode=scale_out))(
                    store, [class_name], policy)
            version = plain_str(version)  # not the subflow's return object: a task input the UI can draw
        else:  # a rerun after the merge: train on the version that added the class, not a later one
            version = st.class_by_name(class_name).added_in or st.resolve_version("latest")
            logger.info("class %r already merged (version %s); continuing with training", class_name, version)
        # ---- 2b. review (when asked): stop for a person, go on from the version they imported
        if plan.review is not None:
            reviewed = review_task(store, class_name, version, plan.review)
            if reviewed["version"] is None:
                return {"class": class_name, "version": version, "review": reviewed["folder"],
                        "waiting_for_review": True, "pseudo": pseudo}
            version = plain_str(reviewed["version"])
        # ---- 3. train
        tcfg = plan.train_config(version)
        checkpoint = train_task(tcfg, launch(training))
        # ---- 4. evaluate
        results = evaluate_task(store, checkpoint, str(Path(tcfg.out_dir) / "report"), eval_splits,
                                training.device)
        publish_artifacts(prompt, class_name, results, config=tcfg, checkpoint=checkpoint)
        # ---- 5. register
        cfg = json.loads(json.dumps(tcfg.__dict__, default=str))
        reg = register_model(store, model_id=Path(tcfg.out_dir).name, path=checkpoint, label_version=version,
                             config=cfg, metrics=results["model"], promote="if-better")
        publish_registry(artifact_key("add-class", class_name), store=store, reg=reg, results=results,
                         promote="if-better")
    logger.info("report: %s", results["report"]["report.md"])
    return {"class": class_name, "version": version, "checkpoint": checkpoint, "report": results["report"],
            "registry": reg, "config_hash": config_hash(cfg), "pseudo": pseudo}


if __name__ == "__main__":
    import sys

    add_class(prompt=sys.argv[1] if len(sys.argv) > 1 else "car")
