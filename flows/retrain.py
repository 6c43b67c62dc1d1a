"""The `retrain` flow (scheduled weekly in prefect.yaml): train on the newest label version, evaluate, and
promote the new model (`promote`: if-better, always, never) only if it beats the current champion on the
validation split, compared on the score terms both have (`tasks.model_registry`); champion and challenger are
both recorded in the store's model registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger

from flows.add_class import evaluate_task, train_task
from flows.params import check_splits, flow_train_config
from tasks.model_registry import register_model, resolve_init_model
from tasks.train import TrainConfig


@flow(name="retrain", log_prints=True)
def retrain(
    store: str = "data/store.zarr",
    version: str = "latest",
    variant: Literal["tiny", "lite_r18", "r50"] = "tiny",
    iters: int = 300,
    batch_size: int = 2,
    crop_size: int = 256,
    reweight: Literal["none", "edge", "inverse"] = "inverse",
    inverse_weight_near_pseudo: bool = True,
    num_points: int = 12544,
    num_workers: int = 2,
    init_model: str | None = None,
    recipe: Literal["auto", "paper", "scratch"] = "auto",
    scale_range: list[float] = [0.5, 2.0],  # noqa: B006
    test_scale: float = 1.0,
    eval_splits: list[str] = ["val", "test"],  # noqa: B006 (Prefect parameters are JSON)
    promote: Literal["if-better", "always", "never"] = "if-better",
    device: str = "cpu",
    runs_dir: str | None = None,
    wait_for_lock: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Train a challenger on `version` and promote it if it beats the champion on val.

    ``init_model`` (a model folder, or ``"champion"``: the current champion) fine-tunes that model instead of
    training from scratch (a warm start).
    """
    from storage.store import open_label_store

    if iters < 1 or batch_size < 2:
        raise ValueError(f"Expected iters >= 1 and batch_size >= 2. Got {iters}, {batch_size}.")
    check_splits("eval_splits", eval_splits)
    st = open_label_store(store)
    st.resolve_version(version)  # a bad name fails now; "latest" is resolved again under the lock
    start_model = resolve_init_model(store, init_model)  # "champion" or a model folder, checked now
    runs = Path(runs_dir) if runs_dir else Path(f"{store.rstrip('/')}.runs")

    def train_config(version: str) -> TrainConfig:
        return flow_train_config(store=store, version=version, runs=runs, variant=variant, iters=iters,
                                 batch_size=batch_size, crop_size=crop_size, num_points=num_points,
                                 num_workers=num_workers, reweight=reweight, seed=seed, device=device,
                                 inverse_weight_near_pseudo=inverse_weight_near_pseudo, init_model=start_model,
                                 recipe=recipe, scale_range=scale_range, test_scale=test_scale)

    train_config(version)  # the training parameters are checked before waiting for the lock
    logger = get_run_logger()
    with st.lock(wait=wait_for_lock, purpose="retrain"):  # re-reads the store: another writer may have published
        version = st.resolve_version(version)
        tcfg = train_config(version)
        checkpoint = train_task(tcfg)
        results = evaluate_task(store, checkpoint, str(Path(tcfg.out_dir) / "report"), eval_splits, device)
        cfg = json.loads(json.dumps(tcfg.__dict__, default=str))
        reg = register_model(store, model_id=Path(tcfg.out_dir).name, path=checkpoint, label_version=version,
                             config=cfg, metrics=results["model"], promote=promote)
    logger.info("challenger %s score %.4f; champion now %s (previous %s, %s)", reg["model_id"], reg["score"],
                reg["champion"], reg["previous_champion"], reg["previous_score"])
    return {"checkpoint": checkpoint, "registry": reg, "report": results["report"]}


if __name__ == "__main__":
    retrain()
