"""The `predict` flow (deployment `predict` in prefect.yaml): label a folder of new images with a trained model,
e.g. the store's champion, mapped over batches of images on the scale-out runner (Dask with a server or
``dask_address``, threads in-process).

The plan (`tasks.prediction.predict.plan_predict`: find the images, resolve the model, list every output file in the
folder's manifest) runs once in the flow; each `predict_batch_task` loads the model once and writes the label
PNGs of its images, so a rerun skips what is done, a bad image fails its own entry only, and the run ends
``Failed`` naming the images that could not be predicted, after all the others were written.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.futures import wait

from addclass.common.errors import InputError
from addclass.flows.choices import ScaleOut
from addclass.flows.params import PredictionParams, parse_params, predict_config
from addclass.flows.runners import restored_environ, scale_out_runner
from addclass.tasks.prediction.predict import PredictPlan, plan_predict, predict_batch


@task(name="predict-batch", retries=1, retry_delay_seconds=5)
def predict_batch_task(plan: PredictPlan, images: list[str]) -> dict[str, Any]:
    return predict_batch(plan, images)


@flow(name="predict-images")
def predict_stage(plan: PredictPlan, images_per_task: int) -> dict[str, Any]:
    batches = [list(plan.images[i : i + images_per_task]) for i in range(0, len(plan.images), images_per_task)]
    futures = predict_batch_task.map(plan=plan, images=batches) if batches else []
    wait(futures)
    done: dict[str, Any] = {"written": [], "failed": {}}
    for f in futures:
        r = f.result()
        done["written"] += r["written"]
        done["failed"].update(r["failed"])
    return done


@flow(name="predict", log_prints=True)
def predict(
    inputs: list[str],
    out_dir: str,
    model: str = "champion",
    store: str | None = None,
    prediction: PredictionParams = PredictionParams(),  # noqa: B008 (a frozen model; Prefect parameters are JSON)
    images_per_task: int = 8,
    scale_out: ScaleOut = "auto",
    dask_address: str | None = None,
) -> dict[str, Any]:
    """Predict every image of ``inputs`` (files, folders, glob patterns) into ``out_dir``.

    ``model`` is a run folder, its ``final/`` folder, or ``"champion"``: the current champion of ``store``.
    ``prediction`` says how (`flows.params.PredictionParams`). Returns ``{"out_dir", "model", "written",
    "skipped", "failed"}``; the run fails, after writing the others, when an image could not be predicted.
    """
    prediction = parse_params(PredictionParams, prediction, "prediction")  # `.fn` gets the JSON as it came
    config = predict_config(prediction)
    if images_per_task < 1:
        raise InputError(f"Expected images_per_task >= 1. Got {images_per_task} instead.")
    if model == "champion":
        if not store:
            raise InputError("model='champion' needs store (whose champion to use).")
        from addclass.tasks.model_files.model_registry import resolve_init_model

        model = str(resolve_init_model(store, "champion"))
    logger = get_run_logger()
    plan = plan_predict(model, inputs, out_dir, config=config)
    logger.info("predict with %s: %d images to do, %d predicted before, %d refused", plan.model_dir,
                len(plan.images), len(plan.skipped), len(plan.refused))
    with restored_environ():
        done = predict_stage.with_options(task_runner=scale_out_runner(dask_address, mode=scale_out))(
            plan, images_per_task) if plan.images else {"written": [], "failed": {}}
    failed = {**plan.refused, **done["failed"]}
    result = {"out_dir": plan.out_dir, "model": plan.model_dir, "written": done["written"],
              "skipped": list(plan.skipped), "failed": failed}
    logger.info("predicted %d images into %s (%d skipped)", len(done["written"]), plan.out_dir, len(plan.skipped))
    if failed:
        lines = "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:5])
        raise RuntimeError(f"{len(failed)} of {len(plan.images) + len(plan.refused)} images could not be "
                           f"predicted (the others were written): {lines}")
    return result


if __name__ == "__main__":
    import sys

    predict(inputs=sys.argv[1:-1], out_dir=sys.argv[-1])
