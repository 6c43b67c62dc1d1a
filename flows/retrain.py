"""The `retrain` flow (scheduled weekly in prefect.yaml): train on the newest label version, evaluate, and
promote the new model (`promote`: if-better, always, never) only if it beats the current champion on the
validation split, compared on the score terms both have (`tasks.model_files.model_registry`); champion and challenger are
both recorded in the store's model registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from addclass.flows.add_class import evaluate_task, train_task
from addclass.flows.choices import Promote
from addclass.flows.params import TrainingParams, check_splits, launch, parse_params, train_config
from addclass.flows.ui import publish_registry, publish_results
from addclass.tasks.model_files.model_registry import register_model, resolve_init_model


@flow(name="retrain", log_prints=True)
def retrain(
    store: str = "data/store.zarr",
    version: str = "latest",
    training: TrainingParams = TrainingParams(),  # noqa: B008 (a frozen model; Prefect parameters are JSON)
    init_model: str | None = None,
    eval_splits: list[str] = ["val", "test"],  # noqa: B006
    promote: Promote = "if-better",
    runs_dir: str | None = None,
    wait_for_lock: bool = False,
) -> dict[str, Any]:
    """Train a challenger on `version` and promote it if it beats the champion on val.

    ``training`` says how (`flows.params.TrainingParams`, as add-class's). ``init_model`` (a model folder, or
    ``"champion"``: the current champion) fine-tunes that model instead of training from scratch (a warm
    start). Models and reports go to ``runs_dir`` (default: ``STORE.runs``).
    """
    from addclass.storage.store import open_label_store

    training = parse_params(TrainingParams, training, "training")  # `.fn` gets the JSON as it came
    check_splits("eval_splits", eval_splits)
    st = open_label_store(store)
    st.resolve_version(version)  # a bad name fails now; "latest" is resolved again under the lock
    start_model = resolve_init_model(store, init_model)  # "champion" or a model folder, checked now
    train_config(training, store=store, version=version, runs_dir=runs_dir, init_model=start_model)  # checks
    launch(training)
    logger = get_run_logger()
    with st.lock(wait=wait_for_lock, purpose="retrain"):  # re-reads the store: another writer may have published
        version = st.resolve_version(version)
        tcfg = train_config(training, store=store, version=version, runs_dir=runs_dir, init_model=start_model)
        checkpoint = train_task(tcfg, launch(training))
        results = evaluate_task(store, checkpoint, str(Path(tcfg.out_dir) / "report"), eval_splits,
                                training.device)
        # artifacts retrain-{metrics,report,outputs,registry} (`flows.ui`)
        publish_results("retrain", title=f"retrain on {version}", results=results, run_dir=tcfg.out_dir,
                        checkpoint=checkpoint, store=store, label_version=version)
        cfg = json.loads(json.dumps(tcfg.__dict__, default=str))
        reg = register_model(store, model_id=Path(tcfg.out_dir).name, path=checkpoint, label_version=version,
                             config=cfg, metrics=results["model"], promote=promote)
        publish_registry("retrain", store=store, reg=reg, results=results, promote=promote)
    logger.info("challenger %s score %.4f; champion now %s (previous %s, %s)", reg["model_id"], reg["score"],
                reg["champion"], reg["previous_champion"], reg["previous_score"])
    return {"checkpoint": checkpoint, "registry": reg, "report": results["report"]}


if __name__ == "__main__":
    retrain()
